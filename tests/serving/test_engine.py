"""The engine in process, on a tiny random model: continuous batching gives each request
exactly the tokens it gets alone, with or without prefix reuse, eager and compiled."""

from __future__ import annotations

import threading

import pytest
import torch

import fusionlm.inference.attention  # noqa: F401 (registers the sdpa_cpu backend)
from fusionlm.generation import SamplingParams, generate
from fusionlm.inference.decode_step import compile_decode_step, stored_step_path
from fusionlm.serving.engine import Engine, Failed, Finished, Request, Started, Token
from tests.helpers import tiny

PROMPTS = [
    [5, 17, 3, 88, 41, 9, 60],
    [70, 2, 33],
    [11, 12, 13, 14, 15],
    [1, 2],
    [90, 80, 70, 60, 50, 40, 30, 20, 10],
    [44],
    [7, 7, 7, 7],
    [31, 41, 59, 26, 53, 58],
]
SAMPLED = SamplingParams(temperature=0.9, top_k=40)


class Collector:
    """A ticket's sink: its events, and a flag once every choice has ended."""

    def __init__(self, n: int = 1) -> None:
        self.events: list = []
        self.open = n
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished):
            self.open -= 1
        if self.open == 0 or isinstance(event, Failed):
            self.done.set()

    def tokens(self, choice: int = 0) -> list[int]:
        return [e.id for e in self.events if isinstance(e, Token) and e.choice == choice]


def start_engine(model, **options) -> Engine:
    engine = Engine(lambda: model, slots=4, ctx=64, max_queue=32, **{"compile": False, **options})
    engine.start()
    assert engine.ready.wait(600), engine.error
    return engine


def run(engine: Engine, requests: list[Request]) -> list[Collector]:
    """Submit all at once; wait for all."""
    sinks = [Collector(r.n) for r in requests]
    for request, sink in zip(requests, sinks, strict=True):
        engine.submit(request, sink)
    for sink in sinks:
        assert sink.done.wait(120)
    return sinks


def started(sink: Collector) -> Started:
    return next(e for e in sink.events if isinstance(e, Started))


def request(prompt: list[int], **fields) -> Request:
    return Request(prompt=prompt, max_tokens=fields.pop("max_tokens", 12), **fields)


def model():
    return tiny("sdpa_cpu", max_position_embeddings=128)


@pytest.fixture(scope="module")
def decoder():
    """The engine's model (an engine owns its model's caches: nothing else may run it)."""
    return model()


@pytest.fixture(scope="module")
def reference():
    """The same weights, for ``generate``."""
    return model()


@pytest.fixture(scope="module")
def engine(decoder):
    engine = start_engine(decoder, prefill_chunk=4)
    yield engine
    engine.stop()


def test_each_request_gets_its_lone_tokens_among_others(engine, reference):
    """Greedy and seeded sampling; 8 requests over 4 rows (so rows are reused while others
    decode, and prompts are prefilled in chunks of 4 between steps)."""
    requests = [
        request(p, sampling=SAMPLED if i % 2 else SamplingParams(), seed=i, cache_prompt=False)
        for i, p in enumerate(PROMPTS)
    ]
    alone = [run(engine, [r])[0].tokens() for r in requests]
    together = [sink.tokens() for sink in run(engine, requests)]
    assert together == alone
    assert all(len(tokens) == 12 for tokens in alone)
    greedy = generate(reference, PROMPTS[::2], max_new_tokens=12, compile=False)
    assert alone[::2] == greedy


def test_a_float16_kv_cache_keeps_each_request_to_its_lone_tokens():
    """``cache_dtype=float16``: half the cache's bytes, and still each request's tokens among
    others equal its tokens alone, with and without a reused prefix."""
    engine = start_engine(model(), prefill_chunk=4, cache_dtype=torch.float16)
    try:
        caches = engine.caches
        assert {c.k_cache.dtype for c in caches} == {torch.float16}
        requests = [request(p, cache_prompt=False) for p in PROMPTS]
        alone = [run(engine, [r])[0].tokens() for r in requests]
        assert [sink.tokens() for sink in run(engine, requests)] == alone
        run(engine, [request(PROMPTS[0])])
        (again,) = run(engine, [request(PROMPTS[0])])  # its row holds the prompt now
        assert started(again).cached_tokens > 0 and again.tokens() == alone[0]
    finally:
        engine.stop()


