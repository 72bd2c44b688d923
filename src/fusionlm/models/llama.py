"""Llama: its configuration (as transformers writes it) and the builder config -> TransformerDecoder."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusionlm.errors import InvalidInputError
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.decoder import TiedLinear, TransformerDecoder
from fusionlm.modules.feed_forward import FeedForward
from fusionlm.modules.layers import TransformerSelfAttentionLayer
from fusionlm.modules.norm import RMSNorm
from fusionlm.modules.rope import ROPE_INITIALISERS, RotaryEmbedding

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """The architecture of a Llama-family decoder, in transformers' field names.

    ``rope_type``/``rope_theta``/``rope_params`` unify transformers 4.x (``rope_theta`` +
    ``rope_scaling``) and 5.x (``rope_parameters``); ``rope_params`` holds the scaling
    parameters (factor, original_max_position_embeddings, ...) without type and theta.
    ``attention_bias`` puts biases on the q, k, v and output projections (transformers'
    Llama); ``attention_output_bias`` overrides it for the output projection (False for
    qwen2, whose biases are on q, k and v only; None: as ``attention_bias``). ``qk_norm``
    normalises each head's query and key (RMSNorm over ``head_dim``) before RoPE, as qwen3
    does.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_type: str = "default"
    rope_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidInputError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in ROPE_INITIALISERS:
            raise InvalidInputError(
                f"unsupported rope type {self.rope_type!r}; known: {sorted(ROPE_INITIALISERS)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise InvalidInputError(
                f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}"
            )

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the built model accepts.

        Dynamic NTK scaling exists to run past the trained context, up to ``factor`` times it.
        """
        if self.rope_type == "dynamic":
            return int(self.max_position_embeddings * float(self.rope_params.get("factor", 1.0)))
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """Read a transformers ``config.json`` dict (4.x or 5.x form) of a Llama, a Qwen2
        (biases on q, k and v) or a Qwen3 (per-head query and key norms).

        Raises:
            ValueError: a required field is missing, or a value is unsupported.
        """
        missing = [key for key in _REQUIRED if key not in config]
        if missing:
            raise InvalidInputError(f"config.json is missing required field(s) {missing}")
        model_type = config.get("model_type", "llama")
        if config.get("use_sliding_window"):
            raise InvalidInputError(
                f"config.json: {model_type} with use_sliding_window=true is not supported"
            )
        rope_type, rope_theta, rope_params = _rope_from_hf(config)
        heads = config["num_attention_heads"]
        qwen2 = model_type == "qwen2"
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=rope_params,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=qwen2 or config.get("attention_bias", False),
            attention_output_bias=False if qwen2 else None,
            mlp_bias=config.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            hidden_act=config.get("hidden_act", "silu"),
            attention_dropout=float(config.get("attention_dropout") or 0.0),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers 5.x ``config.json`` dict (``rope_parameters`` form): Qwen3's for a
        model with query and key norms, Qwen2's for biases on q, k and v only, else Llama's.

        Raises:
            ValueError: a model none of the three describes.
        """
        fields = dataclasses.asdict(self)
        output_bias = fields.pop("attention_output_bias")
        qk_norm = fields.pop("qk_norm")
        rope_params = dict(fields.pop("rope_params"))
        fields["rope_parameters"] = {
            "rope_type": fields.pop("rope_type"),
            "rope_theta": fields.pop("rope_theta"),
            **rope_params,
        }
        same_biases = output_bias in (None, self.attention_bias)  # on all of q, k, v, o or none
        qwen2_biases = self.attention_bias and output_bias is False
        if qk_norm and same_biases and not self.mlp_bias:
            return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **fields}
        if qwen2_biases and not qk_norm and not self.mlp_bias:
            del fields["attention_bias"], fields["mlp_bias"]  # Qwen2's biases are fixed
            return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **fields}
        if same_biases and not qk_norm:
            return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields}
        raise InvalidInputError(
            "this model's projections (biases on q, k, v but not o, or query and key norms, "
            "together with other differences) match no transformers architecture: no "
            "config.json describes it"
        )


