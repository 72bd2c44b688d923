"""Helpers the tests share: tiny random models and checkpoints, data files, a server process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import httpx
import openai
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers
from torch import nn

from fusionlm import LlamaConfig, llama
from fusionlm.cache import cache_root
from fusionlm.models.vision import vision_transformer
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.lora import get_adapter_params

# -- tiny random models ---------------------------------------------------------------------

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    "tie_word_embeddings": False,
}


def randomize_(model: torch.nn.Module, *, seed: int = 0) -> None:
    """Weights with O(1) logits, so a parity check at 1e-4 can fail (0.02-std init gives ~0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * p.shape[-1] ** -0.5)


def make_hf_llama(directory: Path, **overrides: Any):
    """Build, randomise and save a transformers LlamaForCausalLM; returns it in fp32 eval mode."""
    import transformers

    config = transformers.LlamaConfig(**{**BASE_CONFIG, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
    # str hashes change per process (PYTHONHASHSEED); crc32 gives each directory one model.
    randomize_(model, seed=zlib.crc32(directory.name.encode()) % 1000)
    model.save_pretrained(directory)
    return model.eval()


def tiny(backend: str = "sdpa", **overrides) -> TransformerDecoder:
    fields = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 64,
        **overrides,
    }
    model = llama(LlamaConfig(**fields), attn_backend=backend)
    randomize_(model)
    return model.eval()


# -- deep fusion: a tiny ViT and a decoder of its width -------------------------------------

VOCAB, DIM = 96, 64  # VOCAB is the Llama 3.2 Vision models' text vocabulary too
TOKENS_PER_IMAGE = 17  # (16 / 4) ** 2 patches + the class token
CONFIG = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=DIM,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


def encoder(*, hidden_layers: tuple[int, ...] = (0,)) -> nn.Module:
    """A tiny ViT: 16x16 images, ``TOKENS_PER_IMAGE`` tokens of width ``DIM`` each."""
    return vision_transformer(
        image_size=16,
        patch_size=4,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        out_dim=DIM,
        hidden_layers=hidden_layers,
    )


def plain_decoder(*, num_hidden_layers: int = CONFIG.num_hidden_layers) -> TransformerDecoder:
    """A random llama of ``CONFIG``'s shape."""
    model = llama(dataclasses.replace(CONFIG, num_hidden_layers=num_hidden_layers))
    randomize_(model)
    return model.eval()


# -- Llama 3.2 Vision checkpoints -----------------------------------------------------------

IMAGE = VOCAB  # the <|image|> token, the first row after the text vocabulary

# Tokens per tile: (16 / 4) ** 2 + 1 = 17 and (12 / 4) ** 2 + 1 = 10, padded to 24 and 16.
CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-2tiles": {
        "text": {"num_hidden_layers": 5, "cross_attention_layers": [1, 3]},
        "vision": {
            "image_size": 16,
            "max_num_tiles": 2,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
            "intermediate_layers_indices": [0, 2],
        },
    },
    "mha-llama3-3tiles": {
        "text": {
            "num_hidden_layers": 4,
            "cross_attention_layers": [0, 2],
            "num_key_value_heads": 4,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        "vision": {
            "image_size": 12,
            "max_num_tiles": 3,
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [2, 1], [3, 1]],
            "intermediate_layers_indices": [1],
        },
    },
}


def make_hf_mllama(directory: Path, spec: dict[str, Any]):
    """Build, randomise and save a transformers MllamaForConditionalGeneration (fp32, eval)."""
    import transformers

    text = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **spec["text"],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_global_layers": 2,
        "attention_heads": 4,
        "patch_size": 4,
        **spec["vision"],
    }
    vision["vision_output_dim"] = 32 * (1 + len(vision["intermediate_layers_indices"]))
    config = transformers.MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.MllamaForConditionalGeneration(config)
    randomize_(model, seed=len(directory.name))
    model.save_pretrained(directory)
    return model.eval()


# -- LoRA adapters --------------------------------------------------------------------------


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# -- chat checkpoints and data files --------------------------------------------------------

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_byte_tokenizer(directory: Path) -> int:
    """A byte-level BPE without merges (one token per byte) plus ChatML specials; its size."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return backend.get_vocab_size(with_added_tokens=True)


def make_tiny_model_dir(directory: Path, **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(directory)
    make_hf_llama(directory, **{"vocab_size": vocab, "max_position_embeddings": 128, **overrides})
    return directory


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def arithmetic(n: int, *, start: int = 0) -> list[dict[str, str]]:
    return [
        {"prompt": f"{a}+{a % 7}=", "response": str(a + a % 7)} for a in range(start, start + n)
    ]


# -- caches ---------------------------------------------------------------------------------

MACHINE_KERNELS = cache_root() / "kernels"
"""This machine's builds of fusionlm's CPU kernels, which every test cache shares."""


def empty_cache(directory: Path) -> Path:
    """``directory`` as a fusionlm cache with no compiled decode steps, sharing this
    machine's kernel builds (building them again would only cost time)."""
    directory.mkdir(parents=True, exist_ok=True)
    MACHINE_KERNELS.mkdir(parents=True, exist_ok=True)
    (directory / "kernels").symlink_to(MACHINE_KERNELS, target_is_directory=True)
    return directory


# -- a server process -----------------------------------------------------------------------

MODEL = "smollm2-135m-instruct"


