"""Tables that rename state-dict keys between a file format and fusionlm."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


class KeyTable:
    """A two-way key renaming built from ``(ours, theirs)`` templates.

    ``{n}`` in a template stands for a layer index, e.g.
    ``("layers.{n}.attn.q_proj.weight", "model.layers.{n}.self_attn.q_proj.weight")``.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._to_ours = [(_compile(theirs), ours) for ours, theirs in self.pairs]
        self._to_theirs = [(_compile(ours), theirs) for ours, theirs in self.pairs]

    def to_ours(self, key: str) -> str | None:
        """Our name for the format's ``key``, or None when the table has no such key."""
        return _rename(key, self._to_ours)

    def to_theirs(self, key: str) -> str | None:
        """The format's name for our ``key``, or None when the table has no such key."""
        return _rename(key, self._to_theirs)

    def rename_to_ours(
        self, state_dict: Mapping[str, object]
    ) -> tuple[dict[str, object], list[str]]:
        """Rename a whole state dict; returns it and the keys the table does not know."""
        renamed, unknown = {}, []
        for key, value in state_dict.items():
            ours = self.to_ours(key)
            if ours is None:
                unknown.append(key)
            else:
                renamed[ours] = value
        return renamed, unknown

    def rename_to_theirs(self, state_dict: Mapping[str, object]) -> dict[str, object]:
        """Rename our state dict to the format's names. KeyError for a key without a mapping."""
        renamed = {}
        for key, value in state_dict.items():
            theirs = self.to_theirs(key)
            if theirs is None:
                raise KeyError(f"no mapping for parameter {key!r}")
            renamed[theirs] = value
        return renamed


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)") + "$")


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            return target.replace("{n}", match.group("n")) if "{n}" in target else target
    return None


# Each Llama tensor by name: ours, transformers', llama.cpp's (GGUF's); {n} is the layer.
_LLAMA_LINEARS = (
    ("attn.q_proj", "self_attn.q_proj", "attn_q"),
    ("attn.k_proj", "self_attn.k_proj", "attn_k"),
    ("attn.v_proj", "self_attn.v_proj", "attn_v"),
    ("attn.output_proj", "self_attn.o_proj", "attn_output"),
    ("mlp.w1", "mlp.gate_proj", "ffn_gate"),
    ("mlp.w2", "mlp.down_proj", "ffn_down"),
    ("mlp.w3", "mlp.up_proj", "ffn_up"),
)
_LLAMA_TENSORS = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
    (
        "layers.{n}.sa_norm.weight",
        "model.layers.{n}.input_layernorm.weight",
        "blk.{n}.attn_norm.weight",
    ),
    (
        "layers.{n}.mlp_norm.weight",
        "model.layers.{n}.post_attention_layernorm.weight",
        "blk.{n}.ffn_norm.weight",
    ),
    (
        "layers.{n}.attn.q_norm.weight",
        "model.layers.{n}.self_attn.q_norm.weight",
        "blk.{n}.attn_q_norm.weight",
    ),
    (
        "layers.{n}.attn.k_norm.weight",
        "model.layers.{n}.self_attn.k_norm.weight",
        "blk.{n}.attn_k_norm.weight",
    ),
    *(
        (
            f"layers.{{n}}.{ours}.{param}",
            f"model.layers.{{n}}.{hf}.{param}",
            f"blk.{{n}}.{gguf}.{param}",
        )
        for ours, hf, gguf in _LLAMA_LINEARS
        for param in ("weight", "bias")
    ),
]
HF_LLAMA_KEYS = KeyTable([(ours, hf) for ours, hf, _ in _LLAMA_TENSORS])
"""Our parameter names <-> transformers' ``LlamaForCausalLM``'s."""
GGUF_LLAMA_KEYS = KeyTable([(ours, gguf) for ours, _, gguf in _LLAMA_TENSORS])
"""Our parameter names <-> llama.cpp's (``convert_hf_to_gguf.py`` naming for ``llama``)."""


__all__ = ["GGUF_LLAMA_KEYS", "HF_LLAMA_KEYS", "KeyTable"]
