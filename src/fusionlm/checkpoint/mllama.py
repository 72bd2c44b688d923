"""transformers' Mllama (Llama 3.2 Vision) directories -> ``DeepFusionModel``.

Checkpoint names are those transformers writes (and the published checkpoints use):
``language_model.model.*``, ``language_model.lm_head.*``, ``vision_model.*``,
``multi_modal_projector.*``. Text layers are renumbered between transformers' interleaved
stack and our fused one by ``MllamaConfig.from_hf_layer``/``to_hf_layer``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from fusionlm.checkpoint.hf import hf_to_ours, read_config, read_safetensors
from fusionlm.checkpoint.keys import HF_LLAMA_KEYS, KeyTable
from fusionlm.files import read_json_object
from fusionlm.models.mllama import MllamaConfig

_LAYER = "layers.{n}."

# Names inside one text layer, relative to the layer (``attn.q_proj.weight``).
SELF_LAYER_KEYS = KeyTable(
    [
        (ours.removeprefix(_LAYER), theirs.removeprefix("model." + _LAYER))
        for ours, theirs in HF_LLAMA_KEYS.pairs
        if ours.startswith(_LAYER)
    ]
)
CROSS_LAYER_KEYS = KeyTable(
    [
        ("attn.q_proj.weight", "cross_attn.q_proj.weight"),
        ("attn.k_proj.weight", "cross_attn.k_proj.weight"),
        ("attn.v_proj.weight", "cross_attn.v_proj.weight"),
        ("attn.output_proj.weight", "cross_attn.o_proj.weight"),
        ("attn.q_norm.weight", "cross_attn.q_norm.weight"),
        ("attn.k_norm.weight", "cross_attn.k_norm.weight"),
        ("ca_norm.weight", "input_layernorm.weight"),
        ("mlp_norm.weight", "post_attention_layernorm.weight"),
        ("ca_scale.scale", "cross_attn_attn_gate"),
        ("mlp_scale.scale", "cross_attn_mlp_gate"),
        *[(ours, theirs) for ours, theirs in SELF_LAYER_KEYS.pairs if ours.startswith("mlp.")],
    ]
)


def _vision_layer_pairs(ours: str, theirs: str, *, gated: bool) -> list[tuple[str, str]]:
    projections = {
        "q_proj": "q_proj",
        "k_proj": "k_proj",
        "v_proj": "v_proj",
        "output_proj": "o_proj",
    }
    pairs = [
        (f"{ours}attn.{a}.weight", f"{theirs}self_attn.{b}.weight") for a, b in projections.items()
    ]
    for param in ("weight", "bias"):
        pairs += [
            (f"{ours}sa_norm.{param}", f"{theirs}input_layernorm.{param}"),
            (f"{ours}mlp_norm.{param}", f"{theirs}post_attention_layernorm.{param}"),
            (f"{ours}mlp.w1.{param}", f"{theirs}mlp.fc1.{param}"),
            (f"{ours}mlp.w2.{param}", f"{theirs}mlp.fc2.{param}"),
        ]
    if gated:
        pairs += [(f"{ours}sa_scale.scale", f"{theirs}gate_attn")]
        pairs += [(f"{ours}mlp_scale.scale", f"{theirs}gate_ffn")]
    return pairs


def _model_pairs() -> list[tuple[str, str]]:
    pairs = [
        # embed_tokens holds the text vocabulary and, after it, the fusion rows: see split below.
        ("decoder.tok_embeddings.weight", "language_model.model.embed_tokens.weight"),
        ("decoder.norm.weight", "language_model.model.norm.weight"),
        ("decoder.output.weight", "language_model.lm_head.weight"),
        ("encoder.patch_embedding.conv.weight", "vision_model.patch_embedding.weight"),
        ("encoder.class_embedding", "vision_model.class_embedding"),
        (
            "encoder.position_embedding.embedding",
            "vision_model.gated_positional_embedding.embedding",
        ),
        ("encoder.position_embedding.gate.scale", "vision_model.gated_positional_embedding.gate"),
        (
            "encoder.position_embedding.tile_embedding.weight",
            "vision_model.gated_positional_embedding.tile_embedding.weight",
        ),
    ]
    for stage in ("pre", "post"):
        ours, theirs = f"encoder.{stage}_", f"vision_model.{stage}_"
        pairs += [
            (
                f"{ours}tile_embedding.embedding.weight",
                f"{theirs}tile_positional_embedding.embedding.weight",
            ),
            (f"{ours}tile_embedding.gate.scale", f"{theirs}tile_positional_embedding.gate"),
        ]
        for param in ("weight", "bias"):
            pairs += [(f"encoder.{stage}_norm.{param}", f"vision_model.layernorm_{stage}.{param}")]
    pairs += [(f"encoder.projection.{p}", f"multi_modal_projector.{p}") for p in ("weight", "bias")]
    pairs += _vision_layer_pairs(
        "encoder." + _LAYER, "vision_model.transformer." + _LAYER, gated=False
    )
    pairs += _vision_layer_pairs(
        "encoder.global_" + _LAYER, "vision_model.global_transformer." + _LAYER, gated=True
    )
    return pairs


_MODEL_PAIRS = _model_pairs()
_HF_TEXT_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_OUR_TEXT_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(fusion_layer\.)?(.+)$")


class MllamaKeyTable(KeyTable):
    """Our names <-> a transformers Mllama checkpoint's, for one layer layout.

    Text-layer keys are renumbered (``MllamaConfig.from_hf_layer``) and renamed with
    ``SELF_LAYER_KEYS`` or ``CROSS_LAYER_KEYS``; everything else is a plain table.
    ``decoder.tok_embeddings.fusion_embedding.weight`` has no name of its own: it is stored
    as the last rows of ``embed_tokens`` (``split_fusion_embedding``).
    """

    def __init__(self, config: MllamaConfig) -> None:
        super().__init__(_MODEL_PAIRS)
        self.config = config

    def to_ours(self, key: str) -> str | None:
        match = _HF_TEXT_LAYER.match(key)
        if match is None:
            return super().to_ours(key)
        index, fused = self.config.from_hf_layer(int(match[1]))
        table, infix = (CROSS_LAYER_KEYS, "fusion_layer.") if fused else (SELF_LAYER_KEYS, "")
        name = table.to_ours(match[2])
        return None if name is None else f"decoder.layers.{index}.{infix}{name}"

    def to_theirs(self, key: str) -> str | None:
        match = _OUR_TEXT_LAYER.match(key)
        if match is None:
            return super().to_theirs(key)
        fused = match[2] is not None
        table = CROSS_LAYER_KEYS if fused else SELF_LAYER_KEYS
        name = table.to_theirs(match[3])
        if name is None:
            return None
        try:
            index = self.config.to_hf_layer(int(match[1]), fused=fused)
        except ValueError:
            return None
        return f"language_model.model.layers.{index}.{name}"


def split_fusion_embedding(state_dict: dict[str, Tensor], *, vocab_size: int) -> None:
    """Move the rows past ``vocab_size`` of the token embedding to the fusion embedding."""
    table = state_dict.pop("decoder.tok_embeddings.weight")
    state_dict["decoder.tok_embeddings.weight"] = table[:vocab_size]
    state_dict["decoder.tok_embeddings.fusion_embedding.weight"] = table[vocab_size:]


def mllama_to_ours(tensors: Mapping[str, Tensor], config: MllamaConfig) -> dict[str, Tensor]:
    """Our state dict from a transformers Mllama checkpoint's tensors.

    Raises:
        ValueError: tensors the layout does not know (listed).
    """
    state_dict = hf_to_ours(tensors, table=MllamaKeyTable(config), tied=False)
    split_fusion_embedding(state_dict, vocab_size=config.text.vocab_size)
    return state_dict


def _read_preprocessor_config(directory: Path) -> dict | None:
    """``preprocessor_config.json`` (image normalisation), or None if the directory has none."""
    path = directory / "preprocessor_config.json"
    return read_json_object(path) if path.is_file() else None


def read_mllama_config(directory: Path) -> MllamaConfig:
    """The architecture of a transformers Mllama directory: ``config.json``, and the image
    normalisation of ``preprocessor_config.json`` if it has one.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: an unsupported or malformed config.
    """
    return MllamaConfig.from_hf(
        read_config(directory), preprocessor=_read_preprocessor_config(directory)
    )


def read_mllama_dir(
    directory: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[MllamaConfig, dict[str, Tensor]]:
    """A transformers Mllama directory's config and its weights under our names.

    Raises:
        FileNotFoundError: missing files.
        ValueError: an unsupported config.
    """
    config = read_mllama_config(directory)
    return config, mllama_to_ours(read_safetensors(directory, dtype=dtype), config)


__all__ = [
    "CROSS_LAYER_KEYS",
    "SELF_LAYER_KEYS",
    "MllamaKeyTable",
    "mllama_to_ours",
    "read_mllama_config",
    "read_mllama_dir",
    "split_fusion_embedding",
]
