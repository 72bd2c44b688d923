"""Rotary position embeddings (RoPE) in transformers' rotate-half layout.

`RotaryEmbedding` rotates queries or keys by per-row positions. The inverse frequencies come from
a registry of initialisers keyed by the `rope_type` of a transformers config (`ROPE_INITIALISERS`);
users add their own with `register_rope_initialiser`. Every initialiser reproduces transformers'
`modeling_rope_utils` numerically, so a checkpoint rotates exactly as it did when it was trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError

__all__ = [
    "ROPE_INITIALISERS",
    "RopeInit",
    "RotaryEmbedding",
    "register_rope_initialiser",
]

RopeInit = Callable[..., tuple[Tensor, float]]
"""`fn(*, dim, base, max_position_embeddings, params, seq_len=None) -> (inv_freq [dim // 2] fp32,
attention_scaling)`. `params` is a config's `rope_scaling`/`rope_parameters` dict without
`rope_type`/`type`/`rope_theta`; `seq_len` is the current sequence length (dynamic types only)."""

ROPE_INITIALISERS: dict[str, RopeInit] = {}


def register_rope_initialiser(name: str) -> Callable[[RopeInit], RopeInit]:
    """Decorator that registers `fn` as the initialiser for `rope_type == name`.

    Raises:
        ValueError: `name` is already registered.
    """

    def decorator(fn: RopeInit) -> RopeInit:
        if name in ROPE_INITIALISERS:
            raise InvalidInputError(f"a RoPE initialiser named {name!r} is already registered")
        ROPE_INITIALISERS[name] = fn
        return fn

    return decorator


def _require(
    params: Mapping[str, Any], key: str, rope_type: str, *, allow_none: bool = False
) -> Any:
    if key not in params or (params[key] is None and not allow_none):
        raise InvalidInputError(
            f"rope_type {rope_type!r} needs the parameter {key!r}; got {sorted(params) or 'none'}"
        )
    return params[key]


def _original_max_positions(params: Mapping[str, Any], max_position_embeddings: int) -> int:
    # transformers' standardize_rope_params fills this in from max_position_embeddings when absent.
    value = params.get("original_max_position_embeddings")
    return max_position_embeddings if value is None else value


def _exponents(dim: int) -> Tensor:
    """`2i / dim` for i in [0, dim // 2), fp32: the exponent of `base` in every RoPE variant."""
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


@register_rope_initialiser("default")
def _init_default(
    *,
    dim: int,
    base: float,
    max_position_embeddings: int,
    params: Mapping[str, Any],
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """The original RoPE: `inv_freq[i] = base ** (-2i / dim)`."""
    return 1.0 / (base ** _exponents(dim)), 1.0


@register_rope_initialiser("linear")
def _init_linear(
    *,
    dim: int,
    base: float,
    max_position_embeddings: int,
    params: Mapping[str, Any],
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """Position interpolation: positions divided by `factor`, i.e. `inv_freq / factor`."""
    factor = _require(params, "factor", "linear")
    return 1.0 / (base ** _exponents(dim)) / factor, 1.0


@register_rope_initialiser("dynamic")
def _init_dynamic(
    *,
    dim: int,
    base: float,
    max_position_embeddings: int,
    params: Mapping[str, Any],
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """Dynamic NTK: past `max_position_embeddings` the base grows with the sequence,
    `base * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))`."""
    factor = _require(params, "factor", "dynamic")
    mpe = max_position_embeddings
    if seq_len is None or seq_len <= mpe:
        seq_len = mpe
        scaled_base = base * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
    else:
        # transformers recomputes this at run time with seq_len as an int tensor, so the base is
        # evaluated in fp32 arithmetic; doing the same keeps the rebuilt table bit-identical.
        length = torch.tensor(seq_len, dtype=torch.int64)
        scaled_base = base * ((factor * length / mpe) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (scaled_base ** _exponents(dim)), 1.0


@register_rope_initialiser("yarn")
def _init_yarn(
    *,
    dim: int,
    base: float,
    max_position_embeddings: int,
    params: Mapping[str, Any],
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """YaRN: interpolate (divide by `factor`) the low frequencies that rotate fewer than `beta_slow`
    times over the original context, keep those rotating more than `beta_fast` times, blend linearly
    in between; cos/sin are scaled by `0.1 * mscale * ln(factor) + 1` (or the given
    `attention_factor`)."""
    factor = _require(params, "factor", "yarn", allow_none=True)
    original = _original_max_positions(params, max_position_embeddings)
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")
    # DeepSeek-V3-style configs leave factor unset and imply it by the two context lengths.
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1) -> float:
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)

    # `or`, not a default: transformers treats 0/None as "unset" too.
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(beta_fast)
    high = correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** _exponents(dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_weight)
        + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq, attention_factor


@register_rope_initialiser("llama3")
def _init_llama3(
    *,
    dim: int,
    base: float,
    max_position_embeddings: int,
    params: Mapping[str, Any],
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """Llama 3.1: wavelengths longer than `original / low_freq_factor` are divided by `factor`,
    shorter than `original / high_freq_factor` kept, and those in between smoothly blended."""
    factor = _require(params, "factor", "llama3")
    low_freq_factor = _require(params, "low_freq_factor", "llama3")
    high_freq_factor = _require(params, "high_freq_factor", "llama3")
    old_context_len = _original_max_positions(params, max_position_embeddings)

    inv_freq = 1.0 / (base ** _exponents(dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


@register_rope_initialiser("longrope")
def _init_longrope(
    *,
    dim: int,
    base: float,
    max_position_embeddings: int,
    params: Mapping[str, Any],
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """LongRoPE (Phi-3): per-dimension rescale factors, `short_factor` up to the original context
    and `long_factor` beyond it; cos/sin scaled by `sqrt(1 + ln(factor) / ln(original))`."""
    short_factor = _require(params, "short_factor", "longrope")
    long_factor = _require(params, "long_factor", "longrope")
    for key, value in (("short_factor", short_factor), ("long_factor", long_factor)):
        if len(value) != dim // 2:
            # A wrong length would silently broadcast (length 1) or fail with a shape error later.
            raise InvalidInputError(
                f"rope_type 'longrope' needs {key} of length dim // 2 = {dim // 2}, got {len(value)}"
            )
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    original = _original_max_positions(params, max_position_embeddings)
    # Phi-3 leaves factor unset and implies it by the two context lengths.
    if factor is None:
        factor = max_position_embeddings / original

    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))

    if seq_len and seq_len > original:
        ext_factors = torch.tensor(long_factor, dtype=torch.float32)
    else:
        ext_factors = torch.tensor(short_factor, dtype=torch.float32)
    return 1.0 / (ext_factors * base ** _exponents(dim)), attention_factor


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over a precomputed fp32 cos/sin table.

    The table holds `cos(p * inv_freq) * attention_scaling` and the matching sin for every position
    `p` in `[0, max_seq_len)`, computed exactly as transformers' `LlamaRotaryEmbedding` computes them,
    so `forward` is a row gather plus the rotate-half update `x * cos + rotate_half(x) * sin`. The
    table is a non-persistent buffer: it follows `.to(device)` and never enters a state dict.

    Dynamic types follow transformers' `dynamic_rope_update`, with `seq_len = max(input_pos) + 1`
    over the whole batch (the only case that syncs with the host). Types whose name contains
    "dynamic" recompute the frequencies for `seq_len` when it grows past the longest length seen so
    far and restore the original ones once it drops below `max_position_embeddings`. "longrope"
    uses its long factors while `seq_len > original_max_position_embeddings` (from `params`, else
    `max_position_embeddings`) and its short factors otherwise. The table is rebuilt (in place)
    whenever the frequencies change.

    KV caches: keys are rotated with the frequencies in force when they are written and are not
    re-rotated later, exactly as in transformers. With a dynamic type, a cached decode that crosses
    the threshold therefore mixes old- and new-frequency keys and differs from a single full
    forward over the same tokens, which rotates every key with the final frequencies.

    Args:
        dim: rotary dimension (the head dim); must be even.
        max_seq_len: number of positions the table covers (the decoder's context).
        base: RoPE theta.
        rope_type: a key of `ROPE_INITIALISERS`.
        params: the config's scaling parameters without `rope_type`/`type`/`rope_theta`.
        max_position_embeddings: the model config's context, given to the initialiser and used by
            the dynamic rules; defaults to `max_seq_len`.

    Raises:
        ValueError: unknown `rope_type`, odd `dim`, or parameters the initialiser rejects.
    """

    def __init__(
        self,
        dim: int,
        *,
        max_seq_len: int,
        base: float = 10_000.0,
        rope_type: str = "default",
        params: Mapping[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        if rope_type not in ROPE_INITIALISERS:
            raise InvalidInputError(
                f"unknown rope_type {rope_type!r}; known: {sorted(ROPE_INITIALISERS)}"
            )
        if dim <= 0 or dim % 2:
            raise InvalidInputError(f"RoPE dim must be a positive even number, got {dim}")
        if max_seq_len <= 0:
            raise InvalidInputError(f"max_seq_len must be positive, got {max_seq_len}")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.rope_type = rope_type
        self.params = dict(params or {})
        self.max_position_embeddings = (
            max_seq_len if max_position_embeddings is None else max_position_embeddings
        )
        self._init_fn = ROPE_INITIALISERS[rope_type]
        if rope_type == "longrope":
            self._rule: str | None = "longrope"
        elif "dynamic" in rope_type:  # transformers' test: user types like "my_dynamic" qualify too
            self._rule = "dynamic"
        else:
            self._rule = None
        self._longrope_threshold = _original_max_positions(
            self.params, self.max_position_embeddings
        )
        self.inv_freq: Tensor
        self.cos_sin: Tensor  # [max_seq_len, dim]: cos of the dim // 2 frequencies, then their sin
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Recompute the original frequencies and the table on the buffers' device, e.g. after
        `to_empty()` from a meta-device build, and forget any dynamic rescaling."""
        self._freq_seq_len: int | None = None
        self._max_seq_len_cached = self.max_position_embeddings
        self._set_frequencies(None)

    def _set_frequencies(self, seq_len: int | None) -> None:
        inv_freq, scaling = self._init_fn(
            dim=self.dim,
            base=self.base,
            max_position_embeddings=self.max_position_embeddings,
            params=self.params,
            seq_len=seq_len,
        )
        if tuple(inv_freq.shape) != (self.dim // 2,):
            raise InvalidInputError(
                f"RoPE initialiser for {self.rope_type!r} returned inv_freq of shape "
                f"{tuple(inv_freq.shape)}, expected ({self.dim // 2},)"
            )
        old = getattr(self, "cos_sin", None)
        device = inv_freq.device if old is None else old.device
        inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            # Same expression as transformers (`position_ids.float() * inv_freq`, cos/sin, then the
            # scaling) so the gathered rows are bit-identical to what it computes per call; the
            # duplicated half of cat(freqs, freqs) is left out since it is equal.
            positions = torch.arange(self.max_seq_len, device=device).float()
            freqs = positions[:, None] * inv_freq[None, :]
            table = torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)
            self._store("inv_freq", inv_freq)
            self._store("cos_sin", table)
        self.attention_scaling = float(scaling)
        self._freq_seq_len = seq_len

    def _store(self, name: str, value: Tensor) -> None:
        old = getattr(self, name, None)
        if (
            old is not None
            and old.shape == value.shape
            and old.dtype == value.dtype
            and old.device == value.device
        ):
            # In place: the address stays stable (CUDA graphs) and under inference_mode the buffer
            # stays a normal tensor that training can still use.
            old.copy_(value)
        else:
            self.register_buffer(name, value, persistent=False)

    def _out_of_table(self, input_pos: Tensor) -> ValueError:
        bad = input_pos[(input_pos < 0) | (input_pos >= self.max_seq_len)]
        position = int(bad.reshape(-1)[0]) if bad.numel() else "?"
        return InvalidInputError(
            f"position {position} is outside the RoPE table of {self.max_seq_len} positions "
            f"(valid: 0..{self.max_seq_len - 1}); raise max_seq_len to cover it"
        )

    def _update_frequencies(self, input_pos: Tensor) -> None:
        lo, hi = torch.stack(torch.aminmax(input_pos)).tolist()
        if lo < 0 or hi >= self.max_seq_len:
            raise self._out_of_table(input_pos)
        seq_len = hi + 1
        if self._rule == "dynamic":
            original = self.max_position_embeddings
            cached = self._max_seq_len_cached
            if seq_len > cached:  # growth
                self._set_frequencies(seq_len)
                self._max_seq_len_cached = seq_len
            if seq_len < original and cached > original:  # back within the original context
                self._set_frequencies(None)
                self._max_seq_len_cached = original
        else:
            # transformers computes the long set with seq_len = original + 1.
            threshold = self._longrope_threshold
            wanted = threshold + 1 if seq_len > threshold else None
            if wanted != self._freq_seq_len:
                self._set_frequencies(wanted)

    def forward(self, x: Tensor, *, input_pos: Tensor) -> Tensor:
        """Rotate `x` by the positions in `input_pos`.

        Args:
            x: `[b, s, n_heads, dim]` queries or keys.
            input_pos: `[b, s]` (or `[1, s]`, shared by all rows) integer positions; packed and
                left-padded batches give every row its own positions.

        Returns:
            `[b, s, n_heads, dim]`, same dtype as `x`.

        Raises:
            ValueError: shapes do not match, or a position lies outside `[0, max_seq_len)`. (On
                accelerators a static type reports this as a device-side assert instead: checking
                would cost a host sync on every call.)
        """
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise InvalidInputError(
                f"expected x of shape [b, s, n_heads, {self.dim}], got {tuple(x.shape)}"
            )
        b, s = x.shape[0], x.shape[1]
        if input_pos.ndim != 2 or input_pos.shape[1] != s or input_pos.shape[0] not in (1, b):
            raise InvalidInputError(
                f"expected input_pos of shape [{b}, {s}] (or [1, {s}]), got {tuple(input_pos.shape)}"
            )
        if self._rule is not None and input_pos.numel():
            self._update_frequencies(input_pos)
        try:
            rows = self.cos_sin.index_select(0, input_pos.reshape(-1))
        except IndexError:
            raise self._out_of_table(input_pos) from None
        # Cast after the gather, as transformers casts its fp32 cos/sin to x.dtype.
        rows = rows.view(*input_pos.shape, 1, self.dim).to(x.dtype)
        cos, sin = rows.chunk(2, dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        # Halves of `x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin)`; the same float operations in
        # the same order, without materialising rotate_half or the doubled tables.
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
            f"rope_type={self.rope_type!r}"
        )