def _rope_from_hf(config: Mapping[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """(rope type, theta, scaling params) from either config generation."""
    if config.get("rope_parameters"):
        params = dict(config["rope_parameters"])
        theta = params.pop("rope_theta", config.get("rope_theta", 10_000.0))
    else:
        params = dict(config.get("rope_scaling") or {})
        theta = config.get("rope_theta", 10_000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    return rope_type, float(theta), params


def llama(
    config: LlamaConfig,
    *,
    attn_backend: str = "sdpa",
    max_seq_len: int | None = None,
    init_weights: bool = True,
) -> TransformerDecoder:
    """Build a Llama decoder.

    Args:
        config: the architecture.
        attn_backend: attention backend name (see ``ATTENTION_BACKENDS``).
        max_seq_len: override the context (default ``config.max_seq_len``).
        init_weights: False creates parameters on the meta device without initialising them,
            for a loader that assigns checkpoint tensors right after (fast loading).
    """
    max_seq_len = max_seq_len if max_seq_len is not None else config.max_seq_len
    rope = llama_rope(config, max_seq_len=max_seq_len)
    with contextlib.nullcontext() if init_weights else torch.device("meta"):
        layers = [
            llama_layer(config, rope=rope, attn_backend=attn_backend, max_seq_len=max_seq_len)
            for _ in range(config.num_hidden_layers)
        ]
        tok_embeddings = (
            nn.Embedding(config.vocab_size, config.hidden_size)
            if init_weights
            # No normal_() on the meta device: it goes through torch's reference ops, whose
            # first use imports the compiler stack (about 1.4 s).
            else nn.Embedding.from_pretrained(
                torch.empty(config.vocab_size, config.hidden_size), freeze=False
            )
        )
        output = (
            TiedLinear(tok_embeddings)
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        model = TransformerDecoder(
            tok_embeddings=tok_embeddings,
            layers=layers,
            max_seq_len=max_seq_len,
            num_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            norm=RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
            output=output,
            config=config,
        )
    return model


def llama_rope(config: LlamaConfig, *, max_seq_len: int) -> RotaryEmbedding:
    """The rotary embedding all of a model's layers share."""
    return RotaryEmbedding(
        config.head_dim,
        max_seq_len=max_seq_len,
        base=config.rope_theta,
        rope_type=config.rope_type,
        params=config.rope_params,
        max_position_embeddings=config.max_position_embeddings,
    )


def llama_mlp(config: LlamaConfig) -> FeedForward:
    """The gated feed-forward block of a layer."""
    d, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
    return FeedForward(
        gate_proj=nn.Linear(d, hidden, bias=bias),
        down_proj=nn.Linear(hidden, d, bias=bias),
        up_proj=nn.Linear(d, hidden, bias=bias),
        activation=ACTIVATIONS[config.hidden_act](),
    )


def llama_layer(
    config: LlamaConfig, *, rope: RotaryEmbedding, attn_backend: str, max_seq_len: int
) -> TransformerSelfAttentionLayer:
    """One pre-norm self-attention layer."""
    d, h, h_kv, hd = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    bias = config.attention_bias
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=h,
        num_kv_heads=h_kv,
        head_dim=hd,
        q_proj=nn.Linear(d, h * hd, bias=bias),
        k_proj=nn.Linear(d, h_kv * hd, bias=bias),
        v_proj=nn.Linear(d, h_kv * hd, bias=bias),
        output_proj=nn.Linear(
            h * hd,
            d,
            bias=bias if config.attention_output_bias is None else config.attention_output_bias,
        ),
        pos_embeddings=rope,
        q_norm=RMSNorm(hd, eps=config.rms_norm_eps) if config.qk_norm else None,
        k_norm=RMSNorm(hd, eps=config.rms_norm_eps) if config.qk_norm else None,
        max_seq_len=max_seq_len,
        attn_dropout=config.attention_dropout,
        backend=attn_backend,
    )
    return TransformerSelfAttentionLayer(
        attn,
        llama_mlp(config),
        sa_norm=RMSNorm(d, eps=config.rms_norm_eps),
        mlp_norm=RMSNorm(d, eps=config.rms_norm_eps),
    )


__all__ = ["LlamaConfig", "llama", "llama_layer", "llama_mlp", "llama_rope"]
