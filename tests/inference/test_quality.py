"""Faster precisions keep the default model's quality: greedy agreement and perplexity vs fp32.

bf16 and int8 round the file's weights again; int4 computes with the file's own Q4_1 weights
(the same numbers as fp32, summed in another order), so its bar is near-identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusionlm
from fusionlm.evaluation import perplexity

pytestmark = pytest.mark.slow

TEXT = Path(__file__).parents[1] / "data" / "perplexity.txt"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "Give me three tips for learning to cook.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "Name the planets of the solar system.",
    "Why do cats purr?",
    "Write a short thank-you note to a teacher.",
]
# variant -> (load_model options, least share of greedy tokens equal to fp32's, largest
# relative change of perplexity)
VARIANTS = {
    "bf16": ({"quant": "bf16"}, 0.9, 0.02),
    "int8": ({"quant": "int8"}, 0.9, 0.02),
    "int4": ({"quant": "int4"}, 0.99, 0.001),
    "w8a8": ({"quant": "w8a8"}, 0.5, 0.005),  # activations rounded too: 179 of 320 at writing
}


@pytest.fixture(scope="module")
def tokenizer():
    return fusionlm.load_tokenizer()


@pytest.fixture(scope="module")
def reference(tokenizer):
    model = fusionlm.load_model()
    return model, greedy(model, tokenizer), perplexity(model, tokenizer.encode(TEXT.read_text()))


def greedy(model, tokenizer) -> list[list[int]]:
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": p}]),
            add_special_tokens=False,
        )
        for p in PROMPTS
    ]
    outputs = fusionlm.generate(model, prompts, max_new_tokens=32)
    assert all(len(o) == 32 for o in outputs)
    return outputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_agree_with_fp32(reference, tokenizer, variant):
    _, expected, _ = reference
    options, least, _ = VARIANTS[variant]
    actual = greedy(fusionlm.load_model(**options), tokenizer)
    same = sum(
        a == b
        for got, want in zip(actual, expected, strict=True)
        for a, b in zip(got, want, strict=True)
    )
    assert same / (32 * len(PROMPTS)) >= least, (
        f"{variant}: {same} of {32 * len(PROMPTS)} tokens agree"
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_perplexity_stays_close_to_fp32(reference, tokenizer, variant):
    _, _, expected = reference
    options, _, largest = VARIANTS[variant]
    actual = perplexity(fusionlm.load_model(**options), tokenizer.encode(TEXT.read_text()))
    assert abs(actual / expected - 1) <= largest, f"{variant}: {actual:.4f} vs fp32 {expected:.4f}"


def test_perplexity_is_plausible_and_checks_its_input(reference, tokenizer):
    model, _, fp32 = reference
    assert 2 < fp32 < 60, fp32
    shuffled = tokenizer.encode(TEXT.read_text())
    shuffled = [
        shuffled[i]
        for i in torch.randperm(len(shuffled), generator=torch.Generator().manual_seed(0))
    ]
    assert perplexity(model, shuffled) > 3 * fp32
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(model, [1])
    with pytest.raises(ValueError, match="window must be in"):
        perplexity(model, [1, 2, 3], window=1)