def test_a_reused_prefix_gives_the_same_tokens(engine):
    """The second request starts with the first's prompt and reply (a chat's next turn)."""
    first = run(engine, [request(PROMPTS[0])])[0]
    follow = [*PROMPTS[0], *first.tokens(), 3, 4]
    reused = run(engine, [request(follow)])[0]
    fresh = run(engine, [request(follow, cache_prompt=False)])[0]
    assert started(reused).cached_tokens >= len(PROMPTS[0])
    assert started(fresh).cached_tokens == 0
    assert reused.tokens() == fresh.tokens()


def test_n_choices_share_the_prefill_and_sample_apart(engine):
    seeded = request(PROMPTS[4], sampling=SamplingParams(temperature=1.5), seed=11)
    (pair,) = run(engine, [request(PROMPTS[4], n=2, sampling=seeded.sampling, seed=11)])
    (single,) = run(engine, [seeded])
    assert pair.tokens(0) == single.tokens()
    assert pair.tokens(1) != pair.tokens(0)
    assert sum(isinstance(e, Finished) for e in pair.events) == 2


def test_stop_tokens_logprobs_and_counts(engine, reference):
    greedy = generate(reference, [PROMPTS[1]], max_new_tokens=12, compile=False)[0]
    stop = greedy[5]
    (sink,) = run(engine, [request(PROMPTS[1], stop_ids=frozenset({stop}), logprobs=3)])
    tokens = sink.tokens()
    assert tokens == greedy[: greedy.index(stop)]
    finished = sink.events[-1]
    assert finished == Finished(0, "stop", len(tokens) + 1)
    first = next(e for e in sink.events if isinstance(e, Token))
    assert first.logprob <= 0.0 and len(first.top_logprobs) == 3
    assert first.top_logprobs[0][0] == first.id  # greedy takes the likeliest


def test_a_cancelled_request_frees_its_row(engine):
    sink = Collector()
    ticket = engine.submit(request(PROMPTS[2], max_tokens=60), sink)
    while not any(isinstance(e, Token) for e in sink.events):
        threading.Event().wait(0.01)
    engine.cancel(ticket)
    for _ in range(200):
        if not engine.busy:
            break
        threading.Event().wait(0.01)
    assert not engine.busy
    assert not any(isinstance(e, Finished) for e in sink.events)
    assert len(sink.tokens()) < 60


@pytest.mark.compiled
@pytest.mark.slow
def test_the_compiled_step_serves_the_same_tokens():
    """The batch-4 step compiled ahead of time, by ``build_step`` (a server's runs in another
    process) for a model of the same shapes: the engine runs what it stored. Each request's
    tokens alone equal those among others, and equal the eager engine's."""
    built = []

    def build_step(slots: int, ctx: int) -> None:
        built.append((slots, ctx))
        compile_decode_step(model(), batch_size=slots, cache_len=ctx)

    stored_step_path(model(), batch_size=4, cache_len=64).unlink(missing_ok=True)
    requests = [request(p, max_tokens=10, cache_prompt=False) for p in PROMPTS]
    compiled = start_engine(model(), compile=True, build_step=build_step)
    try:
        assert compiled.compiled and built == [(4, 64)]
        alone = [run(compiled, [r])[0].tokens() for r in requests[:4]]
        together = [sink.tokens() for sink in run(compiled, requests)]
    finally:
        compiled.stop()
    eager = start_engine(model())
    try:
        assert [sink.tokens() for sink in run(eager, requests)] == together
    finally:
        eager.stop()
    assert together[:4] == alone
