"""The compiled decode step (generation's default) gives the eager loop's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import fusionlm
from fusionlm.generation import generate
from fusionlm.inference import decode_step
from fusionlm.inference.quantize import quantize
from tests.modules.test_decoder import tiny

pytestmark = [pytest.mark.compiled, pytest.mark.slow]

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [70, 2, 33], [11, 12, 13, 14, 15]]


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_greedy_tokens_equal_eager():
    model = tiny(max_position_embeddings=512)
    eager = generate(model, PROMPTS, max_new_tokens=24, compile=False)
    assert generate(model, PROMPTS, max_new_tokens=24) == eager
    assert [generate(model, [p], max_new_tokens=24)[0] for p in PROMPTS] == eager


def step_logits(model, prompt: list[int], continuation: list[int], *, compile: bool):
    """Next-token logits ``[len(continuation), v]`` of decode steps fed ``continuation``."""
    model.setup_caches(1, torch.float32, decoder_max_seq_len=256, fixed_shape=True)
    try:
        with torch.inference_mode():
            model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            step = decode_step.DecodeStep(model, compile=compile)
            return torch.cat(
                [
                    step(
                        torch.tensor([[token]]),
                        mask=None,
                        encoder_mask=None,
                        input_pos=torch.tensor([[len(prompt) + i]]),
                    )
                    for i, token in enumerate(continuation)
                ]
            )
    finally:
        model.remove_caches()


@pytest.mark.parametrize("format", ["bf16", "int8"])
def test_compiled_weight_only_steps_equal_eager(format):
    """The kernels are custom ops, opaque to inductor: the compiled step runs the same
    kernels in fp32, so its logits equal eager's up to the order of inductor's fused fp32
    ops, and the greedy tokens are the same."""
    model = quantize(tiny(max_position_embeddings=512, intermediate_size=128), format)
    continuation = generate(model, [PROMPTS[0]], max_new_tokens=24, compile=False)[0]
    eager = step_logits(model, PROMPTS[0], continuation, compile=False)
    compiled = step_logits(model, PROMPTS[0], continuation, compile=True)
    assert eager.abs().max() > 1.0
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert generate(model, PROMPTS, max_new_tokens=24) == generate(
        model, PROMPTS, max_new_tokens=24, compile=False
    )


def test_nearby_prompt_lengths_reuse_one_graph():
    model = tiny(max_position_embeddings=512)
    generate(model, [PROMPTS[0]], max_new_tokens=4)
    compiled = graphs_compiled()
    # 7 + 4 and 5 + 30 both round up to a 256-slot cache: same shapes, same graph.
    generate(model, [PROMPTS[2]], max_new_tokens=30)
    assert graphs_compiled() == compiled


def test_weights_of_a_new_layout_get_their_own_graph():
    """The compiled step skips dynamo's per-step check of each weight's shape and strides;
    the layout hash taken per generate call must catch a weight stored differently."""
    model = tiny(max_position_embeddings=512)
    generate(model, PROMPTS, max_new_tokens=4)
    compiled = graphs_compiled()
    up = model.layers[0].mlp.w1
    up.weight = torch.nn.Parameter(up.weight.detach().t().contiguous().t())  # same values
    assert generate(model, PROMPTS, max_new_tokens=12) == generate(
        model, PROMPTS, max_new_tokens=12, compile=False
    )
    assert graphs_compiled() > compiled


def test_a_model_changed_between_generate_calls_gets_a_graph_that_fits():
    """Within a token loop only the first step checks dynamo's guards; that check must still
    catch a model changed since the last call (a Python attribute the graph bakes in)."""
    model = tiny(max_position_embeddings=512)
    generate(model, PROMPTS, max_new_tokens=4)
    compiled = graphs_compiled()
    for layer in model.layers:
        layer.attn.scale *= 4.0
    assert generate(model, PROMPTS, max_new_tokens=12) == generate(
        model, PROMPTS, max_new_tokens=12, compile=False
    )
    assert graphs_compiled() > compiled


def test_a_compiler_failure_falls_back_to_eager(monkeypatch):
    model = tiny()

    def fail(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(
            "inductor", RuntimeError("no C++ compiler"), None
        )

    monkeypatch.setattr(decode_step, "compiled_forward_step", lambda **options: fail)
    with pytest.warns(RuntimeWarning, match="(?s)decoding eagerly.*no C\\+\\+ compiler"):
        tokens = generate(model, PROMPTS, max_new_tokens=8)
    assert tokens == generate(model, PROMPTS, max_new_tokens=8, compile=False)


def test_default_model_compiled_greedy_tokens_equal_eager():
    """fp32, batch 1: the compiled step (matvecs decomposed into fused kernels) gives the
    eager loop's tokens on the real model too."""
    model, tokenizer = fusionlm.load_model(), fusionlm.load_tokenizer()
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        prompt = tokenizer.encode(text, add_special_tokens=False)
        eager = generate(model, [prompt], max_new_tokens=24, compile=False)
        assert generate(model, [prompt], max_new_tokens=24) == eager
