"""fusionlm: Llama-family decoders and deep-fusion multimodal models on PyTorch."""

from fusionlm.generation import SamplingParams, generate, generate_stream
from fusionlm.loading import describe, load_model, load_tokenizer, save_hf
from fusionlm.models.llama import LlamaConfig, llama
from fusionlm.modules.decoder import TransformerDecoder, disable_kv_cache
from fusionlm.tokenizer import Tokenizer

__all__ = [
    "LlamaConfig",
    "SamplingParams",
    "Tokenizer",
    "TransformerDecoder",
    "describe",
    "disable_kv_cache",
    "generate",
    "generate_stream",
    "llama",
    "load_model",
    "load_tokenizer",
    "save_hf",
]
__version__ = "0.1.0"
