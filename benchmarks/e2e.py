"""`fusionlm generate` end to end against llama.cpp: whole processes, wall time, one run.

    make peers                                  # llama-cpp-python, once
    .venv/bin/python benchmarks/e2e.py [--rounds 3] [--threads 2] [--contention]

What a user waits for: a fresh process per reply, from start to exit, with warm page
caches (one unmeasured run of each command first) and the compiled decode step already
stored (``fusionlm compile`` runs before the first round). fusionlm runs its command line,
``fusionlm generate --max-new-tokens N`` with the default model (the chat template applied);
llama.cpp runs llama-cpp-python's ``Llama(...).create_chat_completion(..., temperature=0)``
on the F32 and Q8_0 files ``compare.py`` makes from the same weights, and on the shipped Q4_1
file for int4 (``--quant int4``, which is also what ``fusionlm generate`` runs by default). Rounds interleave
every command (this machine's memory bandwidth drifts by tens of percent over minutes);
the table gives each command's median wall time and the tokens it produced.

``--contention`` adds decode speed with 0, 1 and 2 busy loops (``python -c "while True:
pass"``) beside it, each system as a ratio to its own idle speed (``fusionlm bench`` and
``compare.py``'s llama.cpp loop).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

# This script's directory is on sys.path when it runs: compare.py makes the llama.cpp files.
from compare import default_gguf, llama_cpp_file, measure_llama_cpp

FUSIONLM = [sys.executable, "-m", "fusionlm"]
# mode -> (fusionlm options, llama.cpp file type)
MODES = {
    "fp32": (["--quant", "none"], "F32"),
    "int8": (["--quant", "int8"], "Q8_0"),
    "int4": (["--quant", "int4"], "Q4_1"),
}
REPLY_LENGTHS = (16, 200)
# The default model answers this with more than 200 tokens, so every reply runs its length.
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def fusionlm_command(mode: str, new_tokens: int, args: argparse.Namespace, *, compile: bool):
    return [
        *FUSIONLM, "generate", *MODES[mode][0], "--threads", str(args.threads),
        "--max-new-tokens", str(new_tokens), "--compile" if compile else "--no-compile",
        PROMPT,
    ]  # fmt: skip


def llama_cpp_command(mode: str, new_tokens: int, args: argparse.Namespace) -> list[str]:
    path = llama_cpp_file(MODES[mode][1])
    return [
        sys.executable, __file__, "--chat-child", str(path), str(new_tokens),
        "--threads", str(args.threads),
    ]  # fmt: skip


def chat_child(path: str, new_tokens: int, threads: int) -> None:
    """One llama.cpp reply, as a user of llama-cpp-python would write it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, verbose=False)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=new_tokens,
        temperature=0.0,
    )
    print(reply["choices"][0]["message"]["content"])
    print(f"{reply['usage']['completion_tokens']} new tok", file=sys.stderr)


def timed(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, new tokens) of one whole process."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{stderr[-2000:]}")
    found = re.findall(r"(\d+) new tok", stderr)
    return wall, usage.ru_maxrss / 1024, int(found[-1]) if found else -1


def end_to_end(args: argparse.Namespace) -> None:
    commands: dict[tuple[str, int, str], list[str]] = {}
    for mode in args.modes.split(","):
        for new_tokens in REPLY_LENGTHS:
            commands[mode, new_tokens, "fusionlm"] = fusionlm_command(
                mode, new_tokens, args, compile=True
            )
            commands[mode, new_tokens, "fusionlm-eager"] = fusionlm_command(
                mode, new_tokens, args, compile=False
            )
            commands[mode, new_tokens, "llama.cpp"] = llama_cpp_command(mode, new_tokens, args)
    print("warming up (builds the compiled decode steps if not stored)", file=sys.stderr)
    for command in commands.values():
        timed(command)
    runs: dict[tuple[str, int, str], list[tuple[float, float, int]]] = {}
    for round_ in range(args.rounds):
        for name, command in commands.items():
            runs.setdefault(name, []).append(timed(command))
            wall, rss, tokens = runs[name][-1]
            print(f"round {round_ + 1} {name}: {wall:.2f} s {rss:.0f} MB {tokens} tok",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(
        "| mode | reply | system | tokens | wall s (median) | min | max | peak RSS MB | vs llama.cpp |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, new_tokens, system), results in runs.items():
        walls = [wall for wall, _, _ in results]
        peer = statistics.median(w for w, _, _ in runs[mode, new_tokens, "llama.cpp"])
        median = statistics.median(walls)
        ratio = f"{median / peer:.2f}x" if system != "llama.cpp" else ""
        print(
            f"| {mode} | {new_tokens} | {system} | {results[-1][2]} | {median:.2f} | "
            f"{min(walls):.2f} | {max(walls):.2f} | {max(r for _, r, _ in results):.0f} | {ratio} |"
        )


@contextmanager
def busy_loops(count: int):
    """``count`` processes spinning on the CPU for as long as the block runs."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def contention(args: argparse.Namespace) -> None:
    """Decode tok/s idle and beside 1 and 2 busy loops, each as a share of idle."""
    print("\n| mode | system | idle tok/s | 1 busy loop | 2 busy loops |")
    print("|---|---|---|---|---|")
    for mode in args.modes.split(","):
        fusionlm = [
            *FUSIONLM, "bench", "--json", "--compile", *MODES[mode][0], "--threads",
            str(args.threads), "--repeats", "2", "--prefill-len", "64",
        ]  # fmt: skip
        llama_cpp = [sys.executable, __file__, "--decode-child", MODES[mode][1]]
        llama_cpp += ["--threads", str(args.threads)]
        speeds: dict[str, list[float]] = {"fusionlm": [], "llama.cpp": []}
        for loops in range(3):
            with busy_loops(loops):
                for system, command in (("fusionlm", fusionlm), ("llama.cpp", llama_cpp)):
                    out = subprocess.run(
                        command, capture_output=True, text=True, check=True, timeout=600
                    )
                    speeds[system].append(json.loads(out.stdout)["decode_tok_s"])
                    print(f"{mode} {system} {loops} loops: {speeds[system][-1]:.1f} tok/s",
                          file=sys.stderr, flush=True)  # fmt: skip
        for system, (idle, one, two) in speeds.items():
            print(
                f"| {mode} | {system} | {idle:.1f} | {one:.1f} ({one / idle:.2f}) | "
                f"{two:.1f} ({two / idle:.2f}) |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--contention", action="store_true")
    parser.add_argument("--chat-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--decode-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chat_child:
        chat_child(args.chat_child[0], int(args.chat_child[1]), args.threads)
        return
    if args.decode_child:
        settings = argparse.Namespace(
            threads=args.threads, prompt_len=32, new_tokens=64, prefill_len=128
        )
        print(json.dumps(measure_llama_cpp(args.decode_child, settings)))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    print(f"default model: {default_gguf().name}; {args.threads} threads; {args.rounds} rounds\n")
    end_to_end(args)
    if args.contention:
        contention(args)


if __name__ == "__main__":
    main()
