"""fusionlm vs transformers vs llama.cpp on the same weights, in one run, as a markdown table.

    make peers                      # llama-cpp-python (compiles llama.cpp, ~8 min), once
    .venv/bin/python benchmarks/compare.py [--threads 2] [--systems fusionlm,transformers,llama.cpp]

``fusionlm`` is the fast path (``--compile``: the decode step compiled ahead of time);
``fusionlm-eager`` the same loop with ``--no-compile``. "cold start" is load plus the first
short generation, where the decode step is built (or loaded, if an earlier run stored it).

Every measurement runs in a fresh subprocess (so peak RSS and thread settings are its own),
``--rounds`` times per system, interleaved with the other systems' (the table keeps each
system's best decode and prefill), at batch size 1: decode = ``--new-tokens`` greedy tokens
after a ``--prompt-len`` prompt, prefill = a ``--prefill-len`` prompt. The weights are the
default model's (SmolLM2-135M-Instruct, shipped as Q4_1): in the int4 mode fusionlm and
llama.cpp both run the shipped file as stored; in the others fusionlm and transformers
dequantize it at load and llama.cpp gets F32 / BF16 / Q8_0 files made from it by llama.cpp's
own quantizer (cached under benchmarks/.cache/). fusionlm's int8 and w8a8 (whose activations are
rounded to int8 too, as llama.cpp computes Q8_0) both run against the Q8_0 file.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

CACHE = Path(__file__).parent / ".cache"
# mode -> (fusionlm options, transformers dtype, llama.cpp file type). fusionlm's bf16 is
# weight-only, as llama.cpp's BF16 file: bf16 weights, fp32 activations (a whole bf16 model,
# ``--dtype bfloat16``, disagrees with fp32 on a quarter of greedy tokens).
MODES = {
    "fp32": (["--quant", "none"], "float32", "F32"),
    "bf16": (["--quant", "bf16"], "bfloat16", "BF16"),
    "int8": (["--quant", "int8"], None, "Q8_0"),
    "w8a8": (["--quant", "w8a8"], None, "Q8_0"),
    "int4": (["--quant", "int4"], None, "Q4_1"),
}
LLAMA_FTYPES = {"F32": 0, "BF16": 32, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_* values


def default_gguf() -> Path:
    from fusionlm.models.registry import DEFAULT_MODEL, MODELS

    return MODELS[DEFAULT_MODEL].path()


def child(argv: list[str]) -> dict:
    """Run ``compare.py --child ...`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_fusionlm(mode: str, args: argparse.Namespace, *, compile: bool) -> dict:
    cmd = [sys.executable, "-m", "fusionlm", "bench", "--json", *MODES[mode][0]]
    cmd += ["--compile"] if compile else ["--no-compile"]
    cmd += ["--threads", str(args.threads), "--prompt-len", str(args.prompt_len)]
    cmd += ["--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fusionlm bench failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def measure_transformers(dtype: str, args: argparse.Namespace) -> dict:
    import warnings

    import torch
    import transformers

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    path = default_gguf()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    ).eval()
    load_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)

    def timed(n_prompt: int, n_new: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (1, n_prompt), generator=generator)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        return time.perf_counter() - started

    started = time.perf_counter()
    timed(args.prompt_len, 4)
    warmup_s = time.perf_counter() - started
    first = min(timed(args.prompt_len, 1) for _ in range(2))
    whole = min(timed(args.prompt_len, args.new_tokens) for _ in range(2))
    prefill = min(timed(args.prefill_len, 1) for _ in range(2))
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "prefill_tok_s": args.prefill_len / prefill,
        "decode_tok_s": (args.new_tokens - 1) / (whole - first),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def llama_cpp_file(ftype: str) -> Path:
    """The shipped file for Q4_1, else the default model requantized by llama.cpp itself
    (allow_requantize: from Q4_1)."""
    import llama_cpp

    if ftype == "Q4_1":
        return default_gguf()
    target = CACHE / f"smollm2-135m-instruct.{ftype}.gguf"
    if not target.exists():
        CACHE.mkdir(exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[ftype]
        params.allow_requantize = True
        partial = target.with_suffix(".partial")
        if (
            llama_cpp.llama_model_quantize(
                str(default_gguf()).encode(), str(partial).encode(), params
            )
            != 0
        ):
            raise RuntimeError(f"llama.cpp could not quantize to {ftype}")
        partial.rename(target)
    return target


def measure_llama_cpp(ftype: str, args: argparse.Namespace) -> dict:
    import llama_cpp
    import numpy as np

    path = llama_cpp_file(ftype)
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=1024,
        n_batch=args.prefill_len,
        n_threads=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return rng.integers(0, llm.n_vocab(), n).tolist()

    def prefill(tokens: list[int]) -> float:
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - started

    def decode(tokens: list[int]) -> float:
        prefill(tokens)
        started = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - started

    started = time.perf_counter()
    decode(prompt(args.prompt_len))
    warmup_s = time.perf_counter() - started
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "prefill_tok_s": args.prefill_len
        / min(prefill(prompt(args.prefill_len)) for _ in range(3)),
        "decode_tok_s": (args.new_tokens - 1)
        / min(decode(prompt(args.prompt_len)) for _ in range(3)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def best(results: list[dict]) -> dict:
    """One system's row from its rounds: the fastest decode and prefill of any round; load,
    cold start and peak RSS from the first (the one a user meets), and the lowest peak RSS of
    any round (a first round that builds the compiled step peaks with the compiler)."""
    return {
        **results[0],
        "decode_tok_s": max(r["decode_tok_s"] for r in results),
        "prefill_tok_s": max(r["prefill_tok_s"] for r in results),
        "least_rss_mb": min(r["peak_rss_mb"] for r in results),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | system | load s | cold start s | decode tok/s | prefill tok/s | peak RSS MB | least peak RSS MB | decode vs llama.cpp | prefill vs llama.cpp | RSS vs llama.cpp | decode vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peers = {r["system"]: r for r in rows if r["mode"] == row["mode"]}

        def ratio(key: str, peer: str, row: dict = row, peers: dict = peers) -> str:
            return (
                f"{row[key] / peers[peer][key]:.2f}x"
                if row["system"].startswith("fusionlm") and peer in peers
                else ""
            )

        lines.append(
            f"| {row['mode']} | {row['system']} | {row['load_s']:.2f} | "
            f"{row['load_s'] + row['warmup_s']:.1f} | {row['decode_tok_s']:.1f} | "
            f"{row['prefill_tok_s']:.0f} | {row['peak_rss_mb']:.0f} | {row['least_rss_mb']:.0f} | "
            f"{ratio('decode_tok_s', 'llama.cpp')} | {ratio('prefill_tok_s', 'llama.cpp')} | "
            f"{ratio('least_rss_mb', 'llama.cpp')} | {ratio('decode_tok_s', 'transformers')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--modes", default=",".join(MODES))
    # This machine's memory bandwidth drifts by tens of percent over minutes: each round
    # measures every system once, interleaved, and the table keeps each one's best.
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--systems", default="fusionlm,fusionlm-eager,transformers,llama.cpp")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    common = ["--threads", str(args.threads), "--prompt-len", str(args.prompt_len)]
    common += ["--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len)]
    if args.child:
        system, setting = args.child
        measure = measure_transformers if system == "transformers" else measure_llama_cpp
        print(json.dumps(measure(setting, args)))
        return

    rows = []
    for mode in args.modes.split(","):
        _, hf_dtype, ftype = MODES[mode]
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for system in args.systems.split(","):
                if system in ("fusionlm", "fusionlm-eager"):
                    result = run_fusionlm(mode, args, compile=system == "fusionlm")
                elif system == "transformers" and hf_dtype is not None:
                    result = child(["transformers", hf_dtype, *common])
                elif system == "llama.cpp":
                    result = child(["llama.cpp", ftype, *common])
                else:
                    continue
                runs.setdefault(system, []).append(result)
                print(f"{mode:5s} {system:12s} {json.dumps(result)}", file=sys.stderr, flush=True)
        rows += [
            {"mode": mode, "system": system, **best(results)} for system, results in runs.items()
        ]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"{date.today()}, {cpu}, {args.threads} threads, Python {platform.python_version()}; "
        f"decode: {args.new_tokens} tokens after a {args.prompt_len}-token prompt; prefill: {args.prefill_len} tokens.\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
