"""RotaryEmbedding and the RoPE initialiser registry against transformers' Llama RoPE."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from fusionlm.modules.rope import (
    ROPE_INITIALISERS,
    RotaryEmbedding,
    register_rope_initialiser,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

HEAD_DIM = 64
N_HEADS = 2
MPE = 256  # the config's max_position_embeddings
TABLE = 512  # our max_seq_len: room for dynamic types to grow past MPE

_half = HEAD_DIM // 2
_SHORT = [1.0 + 0.05 * i for i in range(_half)]
_LONG = [1.0 + 0.9 * i for i in range(_half)]

# (id, rope_type, theta, rope parameters without rope_type/rope_theta, realistic for each family)
CASES: list[tuple[str, str, float, dict[str, Any]]] = [
    ("default", "default", 10_000.0, {}),
    ("linear", "linear", 10_000.0, {"factor": 4.0}),
    ("dynamic", "dynamic", 10_000.0, {"factor": 2.0}),
    ("yarn-qwen", "yarn", 1_000_000.0, {"factor": 4.0, "original_max_position_embeddings": 64}),
    (
        "yarn-deepseek",
        "yarn",
        10_000.0,
        {
            "factor": 40,
            "original_max_position_embeddings": 32,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
    (
        "yarn-mscale-only",  # mscale without mscale_all_dim is ignored by transformers
        "yarn",
        10_000.0,
        {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707},
    ),
    (
        "yarn-gptoss",
        "yarn",
        150_000.0,
        {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
    ),
    (
        "yarn-implicit-factor",
        "yarn",
        10_000.0,
        {"factor": None, "original_max_position_embeddings": 64, "attention_factor": 1.25},
    ),
    (
        "llama3",
        "llama3",
        500_000.0,
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    (
        "longrope-phi3",
        "longrope",
        10_000.0,
        {"short_factor": _SHORT, "long_factor": _LONG, "original_max_position_embeddings": 64},
    ),
    (
        "longrope-factor",
        "longrope",
        10_000.0,
        {"short_factor": _SHORT, "long_factor": _LONG, "factor": 8.0, "attention_factor": 1.1},
    ),
]
CASE_IDS = [c[0] for c in CASES]


def _hf_config(rope_type: str, theta: float, params: dict[str, Any]) -> Any:
    rope_parameters = {"rope_type": rope_type, "rope_theta": theta, **copy.deepcopy(params)}
    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * N_HEADS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MPE,
        rope_parameters=rope_parameters,
    )


def _hf_init(rope_type: str, config: Any, seq_len: Any = None) -> tuple[torch.Tensor, float]:
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)


def _ours_init(rope_type: str, theta: float, params: dict[str, Any], seq_len: int | None = None):
    return ROPE_INITIALISERS[rope_type](
        dim=HEAD_DIM, base=theta, max_position_embeddings=MPE, params=params, seq_len=seq_len
    )


def _ours(rope_type: str, theta: float, params: dict[str, Any]) -> RotaryEmbedding:
    return RotaryEmbedding(
        HEAD_DIM,
        max_seq_len=TABLE,
        base=theta,
        rope_type=rope_type,
        params=params,
        max_position_embeddings=MPE,
    )


def _hf_rotate(hf_rope: LlamaRotaryEmbedding, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    cos, sin = hf_rope(q, pos)
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2)
    return rotated


def _per_row_positions(s: int, generator: torch.Generator) -> torch.Tensor:
    """[4, s]: an offset row (cached decode), a left-padded row, a packed row, random positions."""
    pad = s // 3
    split = s // 2
    rows = [
        torch.arange(s) + 200,
        torch.cat((torch.ones(pad, dtype=torch.long), torch.arange(s - pad))),
        torch.cat((torch.arange(split), torch.arange(s - split))),
        torch.randint(0, TABLE, (s,), generator=generator),
    ]
    return torch.stack(rows)


# --------------------------------------------------------------------------- initialisers


@pytest.mark.parametrize(("case", "rope_type", "theta", "params"), CASES, ids=CASE_IDS)
def test_initialiser_matches_transformers(case, rope_type, theta, params):
    ref_freq, ref_scaling = _hf_init(rope_type, _hf_config(rope_type, theta, params))
    inv_freq, scaling = _ours_init(rope_type, theta, params)
    assert inv_freq.dtype == torch.float32
    assert inv_freq.shape == (HEAD_DIM // 2,)
    torch.testing.assert_close(inv_freq, ref_freq, atol=1e-6, rtol=0)
    assert scaling == ref_scaling


@pytest.mark.parametrize("seq_len", [MPE // 2, MPE + 1, 300, 511])
def test_dynamic_initialiser_with_seq_len(seq_len):
    config = _hf_config("dynamic", 10_000.0, {"factor": 2.0})
    inv_freq, scaling = _ours_init("dynamic", 10_000.0, {"factor": 2.0}, seq_len=seq_len)
    ref_freq, _ = _hf_init("dynamic", config, seq_len=seq_len)
    torch.testing.assert_close(inv_freq, ref_freq, atol=1e-6, rtol=0)
    # At run time transformers passes seq_len as a tensor (fp32 arithmetic); the rebuilt table
    # must follow that path exactly.
    runtime_freq, _ = _hf_init("dynamic", config, seq_len=torch.tensor(seq_len))
    if seq_len > MPE:
        assert torch.equal(inv_freq, runtime_freq)
    assert scaling == 1.0
    if seq_len > MPE:
        assert not torch.equal(inv_freq, _ours_init("dynamic", 10_000.0, {"factor": 2.0})[0])


@pytest.mark.parametrize("case", ["longrope-phi3", "longrope-factor"])
def test_longrope_initialiser_long_factors(case):
    _, rope_type, theta, params = CASES[CASE_IDS.index(case)]
    threshold = params.get("original_max_position_embeddings", MPE)
    config = _hf_config(rope_type, theta, params)
    for seq_len in (threshold, threshold + 1):
        ours, scaling = _ours_init(rope_type, theta, params, seq_len=seq_len)
        ref, ref_scaling = _hf_init(rope_type, config, seq_len=seq_len)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        assert scaling == ref_scaling
    short, _ = _ours_init(rope_type, theta, params, seq_len=threshold)
    long, _ = _ours_init(rope_type, theta, params, seq_len=threshold + 1)
    assert not torch.equal(short, long)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize(("case", "rope_type", "theta", "params"), CASES, ids=CASE_IDS)
def test_forward_matches_transformers(case, rope_type, theta, params):
    generator = torch.Generator().manual_seed(0)
    pos = _per_row_positions(12, generator)
    # Dynamic types act on max(pos); keep it inside the original context here, crossings are
    # tested separately.
    if rope_type in ("dynamic", "longrope"):
        pos = pos % 60
    q = torch.randn(pos.shape[0], pos.shape[1], N_HEADS, HEAD_DIM, generator=generator)
    rope = _ours(rope_type, theta, params)
    hf_rope = LlamaRotaryEmbedding(_hf_config(rope_type, theta, params))
    out = rope(q, input_pos=pos)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, _hf_rotate(hf_rope, q, pos), atol=1e-6, rtol=0)
    assert rope.attention_scaling == hf_rope.attention_scaling


def test_forward_rotates_long_positions_differently_from_short():
    # Guards the parity test against passing trivially (e.g. positions ignored).
    rope = _ours("default", 10_000.0, {})
    q = torch.randn(1, 2, N_HEADS, HEAD_DIM)
    a = rope(q, input_pos=torch.tensor([[0, 1]]))
    b = rope(q, input_pos=torch.tensor([[0, 300]]))
    torch.testing.assert_close(a[:, 0], q[:, 0])
    assert not torch.allclose(a[:, 1], b[:, 1])


# max positions per call: below, across, further past, back inside, at, and across again
DYNAMIC_MAXES = [100, 300, 400, 350, 200, MPE - 1, 300, MPE, 120, 511]
LONGROPE_MAXES = [50, 100, 40, 64, 63, 300, 255, 256, 10]


@pytest.mark.parametrize(
    ("case", "maxes"),
    [
        ("dynamic", DYNAMIC_MAXES),
        ("longrope-phi3", LONGROPE_MAXES),
        ("longrope-factor", LONGROPE_MAXES),
    ],
)
def test_dynamic_types_follow_transformers_across_threshold(case, maxes):
    _, rope_type, theta, params = CASES[CASE_IDS.index(case)]
    rope = _ours(rope_type, theta, params)
    hf_rope = LlamaRotaryEmbedding(_hf_config(rope_type, theta, params))
    generator = torch.Generator().manual_seed(1)
    tables = set()
    for top in maxes:
        pos = torch.randint(0, top + 1, (3, 7), generator=generator)
        pos[1, -1] = top  # the max sits in one row only: the rule is over the whole batch
        q = torch.randn(3, 7, N_HEADS, HEAD_DIM, generator=generator)
        out = rope(q, input_pos=pos)
        torch.testing.assert_close(
            out, _hf_rotate(hf_rope, q, pos), atol=1e-6, rtol=0, msg=f"{top}"
        )
        torch.testing.assert_close(rope.inv_freq, hf_rope.inv_freq, atol=0, rtol=0)
        tables.add(tuple(rope.inv_freq.tolist()))
    assert len(tables) > 1  # the frequencies did change along the way


def test_dynamic_reset_restores_original_table():
    rope = _ours("dynamic", 10_000.0, {"factor": 2.0})
    original = rope.cos_sin.clone()
    address = rope.cos_sin.data_ptr()
    q = torch.randn(1, 1, N_HEADS, HEAD_DIM)
    rope(q, input_pos=torch.tensor([[400]]))
    assert not torch.equal(rope.cos_sin, original)
    rope(q, input_pos=torch.tensor([[10]]))
    assert torch.equal(rope.cos_sin, original)
    assert rope.cos_sin.data_ptr() == address  # rebuilt in place


# --------------------------------------------------------------------------- registry and errors


@pytest.fixture
def scratch_type():
    name = "test_half_speed"
    yield name
    ROPE_INITIALISERS.pop(name, None)


def test_registered_initialiser_is_used(scratch_type):
    @register_rope_initialiser(scratch_type)
    def _half_speed(*, dim, base, max_position_embeddings, params, seq_len=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        return inv_freq * params["speed"], 2.0

    rope = RotaryEmbedding(8, max_seq_len=16, rope_type=scratch_type, params={"speed": 0.5})
    expected = 0.5 / (10_000.0 ** (torch.arange(0, 8, 2).float() / 8))
    torch.testing.assert_close(rope.inv_freq, expected)
    assert rope.attention_scaling == 2.0
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0
    out = rope(x, input_pos=torch.tensor([[3]]))
    angle = 3 * expected[0].item()
    assert out[0, 0, 0, 0].item() == pytest.approx(2.0 * math.cos(angle), abs=1e-6)
    assert out[0, 0, 0, 4].item() == pytest.approx(2.0 * math.sin(angle), abs=1e-6)


def test_duplicate_registration_raises(scratch_type):
    register_rope_initialiser(scratch_type)(ROPE_INITIALISERS["default"])
    with pytest.raises(ValueError, match=scratch_type):
        register_rope_initialiser(scratch_type)(ROPE_INITIALISERS["default"])
    with pytest.raises(ValueError, match="default"):
        register_rope_initialiser("default")(ROPE_INITIALISERS["linear"])


def test_unknown_type_lists_known_ones():
    with pytest.raises(ValueError, match=r"'nope'.*'default'.*'llama3'"):
        RotaryEmbedding(HEAD_DIM, max_seq_len=8, rope_type="nope")


@pytest.mark.parametrize(
    ("rope_type", "params", "missing"),
    [
        ("linear", {}, "factor"),
        ("dynamic", {"factor": None}, "factor"),
        ("yarn", {"original_max_position_embeddings": 64}, "factor"),
        ("llama3", {"factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
        ("longrope", {"long_factor": _LONG}, "short_factor"),
    ],
)
def test_missing_param_names_key_and_type(rope_type, params, missing):
    with pytest.raises(ValueError, match=rf"'{rope_type}'.*'{missing}'"):
        _ours(rope_type, 10_000.0, params)


def test_longrope_factor_length_checked():
    with pytest.raises(ValueError, match="short_factor"):
        _ours("longrope", 10_000.0, {"short_factor": [1.0], "long_factor": _LONG})


@pytest.mark.parametrize("rope_type", ["default", "dynamic"])
@pytest.mark.parametrize("bad", [TABLE, TABLE + 7, -1])
def test_out_of_table_position_raises(rope_type, bad):
    rope = _ours(rope_type, 10_000.0, {"factor": 2.0})
    q = torch.randn(2, 2, N_HEADS, HEAD_DIM)
    pos = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match=rf"position {bad}\b.*{TABLE} positions"):
        rope(q, input_pos=pos)


def test_shape_errors():
    rope = _ours("default", 10_000.0, {})
    with pytest.raises(ValueError, match="input_pos"):
        rope(torch.randn(2, 3, N_HEADS, HEAD_DIM), input_pos=torch.arange(3))
    with pytest.raises(ValueError, match="x of shape"):
        rope(
            torch.randn(2, 3, N_HEADS, HEAD_DIM + 2), input_pos=torch.zeros(2, 3, dtype=torch.long)
        )


# --------------------------------------------------------------------------- dtype, device, state


def test_bf16_keeps_dtype_and_matches_transformers():
    generator = torch.Generator().manual_seed(2)
    pos = _per_row_positions(9, generator)
    q = torch.randn(4, 9, N_HEADS, HEAD_DIM, generator=generator).to(torch.bfloat16)
    _, rope_type, theta, params = CASES[CASE_IDS.index("llama3")]
    out = _ours(rope_type, theta, params)(q, input_pos=pos)
    assert out.dtype == torch.bfloat16
    ref = _hf_rotate(LlamaRotaryEmbedding(_hf_config(rope_type, theta, params)), q, pos)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_buffers_stay_out_of_state_dict_and_follow_device():
    rope = _ours("yarn", 10_000.0, {"factor": 4.0})
    assert rope.state_dict() == {}
    assert rope.cos_sin.dtype == torch.float32 and rope.cos_sin.shape == (TABLE, HEAD_DIM)
    rope.to("meta")
    assert rope.cos_sin.device.type == "meta" and rope.inv_freq.device.type == "meta"
    # A static type never reads positions back to the host, so it runs on a device without data.
    q = torch.empty(2, 3, N_HEADS, HEAD_DIM, device="meta")
    out = rope(q, input_pos=torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert out.shape == q.shape and out.device.type == "meta"


def test_reset_parameters_after_meta_build():
    reference = _ours("llama3", 500_000.0, dict(CASES[CASE_IDS.index("llama3")][3]))
    with torch.device("meta"):
        rope = _ours("llama3", 500_000.0, dict(CASES[CASE_IDS.index("llama3")][3]))
    rope.to_empty(device="cpu")
    rope.reset_parameters()
    assert torch.equal(rope.cos_sin, reference.cos_sin)
    assert torch.equal(rope.inv_freq, reference.inv_freq)
