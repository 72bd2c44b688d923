"""The weight formats of ``quantize`` and ``--quant``, importable without torch."""

WEIGHT_FORMATS = ("bf16", "int8", "int4", "w8a8")
QUANTIZATIONS = ("auto", "none", *WEIGHT_FORMATS)
"""``load_model``'s ``quant``: ``"auto"`` is a file's own format where a kernel runs it."""

__all__ = ["QUANTIZATIONS", "WEIGHT_FORMATS"]
