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

``fusionlm-served`` is the same ``fusionlm generate`` command while a ``fusionlm serve``
started by this script (default slots and context, the same quantization and threads) runs
the model: the command finds it and takes its reply from it, importing no torch (a model
kept resident between commands, as Ollama's command line does). Its server reuses cached
prompt prefixes, so each round asks a different story (the chat template's system header is
what repeats); its peak RSS column is the command's, the server's is printed below the table.

``--contention`` adds decode speed with 0, 1 and 2 busy loops (``python -c "while True:
pass"``) beside it, each system as a ratio to its own idle speed (``fusionlm bench`` and
``compare.py``'s llama.cpp loop).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
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
SYSTEMS = ("fusionlm", "fusionlm-eager", "fusionlm-served", "llama.cpp")
# The default model answers these with more than 200 tokens, so every reply runs its length.
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
SUBJECTS = ("a bottle", "a drawer", "a book", "a boot", "a coat", "a tin", "a jar", "a box")


def prompt(round_: int) -> str:
    """Round 0 (the warm-up) and later rounds each ask for another story."""
    return PROMPT.replace("a bottle", SUBJECTS[round_ % len(SUBJECTS)])


def command(
    system: str, mode: str, new_tokens: int, round_: int, args: argparse.Namespace
) -> list[str]:
    if system == "llama.cpp":
        return [
            sys.executable, __file__, "--chat-child", str(llama_cpp_file(MODES[mode][1])),
            str(new_tokens), prompt(round_), "--threads", str(args.threads),
        ]  # fmt: skip
    where = [] if system == "fusionlm-served" else ["--no-server"]
    return [
        *FUSIONLM, "generate", *MODES[mode][0], "--threads", str(args.threads),
        "--max-new-tokens", str(new_tokens),
        "--no-compile" if system == "fusionlm-eager" else "--compile", *where, prompt(round_),
    ]  # fmt: skip


@contextmanager
def resident_servers(modes: list[str], args: argparse.Namespace):
    """A ``fusionlm serve`` per mode on 127.0.0.1 and a free port while the block runs;
    yields ``{mode: pid}``."""
    servers = {}
    try:
        for mode in modes:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            servers[mode] = (port, subprocess.Popen(
                [*FUSIONLM, "serve", *MODES[mode][0], "--threads", str(args.threads),
                 "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        print("starting a server per mode (builds their decode steps if not stored)",
              file=sys.stderr, flush=True)  # fmt: skip
        for mode, (port, process) in servers.items():
            deadline = time.monotonic() + 600
            while not healthy(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {mode} server did not become ready")
                time.sleep(0.5)
        yield {mode: process.pid for mode, (_, process) in servers.items()}
    finally:
        for _, process in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))


def chat_child(path: str, new_tokens: int, text: str, threads: int) -> None:
    """One llama.cpp reply, as a user of llama-cpp-python would write it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, verbose=False)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": text}],
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
    modes = args.modes.split(",")
    names = [(m, n, system) for m in modes for n in REPLY_LENGTHS for system in SYSTEMS]
    with resident_servers(modes, args) as servers:
        print("warming up (builds the compiled decode steps if not stored)", file=sys.stderr)
        for mode, new_tokens, system in names:
            timed(command(system, mode, new_tokens, 0, args))
        runs: dict[tuple[str, int, str], list[tuple[float, float, int]]] = {}
        for round_ in range(1, args.rounds + 1):
            for name in names:
                mode, new_tokens, system = name
                runs.setdefault(name, []).append(
                    timed(command(system, mode, new_tokens, round_, args))
                )
                wall, rss, tokens = runs[name][-1]
                print(f"round {round_} {name}: {wall:.2f} s {rss:.0f} MB {tokens} tok",
                      file=sys.stderr, flush=True)  # fmt: skip
        server_rss = {mode: peak_rss_mb(pid) for mode, pid in servers.items()}
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
    print()
    for mode, rss in server_rss.items():
        print(f"{mode} server (fusionlm-served): peak RSS {rss:.0f} MB")


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
    parser.add_argument("--chat-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--decode-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chat_child:
        path, new_tokens, text = args.chat_child
        chat_child(path, int(new_tokens), text, args.threads)
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
