"""The training losses: equal to plain cross-entropy over the whole logits, and so are their
gradients (CEWithChunkedOutputLoss over chunked logits; LinearCrossEntropyLoss fused with the
output projection)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusionlm.modules.loss import CEWithChunkedOutputLoss, LinearCrossEntropyLoss


def _labels(b: int, s: int, v: int) -> torch.Tensor:
    labels = torch.randint(0, v, (b, s))
    labels[:, :3] = -100  # a prompt
    labels[0, -5:] = -100  # padding
    return labels


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_chunked_loss_equals_plain_cross_entropy(chunks):
    b, s, v = 2, 37, 101
    logits = torch.randn(b, s, v, dtype=torch.float64) * 3
    labels = _labels(b, s, v)
    expected = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    loss_fn = CEWithChunkedOutputLoss(chunks)
    as_list = loss_fn(list(logits.float().tensor_split(chunks, dim=1)), labels)
    as_tensor = loss_fn(logits.float(), labels)
    assert abs(as_list.item() - expected.item()) < 1e-6
    assert abs(as_tensor.item() - expected.item()) < 1e-6


def test_gradients_match_and_bf16_chunks_are_upcast():
    b, s, v = 2, 16, 50
    labels = _labels(b, s, v)
    base = torch.randn(b, s, v)
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    F.cross_entropy(x1.reshape(-1, v), labels.reshape(-1)).backward()
    CEWithChunkedOutputLoss(4)(list(x2.tensor_split(4, dim=1)), labels).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-7, rtol=0)
    loss = CEWithChunkedOutputLoss(4)(base.bfloat16(), labels)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(base.bfloat16().float().reshape(-1, v), labels.reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-6


def test_model_chunked_output_pairs_with_the_loss(hf_llama_dir):
    import fusionlm

    model = fusionlm.load_model(hf_llama_dir[0])
    tokens = torch.randint(0, 96, (2, 20))
    labels = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        plain = F.cross_entropy(model(tokens).reshape(-1, 96), labels.reshape(-1))
        model.set_num_output_chunks(6)
        chunks = model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 6
    assert abs(CEWithChunkedOutputLoss(6)(chunks, labels).item() - plain.item()) < 1e-6


def test_no_labelled_token_gives_zero_and_wrong_chunking_is_refused():
    loss_fn = CEWithChunkedOutputLoss(2, ignore_index=-1)
    assert loss_fn(torch.randn(1, 4, 5), torch.full((1, 4), -1)).item() == 0.0
    with pytest.raises(ValueError, match="expected num_output_chunks=2"):
        loss_fn([torch.randn(1, 4, 5)], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_output_chunks must be >= 1"):
        CEWithChunkedOutputLoss(0)


@pytest.mark.parametrize("chunk_tokens", [0, 1, 5, 256])
def test_linear_loss_and_its_gradients_equal_projecting_first(chunk_tokens):
    b, s, d, v = 2, 37, 16, 101
    hidden = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    labels = _labels(b, s, v)
    expected = F.cross_entropy((hidden @ weight.T).reshape(-1, v), labels.reshape(-1))
    expected_grads = torch.autograd.grad(expected * 3, (hidden, weight))
    loss = LinearCrossEntropyLoss(chunk_tokens=chunk_tokens)(hidden, labels, weight=weight)
    grads = torch.autograd.grad(loss * 3, (hidden, weight))  # backward scales by its input
    assert abs(loss.item() - expected.item()) < 1e-12
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    frozen = weight.detach()  # a frozen output matrix gets no gradient computed
    (only_hidden,) = torch.autograd.grad(
        LinearCrossEntropyLoss(chunk_tokens=chunk_tokens)(hidden, labels, weight=frozen) * 3,
        (hidden,),
    )
    torch.testing.assert_close(only_hidden, expected_grads[0], atol=1e-12, rtol=0)


def test_linear_loss_under_autocast_matches_a_bf16_projection():
    hidden, weight = torch.randn(1, 24, 32), torch.randn(50, 32)
    labels = _labels(1, 24, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropyLoss(chunk_tokens=8)(hidden, labels, weight=weight)
        logits = F.linear(hidden, weight)  # bf16, as nn.Linear computes it under autocast
    expected = F.cross_entropy(logits.float().reshape(-1, 50), labels.reshape(-1))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 1e-5


def test_model_skipping_its_output_layer_pairs_with_the_linear_loss(hf_llama_dir):
    import fusionlm

    model = fusionlm.load_model(hf_llama_dir[0])
    tokens, labels = torch.randint(0, 96, (2, 20)), torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        plain = F.cross_entropy(model(tokens).reshape(-1, 96), labels.reshape(-1))
        model.skip_output_layer = True
        hidden = model(tokens)
        loss_fn = LinearCrossEntropyLoss()
        loss_fn.set_model_output(model)
        assert hidden.shape == (2, 20, model.layers[0].attn.q_proj.in_features)
        assert abs(loss_fn(hidden, labels).item() - plain.item()) < 1e-5


def test_linear_loss_refuses_shapes_that_do_not_fit():
    loss_fn = LinearCrossEntropyLoss()
    with pytest.raises(RuntimeError, match="set_model_output"):
        loss_fn(torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        loss_fn(torch.randn(1, 4, 8), torch.zeros(1, 5, dtype=torch.long), weight=torch.randn(9, 8))
    with pytest.raises(ValueError, match="do not fit"):
        loss_fn(torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.long), weight=torch.randn(9, 7))
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        LinearCrossEntropyLoss(chunk_tokens=-1)
