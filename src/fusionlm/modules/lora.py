"""Low-rank adapters (LoRA): ``LoRALinear`` and the functions that put them into a model and out.

``apply_lora`` swaps chosen ``nn.Linear`` projections for ``LoRALinear`` modules that share the
base weight, freezes everything else, and leaves the model computing exactly what it did (the
``B`` matrices start at zero). ``merge_lora`` folds each adapter into its base weight and puts
plain ``nn.Linear`` modules back. Saving adapters in PEFT's layout is in ``checkpoint/peft.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.modules.fusion import set_trainable_params

# Projection names (the attribute of the parent module) that can carry an adapter.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """``y = x Wᵀ + b + (alpha / rank) · B(A(dropout(x)))`` with ``W`` and ``b`` frozen.

    State-dict keys are ``weight``, ``bias`` (if any), ``lora_a.weight`` ``[rank, in]`` and
    ``lora_b.weight`` ``[out, rank]``, so a model's base keys do not change under LoRA.

    Args:
        in_dim, out_dim: the base projection's shape ``[in] -> [out]``.
        rank: the adapter's inner width ``r``.
        alpha: the scale numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input while training.
        use_bias: whether the base projection has a bias.

    The positional order is torchtune's ``LoRALinear(in_dim, out_dim, rank, alpha, dropout)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise InvalidInputError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise InvalidInputError(f"LoRA dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_dim, self.out_dim = in_dim, out_dim
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, **factory), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_dim, **factory), requires_grad=False) if use_bias else None
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, **factory)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_lora_parameters(self) -> None:
        """``A`` as ``nn.Linear`` initialises its weight, ``B`` zero: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0
    ) -> LoRALinear:
        """An adapter around ``linear``, sharing (and freezing) its weight and bias tensors."""
        weight = linear.weight
        lora = cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        lora.weight = nn.Parameter(weight.data, requires_grad=False)
        if linear.bias is not None:
            lora.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return lora

    def delta_weight(self) -> Tensor:
        """``(alpha / rank) · B A``, ``[out, in]``: what merging adds to the base weight."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W + (alpha / rank) · B A``."""
        linear = nn.Linear(
            self.in_dim,
            self.out_dim,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha:g}, dropout={self.dropout_p:g}"
        )


def apply_lora(
    model: nn.Module,
    *,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every ``nn.Linear`` named in ``targets`` with a ``LoRALinear``; freeze the rest.

    Args:
        model: any module tree; projections are matched by their attribute name.
        targets: names from ``LORA_TARGETS`` (``q_proj``, ``k_proj``, ``v_proj``,
            ``output_proj``, ``w1``, ``w2``, ``w3``).

    Returns:
        the qualified names of the wrapped projections.

    Raises:
        ValueError: an unknown target name, no projection matched, or the model already has
            adapters.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise InvalidInputError(
            f"unknown LoRA target(s) {unknown or list(targets)}; choose from {list(LORA_TARGETS)}"
        )
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise InvalidInputError("the model already has LoRA adapters")
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(
                    parent,
                    name,
                    LoRALinear.from_linear(child, rank=rank, alpha=alpha, dropout=dropout),
                )
                wrapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not wrapped:
        raise InvalidInputError(f"no nn.Linear named {list(targets)} in the model")
    set_trainable_params(model, get_adapter_params(model))
    return wrapped


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA ``A`` and ``B`` parameters of ``model`` by qualified name."""
    return {
        f"{module_name}.{name}": param
        for module_name, module in model.named_modules()
        if isinstance(module, LoRALinear)
        for name, param in module.named_parameters()
        if name.startswith(("lora_a.", "lora_b."))
    }


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every ``LoRALinear`` in ``model`` with its merged ``nn.Linear``, in place.

    The merged model computes the same function without the adapter branch and has the
    state-dict keys of the model before ``apply_lora``. Its parameters are trainable again.

    Returns:
        the qualified names of the merged projections.
    """
    merged = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                merged.append(f"{parent_name}.{name}" if parent_name else name)
    if merged:
        for param in model.parameters():
            param.requires_grad_(True)
    return merged


__all__ = ["LORA_TARGETS", "LoRALinear", "apply_lora", "get_adapter_params", "merge_lora"]
