"""``fusionlm serve`` through the real ``openai`` client (and raw HTTP for what a client
library would not send): OpenAI's shapes, streaming, stop strings, seeds, errors, load."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from fusionlm.serving.local import find_server
from tests.helpers import MODEL, ServerProcess

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 24}


def test_chat_completion(server):
    reply = server.client.chat.completions.create(messages=QUESTION, **GREEDY)
    assert reply.object == "chat.completion" and reply.model == MODEL
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens == 37 and usage.completion_tokens == 8  # 7 tokens + <|im_end|>
    assert usage.total_tokens == 45


def test_streamed_chat_with_usage(server):
    stream = server.client.chat.completions.create(
        messages=QUESTION, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_from_text_and_from_token_ids(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "The capital of France is"})
    tokens = ids.json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"] == (
        "The capital of France is"
    )
    by_text = server.client.completions.create(prompt="The capital of France is", **GREEDY)
    by_ids = server.client.completions.create(prompt=tokens, **GREEDY)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].text.startswith(" Paris.")
    assert by_text.choices[0].finish_reason == "length" and by_text.usage.completion_tokens == 24
    both = server.client.completions.create(prompt=["Hello", "The capital of France is"], **GREEDY)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].text == by_text.choices[0].text


def test_a_stop_string_across_two_tokens_is_never_streamed(server):
    """' of' and ' France' are two tokens; the stop string 'of Fr' spans them. The text
    before it arrives; no chunk holds any of it."""
    stream = server.client.chat.completions.create(
        messages=QUESTION, stream=True, stop=["of Fr", "never"], **GREEDY
    )
    chunks = [c.choices[0] for c in stream]
    contents = [c.delta.content or "" for c in chunks]
    assert "".join(contents) == "The capital "
    assert not any("of" in piece for piece in contents)
    assert chunks[-1].finish_reason == "stop"


def test_n_choices_and_seeds(server):
    sampled = {"model": MODEL, "temperature": 1.0, "max_tokens": 16, "messages": QUESTION}
    pair = server.client.chat.completions.create(n=2, seed=5, **sampled)
    assert [c.index for c in pair.choices] == [0, 1]
    assert pair.usage.completion_tokens == sum(
        len(
            httpx.post(f"{server.url}/tokenize", json={"prompt": c.message.content}).json()[
                "tokens"
            ]
        )
        + (c.finish_reason == "stop")
        for c in pair.choices
    )
    again = server.client.chat.completions.create(seed=5, **sampled)
    assert again.choices[0].message.content == pair.choices[0].message.content
    texts = {
        server.client.chat.completions.create(seed=seed, **sampled).choices[0].message.content
        for seed in (1, 2, 3)
    }
    assert len(texts) > 1


def test_logprobs(server):
    reply = server.client.chat.completions.create(
        messages=QUESTION, logprobs=True, top_logprobs=2, **GREEDY
    )
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == ANSWER
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].token == e.token for e in entries)  # greedy


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"n": 5}, "n"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(server, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.chat.completions.create(**{"messages": QUESTION, **GREEDY, **fields})
    error = raised.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_client_mistakes_are_4xx_with_openais_error_object(server):
    def post(path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", timeout=30, **kwargs)

    def error(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return body

    error(post("/v1/chat/completions", content=b"{not json"), 400)
    error(post("/v1/chat/completions", json={"messages": QUESTION}), 400)  # no model
    error(post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True}), 400)
    long = error(post("/v1/completions", json={"model": MODEL, "prompt": list(range(600))}), 400)
    assert long["code"] == "context_length_exceeded" and "600" in long["message"]
    wrong_model = {**GREEDY, "messages": QUESTION, "model": "gpt-5"}
    unknown = error(post("/v1/chat/completions", json=wrong_model), 404)
    assert unknown["param"] == "model"
    error(post("/v1/nothing", json={}), 404)
    error(post("/v1/completions", content=b"x" * (5 * 1024 * 1024)), 413)
    error(httpx.get(f"{server.url}/v1/chat/completions"), 405)
    # max_tokens beyond the room left is clamped, and the reply ends with "length"
    clamped = post(
        "/v1/completions",
        json={**GREEDY, "prompt": list(range(1, 507)), "max_tokens": 100, "ignore_eos": True},
    )
    assert clamped.json()["usage"]["completion_tokens"] == 6
    assert clamped.json()["choices"][0]["finish_reason"] == "length"


def test_models_health_metrics(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert server.metric("fusionlm_slots_total") == 4
    assert server.metric("fusionlm_generation_tokens_total") > 0
    assert "openapi" in httpx.get(f"{server.url}/openapi.json").json()


MARKERS = [f"{animal}-{i}" for i, animal in enumerate(["ZEBRA", "OTTER", "LYNX", "MOOSE"] * 4)]


def marker_request(marker: str) -> dict:
    """A greedy chat request as JSON, without prefix reuse."""
    return {
        **GREEDY,
        "messages": [{"role": "user", "content": f"Repeat this code three times: {marker}"}],
        "cache_prompt": False,
    }


def client_fields(request: dict) -> dict:
    """``request`` as ``openai`` client arguments (fields OpenAI lacks go in extra_body)."""
    extra = {k: request[k] for k in ("cache_prompt", "ignore_eos") if k in request}
    return {**{k: v for k, v in request.items() if k not in extra}, "extra_body": extra}


def test_sixteen_requests_over_four_rows_each_get_their_lone_reply(server):
    def ask(marker: str) -> str:
        reply = server.client.chat.completions.create(**client_fields(marker_request(marker)))
        return reply.choices[0].message.content

    alone = [ask(marker) for marker in MARKERS]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, MARKERS))
    assert together == alone
    for marker, text in zip(MARKERS, together, strict=True):
        assert not any(other in text for other in MARKERS if other != marker)


def test_a_client_that_leaves_frees_its_row(server):
    """The client reads its first token and hangs up: within a second no request runs."""
    request = {**marker_request("KOALA-1"), "max_tokens": 400, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**request, "stream": True}
    ) as response:
        lines = response.iter_lines()  # held: dropping it would close the stream
        while not ('"content": "' in (line := next(lines)) and '"content": ""' not in line):
            pass  # up to the first token's chunk
        assert server.metric("fusionlm_requests_running") == 1
        cancelled = server.metric("fusionlm_requests_cancelled_total")
    deadline = time.monotonic() + 1.0
    while server.metric("fusionlm_requests_running") != 0:
        assert time.monotonic() < deadline, "the row was not freed within a second"
        time.sleep(0.05)
    assert server.metric("fusionlm_requests_cancelled_total") == cancelled + 1


# `fusionlm` in a process that fails if the command imported torch.
TORCHLESS_CLI = (
    "import sys; from fusionlm.cli import main; status = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules, 'the command imported torch'; sys.exit(status)"
)


def test_generate_takes_its_reply_from_the_local_server_that_computes_it(server):
    """The server records what it computes with; `fusionlm generate` with the same model and
    settings streams its reply without importing torch, and with --no-server computes the
    same text itself. Other settings are not served by it."""
    assert find_server(MODEL, dtype="float32", quant="auto", threads=2).url == server.url
    assert find_server(MODEL, dtype="float32", quant="auto", threads=None).url == server.url
    assert find_server(MODEL, dtype="float32", quant="none", threads=None) is None
    assert find_server(MODEL, dtype="float32", quant="auto", threads=1) is None
    argv = [
        "generate",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        "--threads",
        "2",
    ]
    served = subprocess.run(
        [sys.executable, "-c", TORCHLESS_CLI, *argv], capture_output=True, text=True
    )
    assert served.returncode == 0, served.stderr
    assert f"from the server at {server.url}" in served.stderr
    local = subprocess.run(
        [sys.executable, "-m", "fusionlm", *argv, "--no-server"],
        capture_output=True,
        text=True,
    )
    assert "from the server" not in local.stderr and "load" in local.stderr
    assert served.stdout == local.stdout == ANSWER + "\n"


def test_keys_a_full_queue_and_a_drain():
    """One row, one waiting place, a key: 401 without it, 429 for the third request at
    once; SIGTERM lets the running request finish, refuses new ones, exits 0."""
    server = ServerProcess(
        "--no-compile", "--slots", "1", "--max-queue", "1", "--ctx", "512",
        "--api-key", "secret", "--drain-timeout", "20",
        api_key="secret",
    )  # fmt: skip
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        long = client_fields({**marker_request("EMU-1"), "max_tokens": 60, "ignore_eos": True})
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = pool.submit(server.client.chat.completions.create, **long)
            time.sleep(0.5)
            waiting = pool.submit(server.client.chat.completions.create, **long)
            time.sleep(0.3)
            with pytest.raises(openai.RateLimitError) as raised:
                server.client.chat.completions.create(**long)
            assert raised.value.response.headers["retry-after"] == "1"
            assert raised.value.body["code"] == "queue_full"
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(openai.APIStatusError) as refused:
                server.client.chat.completions.create(**long)
            assert refused.value.status_code == 503
            assert running.result(timeout=60).choices[0].finish_reason == "length"
            assert waiting.result(timeout=60).usage.completion_tokens == 60
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_streamed_errors_after_the_headers_are_events():
    """A drain that runs out of time cancels a stream: it ends with an error event."""
    server = ServerProcess("--no-compile", "--slots", "1", "--ctx", "512", "--drain-timeout", "0.5")
    try:
        request = {**marker_request("IBIS-1"), "max_tokens": 400, "ignore_eos": True}
        events = []
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**request, "stream": True}
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    if not events:
                        server.process.send_signal(signal.SIGTERM)
                    events.append(line.removeprefix("data: "))
        last = json.loads(events[-1])
        assert last["error"]["type"] == "server_error"
        assert server.process.wait(30) == 0
    finally:
        server.stop()
