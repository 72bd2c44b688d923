"""fusionlm: Llama-family decoders and deep-fusion multimodal models on PyTorch."""

from fusionlm.loading import load_model, save_hf
from fusionlm.models.llama import LlamaConfig, llama
from fusionlm.modules.decoder import TransformerDecoder, disable_kv_cache

__all__ = [
    "LlamaConfig",
    "TransformerDecoder",
    "disable_kv_cache",
    "llama",
    "load_model",
    "save_hf",
]
__version__ = "0.1.0"
