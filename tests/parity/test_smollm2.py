"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusionlm
from fusionlm.models.registry import DEFAULT_MODEL, MODELS

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning, my friend' into Spanish and German.",
    "def fibonacci(n):\n    # complete this Python function",
]


@pytest.fixture(scope="module")
def ours():
    return fusionlm.load_model(DEFAULT_MODEL), fusionlm.load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def theirs():
    import transformers

    path = MODELS[DEFAULT_MODEL].path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    return model.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(text, add_special_tokens=False)


def test_chat_prompts_tokenize_like_transformers(ours, theirs):
    _, tok = ours
    _, hf_tok = theirs
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        expected = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True
        )
        assert chat_ids(tok, prompt) == list(expected["input_ids"])


def test_greedy_generation_is_token_identical_to_transformers(ours, theirs):
    model, tok = ours
    hf_model, _ = theirs
    for prompt in PROMPTS:
        ids = chat_ids(tok, prompt)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        while expected and expected[-1] in tok.stop_ids:  # transformers keeps the end-of-turn token
            expected.pop()
        actual = fusionlm.generate(model, [ids], max_new_tokens=48, stop_tokens=tok.stop_ids)[0]
        assert actual == expected, f"{prompt!r}: {tok.decode(actual)!r} != {tok.decode(expected)!r}"


def test_last_position_logits_match(ours, theirs):
    model, tok = ours
    hf_model, _ = theirs
    for prompt in PROMPTS[:3]:
        tokens = torch.tensor([chat_ids(tok, prompt)])
        with torch.no_grad():
            torch.testing.assert_close(
                model(tokens)[0, -1], hf_model(tokens).logits[0, -1], atol=1e-3, rtol=0
            )


def test_batch_equals_each_prompt_alone(ours):
    model, tok = ours
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    alone = [
        fusionlm.generate(model, [p], max_new_tokens=24, stop_tokens=tok.stop_ids)[0]
        for p in prompts
    ]
    assert fusionlm.generate(model, prompts, max_new_tokens=24, stop_tokens=tok.stop_ids) == alone


def test_same_seed_same_sampled_text(ours):
    model, tok = ours
    ids = chat_ids(tok, "Tell me a short story about a robot.")
    options = {"max_new_tokens": 32, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7}
    first = tok.decode(fusionlm.generate(model, [ids], **options)[0])
    assert tok.decode(fusionlm.generate(model, [ids], **options)[0]) == first