class ServerProcess:
    """A running server: its base URL, an ``openai`` client, its process."""

    def __init__(self, *options: str, api_key: str = "none") -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "fusionlm", "serve", "--port", str(self.port), *options]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
        )
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)
        self.wait_ready()

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("the server did not become ready")

    def metric(self, name: str) -> float:
        """A sample's value from ``/metrics``."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a drain), then a kill if it has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        return self.process.returncode


# -- hostile files: valid small files to mutate, and what reading them may raise -------------

READER_ERRORS = (ValueError, FileNotFoundError)
"""What the readers document for a bad file: ``InvalidInputError`` (a ``ValueError``) naming
what is wrong, or a missing file."""
EXTREMES = (0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 2**40, 2**63 - 1, 2**64 - 1)
"""Counts, lengths, offsets and dimensions a hostile header may claim."""


def small_gguf(path: Path) -> Path:
    """A valid Llama GGUF of 1 layer, hidden size 32, a 64-token byte-level vocabulary, F32
    norms and Q8_0 linears, written with gguf's writer (about 20 KB)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    vocab, hidden, ff = 64, 32, 64
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    letters = [chr(ord("a") + i) for i in range(26)]
    writer.add_token_list([*letters, "ab", "abc", *(f"t{i}" for i in range(vocab - 28))])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden // 2, hidden),
        "blk.0.attn_v.weight": (hidden // 2, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ff, hidden),
        "blk.0.ffn_up.weight": (ff, hidden),
        "blk.0.ffn_down.weight": (hidden, ff),
    }
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and name != "token_embd.weight":
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def small_safetensors_dir(directory: Path) -> Path:
    """A small transformers Llama directory (config.json, model.safetensors)."""
    from safetensors.torch import save_file

    from fusionlm.checkpoint.keys import HF_LLAMA_KEYS

    config = dataclasses.replace(
        CONFIG, vocab_size=64, num_hidden_layers=1, max_position_embeddings=128
    )
    model = llama(config)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    tensors = {
        k: v.contiguous() for k, v in HF_LLAMA_KEYS.rename_to_theirs(model.state_dict()).items()
    }
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def gguf_header_size(data: bytes) -> int:
    """Where a GGUF file's tensor data starts (what precedes it is the header to mutate)."""
    from fusionlm.checkpoint.gguf import _Parser

    parser = _Parser(data, Path("header"))
    parser.header(with_tensors=True)
    return parser.pos


def mutated(data: bytes, edits: list[tuple[int, bytes]], *, keep: int | None) -> bytes:
    """``data`` with ``edits`` (offset, bytes) written over it, then cut to ``keep`` bytes."""
    out = bytearray(data)
    for offset, patch in edits:
        out[offset : offset + len(patch)] = patch[: max(0, len(out) - offset)]
    return bytes(out[:keep] if keep is not None else out)


def gguf_readers() -> list:
    """Every reader of a GGUF file, as ``read(path)``: the model's tensors, the metadata, and
    the tokenizer the metadata describes."""
    from fusionlm.checkpoint.gguf import read_gguf, read_gguf_metadata
    from fusionlm.tokenizer import Tokenizer

    return [
        lambda path: read_gguf(path, dtype=torch.float32),
        lambda path: Tokenizer.from_gguf_metadata(read_gguf_metadata(path)),
    ]


def safetensors_readers() -> list:
    """Every reader of a transformers directory's files, as ``read(directory)``."""
    from fusionlm.checkpoint.hf import read_config, read_safetensors

    return [read_config, lambda directory: read_safetensors(directory, dtype=torch.float32)]


# -- tiny GGUF files of each architecture, with the default model's real vocabulary -----------


def tiny_gguf(path: Path, *, arch: str, seed: int = 0) -> Path:
    """A random 2-layer model of ``arch`` ("llama", "mistral3", "qwen2" with biases on q, k and
    v, or "qwen3" with query and key norms) as
    llama.cpp's converter writes it, F32, with SmolLM2's vocabulary (49152 byte-level
    tokens, its merges, types and special ids): a file llama.cpp loads and runs."""
    import gguf

    from fusionlm.checkpoint.gguf import PERMUTED_QK, read_gguf_metadata
    from fusionlm.checkpoint.keys import GGUF_LLAMA_KEYS
    from fusionlm.models.registry import DEFAULT_MODEL, MODELS

    vocab = read_gguf_metadata(MODELS[DEFAULT_MODEL].path())
    config = dataclasses.replace(
        CONFIG,
        vocab_size=len(vocab["tokenizer.ggml.tokens"]),
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        attention_bias=arch == "qwen2",
        attention_output_bias=False if arch == "qwen2" else None,
        qk_norm=arch == "qwen3",
    )
    torch.manual_seed(seed)
    model = llama(config)
    randomize_(model, seed=seed)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for key, value in vocab.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            else:
                writer.add_string(key, value)
    for name, tensor in GGUF_LLAMA_KEYS.rename_to_theirs(model.state_dict()).items():
        heads = {
            "attn_q.weight": config.num_attention_heads,
            "attn_k.weight": config.num_key_value_heads,
        }
        n_head = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        if arch in PERMUTED_QK and n_head is not None:  # llama.cpp's row order for its RoPE
            tensor = (
                tensor.reshape(n_head, 2, -1, tensor.shape[-1]).swapaxes(1, 2).reshape(tensor.shape)
            )
        writer.add_tensor(name, tensor.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
