"""Generation on tiny checkpoints: transformers parity, batching, seeds, stops, bad options."""

from __future__ import annotations

import pytest
import torch

import fusionlm
from fusionlm.generation import (
    PREFILL_CHUNK,
    SamplingParams,
    _split_at_stop_strings,
    generate,
    sample,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.helpers import make_hf_llama

    directory = tmp_path_factory.mktemp("gen")
    reference = make_hf_llama(directory, max_position_embeddings=128)
    return fusionlm.load_model(directory), reference


@pytest.mark.parametrize("chunk", [PREFILL_CHUNK, 3])
def test_greedy_equals_transformers_generate(pair, chunk, monkeypatch):
    """Also with the prompt run 3 tokens at a time (3 chunks)."""
    monkeypatch.setattr(fusionlm.generation, "PREFILL_CHUNK", chunk)
    model, reference = pair
    prompt = torch.randint(1, 96, (1, 7))
    with torch.no_grad():
        expected = reference.generate(
            prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 7:].tolist()
    assert generate(model, [prompt[0].tolist()], max_new_tokens=20) == [expected]
    assert generate(model, [prompt[0].tolist()], max_new_tokens=20, compile=False) == [expected]


def test_repetition_penalty_equals_transformers(pair):
    model, reference = pair
    prompt = torch.randint(1, 96, (1, 6))
    with torch.no_grad():
        expected = reference.generate(
            prompt,
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 6:].tolist()
    assert generate(model, [prompt[0].tolist()], max_new_tokens=16, repetition_penalty=1.3) == [
        expected
    ]


def test_batch_of_different_lengths_equals_each_alone(pair, monkeypatch):
    """Prompts run 4 tokens at a time: chunks of the padded batch hold padding and tokens."""
    monkeypatch.setattr(fusionlm.generation, "PREFILL_CHUNK", 4)
    model, _ = pair
    prompts = [torch.randint(1, 96, (n,)).tolist() for n in (3, 12, 7, 1)]
    batched = generate(model, prompts, max_new_tokens=12)
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone


def test_same_seed_same_sample_and_seeds_differ(pair):
    model, _ = pair
    prompts = [[5, 6, 7], [9, 1]]
    options = {"max_new_tokens": 24, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    first = generate(model, prompts, seed=1234, **options)
    assert generate(model, prompts, seed=1234, **options) == first
    assert generate(model, prompts, seed=4321, **options) != first


def test_stop_tokens_end_a_row_and_are_not_returned(pair):
    model, _ = pair
    free = generate(model, [[3, 4, 5]], max_new_tokens=10)[0]
    stop = free[4]
    stopped = generate(model, [[3, 4, 5]], max_new_tokens=10, stop_tokens=[stop])[0]
    assert stopped == free[: free.index(stop)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"stop_strings": ["x"]}, "need a tokenizer"),
    ],
)
def test_nonsense_options_are_refused(pair, options, message):
    model, _ = pair
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], **{"max_new_tokens": 4, **options})


def test_empty_and_too_long_prompts_are_refused(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [])
    with pytest.raises(
        ValueError, match=r"120 tokens \+ max_new_tokens 9 = 129 exceeds the model's context of 128"
    ):
        generate(model, [[1] * 120], max_new_tokens=9)
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        generate(model, [[1, 200]])


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50) * 3
    for params, warper in [
        (SamplingParams(temperature=1.0, top_k=7), TopKLogitsWarper(7)),
        (SamplingParams(temperature=1.0, top_p=0.8), TopPLogitsWarper(0.8)),
        (SamplingParams(temperature=1.0, min_p=0.1), MinPLogitsWarper(0.1)),
    ]:
        allowed = warper(None, logits.clone()).isfinite()
        draws = torch.stack(
            [sample(logits, params, generator=torch.Generator().manual_seed(s)) for s in range(300)]
        )
        drawn = torch.zeros_like(allowed).scatter_(1, draws.T, True)
        assert (drawn <= allowed).all(), f"{params} sampled a token transformers filters out"
        assert drawn.sum() > 4, "sampling never left the argmax"


def test_greedy_limits_of_sampling():
    logits = torch.randn(3, 40)
    greedy = logits.argmax(-1)
    for params in [
        SamplingParams(temperature=0.7, top_k=1),
        SamplingParams(temperature=2.0, min_p=1.0),
    ]:
        assert torch.equal(
            sample(logits, params, generator=torch.Generator().manual_seed(0)), greedy
        )


def test_stop_string_holdback():
    assert _split_at_stop_strings("Hello <|us", ["<|user|>"]) == ("Hello ", "<|us", False)
    assert _split_at_stop_strings("Hello <|user|> more", ["<|user|>"]) == ("Hello ", "", True)
    assert _split_at_stop_strings("Hello <", ["<|user|>"], final=True) == ("Hello <", "", False)


def test_n_new_tokens_take_one_prefill_and_n_minus_1_steps(pair, monkeypatch):
    model, _ = pair
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model),
        "forward",
        lambda self, tokens, **kw: calls.append(1) or forward(self, tokens, **kw),
    )
    generate(model, [[1, 2, 3]], max_new_tokens=4, compile=False)
    assert len(calls) == 4
    calls.clear()
    generate(model, [[1, 2, 3]], max_new_tokens=1, compile=False)
    assert len(calls) == 1


def test_generate_leaves_the_model_without_caches(pair):
    model, _ = pair
    generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert not model.caches_are_setup()
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 96)


@pytest.mark.slow
def test_stop_strings_end_a_row_at_the_token_completing_them():
    model, tokenizer = fusionlm.load_model(), fusionlm.load_tokenizer()
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": question}]),
            add_special_tokens=False,
        )
        for question in ("What is the capital of France?", "Write a haiku about the sea.")
    ]
    full = generate(model, prompts, max_new_tokens=12)
    assert tokenizer.decode(full[0]).startswith("The capital of France is Paris")
    # "of Fr" spans tokens; the second row never says it and runs to max_new_tokens.
    stopped = generate(
        model, prompts, max_new_tokens=12, stop_strings=["of Fr"], tokenizer=tokenizer
    )
    assert tokenizer.decode(stopped[0]) == "The capital of France"
    assert stopped[0] == full[0][: len(stopped[0])]
    assert "of Fr" not in tokenizer.decode(full[1]) and stopped[1] == full[1]


def test_presence_and_frequency_penalties_and_logit_bias_follow_openai():
    """logit - count * frequency - (count > 0) * presence, over the output only; the bias
    is added to its token."""
    logits = torch.tensor([[2.0, 1.9, 1.8, 0.0]])
    output = torch.tensor([[0, 0, 1]])
    penalties = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)
    # token 0: 2.0 - 0.6 - 0.5 = 0.9; token 1: 1.9 - 0.3 - 0.5 = 1.1; token 2 keeps 1.8
    assert sample(logits, penalties, output=output).tolist() == [2]
    assert sample(logits, penalties, history=output).tolist() == [0]  # the prompt is not output
    assert sample(logits, SamplingParams(logit_bias={3: 2.5})).tolist() == [3]
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        sample(logits, SamplingParams(logit_bias={4: 1.0}))
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
