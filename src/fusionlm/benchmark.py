"""Load, prefill and decode speed of one configuration, as ``fusionlm bench`` reports it."""

from __future__ import annotations

import dataclasses
import resource
import time

import torch

from fusionlm.generation import GenerationStats, SamplingParams, generate_tokens
from fusionlm.inference.decode_step import CompileMode
from fusionlm.loading import load_model
from fusionlm.models.registry import DEFAULT_MODEL


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Seconds and tokens per second; ``peak_rss_mb`` is the process's high-water mark."""

    load_s: float
    warmup_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float


def benchmark(
    source: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    quant: str = "none",
    prompt_len: int = 32,
    new_tokens: int = 64,
    prefill_len: int = 512,
    repeats: int = 3,
    compile: CompileMode = True,
) -> BenchResult:
    """Measure one model configuration at batch size 1, greedy, no stop tokens.

    ``load_s`` covers reading and preparing the weights; ``warmup_s`` one short generation
    (where the decode step is built or loaded, with ``compile``; see ``generate``); together
    they are the cold start.
    Decode is ``new_tokens`` steps after a ``prompt_len`` prompt, prefill a ``prefill_len``
    prompt; each is the best of ``repeats``.
    """
    started = time.perf_counter()
    model = load_model(source, dtype=dtype, quant=quant)
    load_s = time.perf_counter() - started
    vocab = model.vocab_size
    generator = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    def run(tokens: list[int], steps: int) -> GenerationStats:
        stats = GenerationStats(prompt_tokens=len(tokens))
        started = time.perf_counter()
        for _ in generate_tokens(
            model, [tokens], max_new_tokens=steps, sampling=SamplingParams(), compile=compile
        ):
            stats.record(time.perf_counter() - started)
        return stats

    started = time.perf_counter()
    run(prompt(prompt_len), 4)
    warmup_s = time.perf_counter() - started
    decode_s = min(
        stats.first_step_s + stats.decode_s
        for stats in (run(prompt(prompt_len), new_tokens) for _ in range(repeats))
    )
    prefill_s = min(run(prompt(prefill_len), 1).prefill_s for _ in range(repeats))
    return BenchResult(
        load_s=load_s,
        warmup_s=warmup_s,
        prefill_tok_s=prefill_len / prefill_s,
        decode_tok_s=(new_tokens - 1) / decode_s,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
