"""The weight formats of ``quantize`` and ``--quant``, importable without torch."""

WEIGHT_FORMATS = ("bf16", "int8")
QUANTIZATIONS = ("none", *WEIGHT_FORMATS)

__all__ = ["QUANTIZATIONS", "WEIGHT_FORMATS"]
