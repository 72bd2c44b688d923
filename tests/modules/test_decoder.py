"""TransformerDecoder behaviour: caches, padding, packing, checkpointing, chunking, bad input."""

from __future__ import annotations

import pytest
import torch

from fusionlm import disable_kv_cache
from fusionlm.modules import masks
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.kv_cache import KVCache
from tests.helpers import tiny

BACKENDS = ["eager", "sdpa", "flex"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_decoding_equals_full_forward(backend):
    model = tiny(backend)
    tokens = torch.randint(0, 96, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, torch.float32, decoder_max_seq_len=32)
        steps = [model(tokens[:, :8], input_pos=torch.arange(8))]
        for i in range(8, 14):
            steps.append(model(tokens[:, i : i + 1], input_pos=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_chunked_prefill_after_cache_equals_full_forward():
    model = tiny()
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(1, torch.float32)
        first = model(tokens[:, :5], input_pos=torch.arange(5))
        second = model(tokens[:, 5:], input_pos=torch.arange(5, 12))
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=0)


def test_reset_caches_starts_over():
    model = tiny()
    tokens = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        model.setup_caches(1, torch.float32)
        first = model(tokens, input_pos=torch.arange(6))
        model.reset_caches()
        again = model(tokens, input_pos=torch.arange(6))
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [b, s], keep [b, s], positions [b, s]) for rows padded on the left with 0."""
    s = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), s, dtype=torch.long)
    keep = torch.zeros(len(rows), s, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, s - len(row) :] = row
        keep[i, s - len(row) :] = True
    positions = (keep.cumsum(-1) - 1).clamp(min=0)
    return tokens, keep, positions


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_equals_rows_alone(backend):
    model = tiny(backend)
    rows = [torch.randint(0, 96, (n,)) for n in (5, 11, 8)]
    tokens, keep, positions = left_padded(rows)
    predicate = masks.and_masks(masks.causal(), masks.padding(keep))
    mask = masks.to_bool_mask(predicate, batch_size=3, q_len=11, kv_len=11)
    with torch.no_grad():
        batched = model(tokens, mask=mask, input_pos=positions)
        assert not batched.isnan().any(), "padding queries that see nothing must not produce NaN"
        for i, row in enumerate(rows):
            alone = model(row[None])
            torch.testing.assert_close(batched[i, -len(row) :], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_decodes_with_cache(backend):
    model = tiny(backend)
    rows = [torch.randint(0, 96, (n,)) for n in (3, 7)]
    continuation = torch.randint(0, 96, (2, 4))
    tokens, keep, positions = left_padded(rows)
    with torch.no_grad():
        model.setup_caches(2, torch.float32, decoder_max_seq_len=16)
        cache_keep = torch.cat([keep, torch.ones(2, 16 - 7, dtype=torch.bool)], dim=1)
        predicate = masks.and_masks(masks.causal(), masks.padding(cache_keep))
        mask = masks.to_bool_mask(predicate, batch_size=2, q_len=7, kv_len=16)
        model(tokens, mask=mask, input_pos=positions)
        outs = []
        for step in range(4):
            slot = 7 + step
            step_mask = masks.to_bool_mask(
                predicate, batch_size=2, q_len=1, kv_len=16, q_offset=slot
            )
            pos = positions[:, -1:] + 1 + step
            outs.append(model(continuation[:, step : step + 1], mask=step_mask, input_pos=pos))
        decoded = torch.cat(outs, dim=1)
        for i, row in enumerate(rows):
            with disable_kv_cache(model):
                full = model(torch.cat([row, continuation[i]])[None])
            torch.testing.assert_close(decoded[i], full[0, -4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_block", [False, True])
def test_packed_documents_equal_documents_alone(backend, as_block):
    model = tiny(backend)
    lengths = [4, 7, 3]
    docs = [torch.randint(0, 96, (n,)) for n in lengths]
    tokens = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    predicate = masks.and_masks(masks.causal(), masks.document(doc_ids))
    convert = masks.to_block_mask if as_block else masks.to_bool_mask
    mask = convert(predicate, batch_size=1, q_len=14, kv_len=14)
    with torch.no_grad():
        packed = model(tokens, mask=mask, input_pos=positions)
        start = 0
        for doc in docs:
            alone = model(doc[None])
            torch.testing.assert_close(
                packed[0, start : start + len(doc)], alone[0], atol=1e-5, rtol=0
            )
            start += len(doc)


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(every_n_layers):
    model = tiny(num_hidden_layers=3).train()
    tokens = torch.randint(0, 96, (2, 10))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_gradient_checkpointing(every_n_layers=every_n_layers)
    flags = [layer.gradient_checkpointing for layer in model.layers]
    assert flags == [i % every_n_layers == 0 for i in range(3)]
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)


def test_checkpointing_is_off_by_default_and_in_eval():
    model = tiny()
    assert not any(layer.gradient_checkpointing for layer in model.layers)


def test_reentrant_checkpointing_refuses_keyword_tensors_that_need_grad():
    model = tiny().train()
    model.set_gradient_checkpointing(use_reentrant=True)
    layer = model.layers[0]
    x = torch.randn(1, 4, 64, requires_grad=True)
    with pytest.raises(ValueError, match="keyword tensors"):
        layer(
            x,
            encoder_input=torch.randn(1, 2, 64, requires_grad=True),
            input_pos=torch.arange(4)[None],
        )


def test_chunked_output_concatenates_to_full_output():
    model = tiny()
    tokens = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        model.set_num_output_chunks(3)
        chunks = model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 3
    # Same math; smaller GEMMs only reorder float sums.
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-6, rtol=0)


def test_output_hidden_states_returns_requested_layer_inputs():
    model = tiny(num_hidden_layers=3)
    model.output_hidden_states = [0, 2]
    tokens = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        h0, h2, logits = model(tokens)
        embeddings = model.tok_embeddings(tokens)
        pos = torch.arange(6)[None]
        after_1 = model.layers[1](model.layers[0](embeddings, input_pos=pos), input_pos=pos)
    torch.testing.assert_close(h0, embeddings, atol=0, rtol=0)
    torch.testing.assert_close(h2, after_1, atol=0, rtol=0)
    assert logits.shape == (1, 6, 96)


def test_single_layer_is_copied_num_layers_times():
    layer = tiny().layers[0]
    model = TransformerDecoder(
        tok_embeddings=torch.nn.Embedding(96, 64),
        layers=layer,
        num_layers=3,
        max_seq_len=64,
        num_heads=4,
        head_dim=16,
        norm=torch.nn.Identity(),
        output=torch.nn.Linear(64, 96),
    )
    assert len(model.layers) == 3
    assert len({id(layer) for layer in model.layers}) == 3
    w = [layer.attn.q_proj.weight for layer in model.layers]
    torch.testing.assert_close(w[0], w[2])
    assert w[0].data_ptr() != w[2].data_ptr()


def test_cache_flags_and_disable_context():
    model = tiny()
    assert not model.caches_are_setup() and not model.caches_are_enabled()
    model.setup_caches(1, torch.float32)
    assert model.caches_are_setup() and model.caches_are_enabled()
    with disable_kv_cache(model):
        assert model.caches_are_setup() and not model.caches_are_enabled()
        model(torch.randint(0, 96, (1, 4)))  # no input_pos needed, nothing cached
    assert model.caches_are_enabled()
    assert model.layers[0].attn.kv_cache.size == 0


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        (torch.zeros(2, 3), TypeError, "integer tensor"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"shape \[b, s\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"shape \[b, s\]"),
        (torch.tensor([[1, 96]]), ValueError, r"\[0, 96\)"),
        (torch.tensor([[-1, 3]]), ValueError, r"\[0, 96\)"),
        (torch.zeros(1, 65, dtype=torch.long), ValueError, "max_seq_len 64"),
    ],
)
def test_bad_tokens_are_named(tokens, error, message):
    with pytest.raises(error, match=message):
        tiny()(tokens)


def test_cache_errors():
    model = tiny()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.reset_caches()
    model.setup_caches(1, torch.float32, decoder_max_seq_len=8)
    with pytest.raises(ValueError, match="input_pos is required"):
        model(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), input_pos=torch.arange(9))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 2, dtype=torch.long), input_pos=torch.arange(2))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        model.setup_caches(1, torch.float32, decoder_max_seq_len=65)


def test_bad_masks_and_positions_are_named():
    model = tiny()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="must be bool"):
        model(tokens, mask=torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        model(tokens, mask=torch.ones(1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_pos must be"):
        model(tokens, input_pos=torch.zeros(1, 3, dtype=torch.long))


def test_cache_never_attends_to_unwritten_slots():
    """Poison every slot after the filled prefix: a cache that read them would produce NaN."""
    model = tiny()
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(1, torch.float32, decoder_max_seq_len=32)
        for layer in model.layers:
            layer.attn.kv_cache.k_cache.fill_(float("nan"))
            layer.attn.kv_cache.v_cache.fill_(float("nan"))
        steps = [model(tokens[:, :5], input_pos=torch.arange(5))]
        for i in range(5, 9):
            steps.append(model(tokens[:, i : i + 1], input_pos=torch.tensor([i])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_logits_to_keep_projects_only_the_last_positions():
    model = tiny()
    tokens = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        full = model(tokens)
        last = model(tokens, logits_to_keep=2)
    assert last.shape == (2, 2, 96)
    torch.testing.assert_close(last, full[:, -2:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_shape_cache_decodes_like_the_full_forward(backend):
    """Reading the whole buffer under a mask of the filled slots: unwritten slots are
    poisoned with huge finite values, which any weight but an exact zero would spread
    (NaN would not do: 0 * NaN is NaN even for a masked slot)."""
    model = tiny(backend)
    tokens = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, torch.float32, decoder_max_seq_len=32, fixed_shape=True)
        for layer in model.layers:
            layer.attn.kv_cache.k_cache.fill_(1e30)
            layer.attn.kv_cache.v_cache.fill_(1e30)
        steps = [model(tokens[:, :6], input_pos=torch.arange(6))]
        for i in range(6, 11):
            steps.append(model(tokens[:, i : i + 1], input_pos=torch.tensor([i])))
        assert model.layers[0].attn.kv_cache.size == 11
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cache_rows_fill_and_decode_independently():
    """A fixed-shape cache whose rows hold prompts of different lengths, each prefilled
    alone into its row (``CacheRows``): a batched step gives each row the logits of its own
    sequence, and a masked-out row changes nothing for the others."""
    from fusionlm.modules.decoder import CacheRows

    model = tiny("sdpa")
    prompts = [torch.randint(0, 96, (1, n)) for n in (9, 4, 6)]
    nexts = torch.randint(0, 96, (3, 1))
    with torch.no_grad():
        expected = [
            model(torch.cat([p, nexts[i : i + 1]], dim=1))[0, -1] for i, p in enumerate(prompts)
        ]
        model.setup_caches(3, torch.float32, decoder_max_seq_len=32, fixed_shape=True)
        for row, prompt in enumerate(prompts):
            with CacheRows(model).row(row):
                model(prompt, input_pos=torch.arange(prompt.shape[1])[None])
        caches = [m for m in model.modules() if isinstance(m, KVCache)]
        assert caches[0].next_slot.tolist() == [9, 4, 6]
        positions = torch.tensor([[9], [4], [6]])
        step = model(nexts, input_pos=positions)[:, -1]
        for cache in caches:
            cache.set_lengths(torch.tensor([9, 4, 6]))
        only_first_two = torch.ones(3, 1, 1, 32, dtype=torch.bool)
        only_first_two[2] = False
        masked = model(nexts, mask=only_first_two, input_pos=positions)[:, -1]
    for row in range(3):
        torch.testing.assert_close(step[row], expected[row], atol=1e-5, rtol=0)
    assert torch.equal(masked[:2], step[:2])
    with pytest.raises(ValueError, match=r"lengths must be \[3\] values in \[0, 32\]"):
        caches[0].set_lengths(torch.tensor([10, 2, 33]))
    caches[0].set_lengths(torch.tensor([10, 2, 0]))
    caches[0].copy_row(0, 2)
    assert caches[0].next_slot.tolist() == [10, 2, 10]
    assert torch.equal(caches[0].k_cache[2, :, :10], caches[0].k_cache[0, :, :10])


def test_a_mask_narrowed_once_decodes_like_each_layer_narrowing_it(monkeypatch):
    """A decode step's mask narrowed once, before the step, to the filled slots of its
    ``slot_cache`` (and the one being written); inside ``masks_cover_filled_slots`` the
    layers take it as given: the same logits, bit for bit, as each layer narrowing the raw
    mask itself, with one narrowing per step instead of one per layer."""
    from fusionlm.modules.decoder import CacheRows, masks_cover_filled_slots, slot_cache

    model = tiny("sdpa")
    model.setup_caches(2, torch.float32, decoder_max_seq_len=32, fixed_shape=True)
    caches = [m for m in model.modules() if isinstance(m, KVCache)]
    with torch.no_grad():
        for row, length in enumerate((7, 3)):
            with CacheRows(model).row(row):
                model(torch.randint(0, 96, (1, length)), input_pos=torch.arange(length)[None])
        tokens, positions = torch.randint(0, 96, (2, 1)), torch.tensor([[7], [3]])
        raw = torch.ones(2, 1, 1, 32, dtype=torch.bool)
        expected = model(tokens, mask=raw, input_pos=positions)
        for cache in caches:
            cache.set_lengths(torch.tensor([7, 3]))
        narrowings = []
        filled_mask = KVCache.filled_mask
        monkeypatch.setattr(
            KVCache, "filled_mask", lambda *a, **k: narrowings.append(1) or filled_mask(*a, **k)
        )
        mask = raw & slot_cache(model).filled_mask(1, causal=True, pending=1)
        with masks_cover_filled_slots(model):
            got = model(tokens, mask=mask, input_pos=positions)
    assert mask[0, 0, 0].tolist() == [True] * 8 + [False] * 24
    assert mask[1, 0, 0].tolist() == [True] * 4 + [False] * 28
    assert len(narrowings) == 1 and len(caches) == 2
    assert torch.equal(got, expected)
    assert not any(m.attn.masks_filled_slots for m in model.layers)
