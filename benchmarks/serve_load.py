"""`fusionlm serve` against llama.cpp's `llama-server` under load: same weights, one run, ratios.

    make peers                      # builds .venv/bin/llama-server from llama.cpp's sources, once
    .venv/bin/python benchmarks/serve_load.py [--modes fp32 int8 w8a8 int4] [--concurrency 1 4 8]
        [--rounds 1] [--json results.json] [--only fusionlm|llama-server] [--kv-cache-dtype float16]

Both servers speak the OpenAI API on 127.0.0.1, with the same weights and precision, threads,
slots and context per slot. fp32: ``fusionlm serve`` with the default model (SmolLM2-135M-Instruct,
its Q4_1 GGUF dequantized to fp32) against llama-server on the F32 file ``compare.py`` makes
from the same weights; int8: ``fusionlm serve --quant int8`` against the Q8_0 file; w8a8:
``--quant w8a8`` (int8 activations too, as llama.cpp computes Q8_0) against it as well; int4:
``--quant int4`` against the shipped Q4_1 file, both running its blocks as stored. llama-server
gets ``-np SLOTS -c SLOTS*CTX`` (a KV cache of CTX tokens per slot) and ``--cache-ram 0`` (its
host-memory prompt cache copies slot states whenever a slot changes hands, and adds to its
memory); otherwise its defaults (an f16 KV cache among them). The first start of ``fusionlm
serve`` may compile its decode step for minutes (``--startup-timeout``).

The load is the ``openai`` client's streaming chat (``--max-tokens``, temperature 0, usage in
the last chunk): a closed loop of ``--requests`` distinct questions at each concurrency (that
many workers, each sending its next request when its last reply ends) with prompt reuse off
(``cache_prompt: false``), then a multi-turn run with reuse on: 4 conversations of 4 turns at
concurrency 4, each turn sending the earlier ones. Per request: time to the first content token
(TTFT), gaps between content chunks (ITL), time per output token (TPOT: e2e minus TTFT, over
tokens minus 1), end-to-end time, output tokens (from usage) and the text. Per server and
concurrency: percentiles, requests/s, output tok/s (all completion tokens / the run's wall
time), failures, and "differs": replies whose text differs from the same request's at
concurrency 1 on the same server. Memory: VmHWM and VmRSS of the process listening on the
server's port, after the load. "other load %": CPU time used by neither the server nor this
client during a run, as a share of the machine; a run beside other work is slow, and this says
so. Every request opens its own connection (``new_client`` says why) and is not retried.

Both servers of a pair stay up, but only one gets load at a time: each concurrency level runs
fusionlm, then llama-server, and ``--rounds`` repeats the sweep (this machine's memory bandwidth
drifts by tens of percent over minutes); the tables give each figure's median over rounds
(failures and differs: the sum). ``--json`` writes settings, every request and every summary.

Goal: output tok/s at concurrency 8 at least 1.2x llama-server's, TTFT p50 at concurrency 1 at
most 1.5x llama-server's, no failures, and no reply that differs from its lone run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import date
from http.client import HTTPException
from pathlib import Path

# This script's directory is on sys.path when it runs: compare.py makes the llama.cpp files.
from compare import default_gguf, llama_cpp_file

SERVERS = ("fusionlm", "llama-server")
# mode -> (fusionlm serve options, llama.cpp file type)
MODES = {
    "fp32": (["--quant", "none"], "F32"),
    "int8": (["--quant", "int8"], "Q8_0"),
    "w8a8": (["--quant", "w8a8"], "Q8_0"),
    "int4": (["--quant", "int4"], "Q4_1"),
}
LLAMA_SERVER = Path(sys.executable).parent / "llama-server"  # where `make peers` puts it
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "How do bees make honey?",
    "What causes the seasons on Earth?",
    "Explain what a prime number is.",
    "How does a rainbow form?",
    "What is photosynthesis?",
    "Why do cats purr?",
    "How far away is the Moon?",
    "What is the boiling point of water at sea level?",
    "Who wrote Romeo and Juliet?",
    "How do airplanes stay in the air?",
    "What is the difference between weather and climate?",
    "Why do leaves change color in autumn?",
    "What is a black hole?",
    "How does the heart pump blood?",
    "What are the three states of matter?",
    "Why is the ocean salty?",
    "How do vaccines work?",
    "What is the tallest mountain in the world?",
    "How does a compass work?",
    "What is the speed of light?",
    "Why do we dream?",
    "How are volcanoes formed?",
    "What is the largest planet in the solar system?",
    "How does recycling help the environment?",
    "What is gravity?",
    "Why do onions make people cry?",
    "How do fish breathe underwater?",
    "What is the water cycle?",
    "How do solar panels make electricity?",
    "What is the function of the lungs?",
]
CONVERSATIONS = [
    [
        "I want to start running. Any advice?",
        "How often should I run in the first month?",
        "What should I eat before a run?",
        "How do I avoid knee pain?",
    ],
    [
        "Suggest a name for a small bakery.",
        "Make it sound more French.",
        "Now write a one-line slogan for it.",
        "What should the bakery sell first?",
    ],
    [
        "What is a good first programming language?",
        "Why that one?",
        "Give me a tiny example program in it.",
        "What should I learn after that?",
    ],
    [
        "Plan a day trip to the seaside.",
        "What should I pack?",
        "It might rain. What changes?",
        "Suggest a simple picnic lunch.",
    ],
]
STOP_TIMEOUT_S = 30


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(server: str, mode: str, port: int, args: argparse.Namespace) -> list[str]:
    if server == "fusionlm":
        return [
            sys.executable, "-m", "fusionlm", "serve", *MODES[mode][0],
            "--threads", str(args.threads), "--slots", str(args.slots), "--ctx", str(args.ctx),
            "--host", "127.0.0.1", "--port", str(port),
            *([] if args.kv_cache_dtype is None else ["--kv-cache-dtype", args.kv_cache_dtype]),
        ]  # fmt: skip
    return [
        str(args.llama_server), "-m", str(llama_cpp_file(MODES[mode][1])),
        "-t", str(args.threads), "-np", str(args.slots), "-c", str(args.slots * args.ctx),
        "--cache-ram", "0", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


# No proxy for 127.0.0.1, whatever the environment says.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str) -> int | None:
    """The status of ``GET url``, or None without an answer (refused, reset, timed out)."""
    try:
        with HTTP.open(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:  # 503 while the model loads
        return error.code
    except (OSError, HTTPException):
        return None


class Server:
    """One server process (in its own process group), from start to stop."""

    def __init__(self, name: str, command: list[str], port: int, log_dir: Path):
        self.name, self.command, self.port = name, command, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_dir / f"{name}-{port}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.model = ""
        self.pid = self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float) -> None:
        """Poll ``GET /health`` until 200, then read the model name from ``GET /v1/models``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}) before it was ready: "
                    f"{' '.join(self.command)}\n{self.log_tail()}"
                )
            if http_status(f"{self.url}/health") == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready after {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.5)
        with HTTP.open(f"{self.url}/v1/models", timeout=30) as response:
            self.model = json.load(response)["data"][0]["id"]
        self.pid = listening_pid(self.process.pid, self.port)

    def memory_mb(self) -> dict[str, float]:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        except OSError:  # the server is gone: its failures are in the figures
            return {}
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {key: int(fields[key].split()[0]) / 1024 for key in ("VmHWM", "VmRSS")}

    def stop(self) -> None:
        """SIGTERM to the process group; SIGKILL after ``STOP_TIMEOUT_S``."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(group: int) -> tuple[float, float, float]:
    """CPU seconds used so far by the machine, by process group ``group``, by this process."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(ticks) - ticks[3] - ticks[4]) / TICK  # all but idle and iowait
    used = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[2]) == group:  # after the name: state ppid pgrp ... utime stime
                    used += (int(stat[11]) + int(stat[12])) / TICK
    own = os.times()
    return machine, used, own.user + own.system


def listening_pid(group: int, port: int) -> int:
    """The process of process group ``group`` that holds the socket listening on ``port``."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry.name)) == group and any(
                os.readlink(fd) in sockets for fd in (entry / "fd").iterdir()
            ):
                return int(entry.name)
    return group


# ---------------------------------------------------------------------------------------------
# Load


async def chat(client, model: str, messages: list[dict], args, *, reuse: bool) -> dict:
    """One streamed reply: timings, output tokens and text, or the error that ended it."""
    record: dict = {"ttft_s": None, "itl_s": [], "tpot_s": None, "e2e_s": None}
    record |= {"output_tokens": 0, "text": "", "error": None}
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None

    async def stream() -> None:
        nonlocal usage
        response = await client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body={} if reuse else {"cache_prompt": False},
        )
        async for chunk in response:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    arrivals.append(time.perf_counter())
                    pieces.append(choice.delta.content)

    started = time.perf_counter()
    try:
        await asyncio.wait_for(stream(), args.request_timeout)
    except Exception as error:  # every failure is a figure: HTTP status, stream error, timeout
        cause = f" ({error.__cause__!r})" if error.__cause__ else ""
        record["error"] = f"{type(error).__name__}: {error}{cause}"[:500]
    ended = time.perf_counter()
    record["text"] = "".join(pieces)
    record["output_tokens"] = usage.completion_tokens if usage is not None else len(pieces)
    if record["error"] is None and usage is None:
        record["error"] = "no usage in the stream"
    if record["error"] is None:
        record["e2e_s"] = ended - started
    if arrivals:
        record["ttft_s"] = arrivals[0] - started
        record["itl_s"] = [b - a for a, b in itertools.pairwise(arrivals)]
        if record["output_tokens"] > 1:
            record["tpot_s"] = (ended - arrivals[0]) / (record["output_tokens"] - 1)
    return record


def new_client(server: Server):
    """The openai client, without retries (a failure is a figure) and with a fresh connection
    per request: llama-server closes a connection after each streamed reply although it
    answers ``Keep-Alive``, so a request on a reused one can fail before reaching it."""
    import openai

    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1",
        api_key="none",
        max_retries=0,
        default_headers={"Connection": "close"},
    )


def question(index: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[index]}]


async def closed_loop(server: Server, requests: int, concurrency: int, args) -> dict:
    """``requests`` distinct questions, ``concurrency`` workers, prompt reuse off."""
    client = new_client(server)
    results: list[dict | None] = [None] * requests
    jobs = iter(range(requests))
    deadline = time.monotonic() + args.run_timeout

    async def worker() -> None:
        for index in jobs:  # shared: each worker takes the next question
            if time.monotonic() > deadline:
                results[index] = {"error": "not sent: past --run-timeout", "text": ""}
                continue
            results[index] = await chat(client, server.model, question(index), args, reuse=False)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return {"wall_s": time.perf_counter() - started, "requests": results}


def measured(server: Server, load) -> dict:
    """Run a load coroutine, adding who used the CPU meanwhile: the server (its process group),
    this client, and everything else on the machine (other load makes a run slow)."""
    before = cpu_seconds(server.process.pid)
    result = asyncio.run(load)
    after = cpu_seconds(server.process.pid)
    machine, used, client = (b - a for a, b in zip(before, after, strict=True))
    other = max(0.0, machine - used - client)  # clock ticks: a small difference can go below 0
    result["cpu_s"] = {"server": used, "client": client, "other": other}
    return result


async def multi_turn(server: Server, args) -> dict:
    """Every conversation on its own worker, each turn sending the earlier ones; reuse on."""
    client = new_client(server)
    deadline = time.monotonic() + args.run_timeout

    async def conversation(turns: list[str]) -> list[dict]:
        messages: list[dict] = []
        records = []
        for turn in turns:
            if time.monotonic() > deadline:
                records.append({"error": "not sent: past --run-timeout", "text": ""})
                continue
            messages.append({"role": "user", "content": turn})
            records.append(await chat(client, server.model, list(messages), args, reuse=True))
            if records[-1]["error"] is not None:
                break
            messages.append({"role": "assistant", "content": records[-1]["text"]})
        return records

    started = time.perf_counter()
    try:
        conversations = await asyncio.gather(*(conversation(c) for c in CONVERSATIONS))
    finally:
        await client.close()
    return {"wall_s": time.perf_counter() - started, "conversations": conversations}


# ---------------------------------------------------------------------------------------------
# Figures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def other_load_pct(run: dict) -> float:
    """CPU time used by neither the server nor this client, as a share of the machine."""
    return 100 * run["cpu_s"]["other"] / (run["wall_s"] * (os.cpu_count() or 1))


def summarize(run: dict, records: list[dict], lone: list[dict] | None) -> dict:
    wall = run["wall_s"]
    done = [r for r in records if r["error"] is None]
    summary: dict = {"requests": len(records), "failures": len(records) - len(done)}
    for key in ("ttft_s", "tpot_s", "itl_s"):
        if key == "itl_s":
            values = [gap for r in done for gap in r["itl_s"]]
        else:
            values = [r[key] for r in done if r[key] is not None]
        for q in (50, 90, 99):
            summary[f"{key[:-2]}_p{q}_s"] = percentile(values, q)
    summary["e2e_p50_s"] = percentile([r["e2e_s"] for r in done if r["e2e_s"] is not None], 50)
    summary["requests_per_s"] = len(done) / wall
    summary["output_tok_s"] = sum(r["output_tokens"] for r in done) / wall
    summary["other_load_pct"] = other_load_pct(run)
    summary["differs"] = (
        None
        if lone is None
        else sum(
            r["error"] is None and alone["error"] is None and r["text"] != alone["text"]
            for r, alone in zip(records, lone, strict=True)
        )
    )
    return summary


def combine(summaries: list[dict]) -> dict:
    """Rounds into one row: each figure's median; failures and differs summed."""
    row = {}
    for key in summaries[0]:
        values = [s[key] for s in summaries if s[key] is not None]
        if key in ("failures", "differs"):
            row[key] = sum(values) if values else None
        else:
            row[key] = statistics.median(values) if values else None
    return row


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def ratio(mine: float | None, peer: float | None) -> str:
    return "" if not mine or not peer else f"{mine / peer:.2f}x"


def tables(mode: str, rows: dict, turns: dict, memory: dict, args) -> str:
    """``rows[server][concurrency]``, ``turns[server]``, ``memory[server]``: markdown."""
    lines = [
        f"### {mode}\n",
        "| server | conc | out tok/s | req/s | TTFT p50 ms | p90 | p99 | ITL p50 ms | p90 | p99 "
        "| TPOT p50 ms | p90 | p99 | e2e p50 s | failures | differs | other load % "
        "| tok/s vs llama-server | TTFT p50 vs llama-server |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer = rows.get("llama-server", {})
    for concurrency in args.concurrency:
        for server in rows:
            row = rows[server][concurrency]
            other = peer.get(concurrency, {}) if server == "fusionlm" else {}
            lines.append(
                f"| {server} | {concurrency} | {fmt(row['output_tok_s'])} | "
                f"{fmt(row['requests_per_s'], digits=2)} | "
                + " | ".join(
                    fmt(row[f"{key}_p{q}_s"], 1000)
                    for key in ("ttft", "itl", "tpot")
                    for q in (50, 90, 99)
                )
                + f" | {fmt(row['e2e_p50_s'], digits=2)} | {row['failures']} | "
                f"{'-' if row['differs'] is None else row['differs']} | "
                f"{fmt(row['other_load_pct'], digits=0)} | "
                f"{ratio(row['output_tok_s'], other.get('output_tok_s'))} | "
                f"{ratio(row['ttft_p50_s'], other.get('ttft_p50_s'))} |"
            )
    lines += [
        "",
        f"Multi-turn ({len(CONVERSATIONS)} conversations x {len(CONVERSATIONS[0])} turns at "
        f"concurrency {len(CONVERSATIONS)}, prompt reuse on) and memory after the load:\n",
        "| server | TTFT p50 ms | later turns TTFT p50 ms | out tok/s | failures | other load % "
        "| VmHWM MB | VmRSS MB | tok/s vs llama-server | TTFT p50 vs llama-server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server, row in turns.items():
        other = turns.get("llama-server", {}) if server == "fusionlm" else {}
        mem = memory.get(server, {})
        lines.append(
            f"| {server} | {fmt(row['ttft_p50_s'], 1000)} | {fmt(row['later_ttft_p50_s'], 1000)} "
            f"| {fmt(row['output_tok_s'])} | {row['failures']} | "
            f"{fmt(row['other_load_pct'], digits=0)} | {fmt(mem.get('VmHWM'), digits=0)} | "
            f"{fmt(mem.get('VmRSS'), digits=0)} | "
            f"{ratio(row['output_tok_s'], other.get('output_tok_s'))} | "
            f"{ratio(row['ttft_p50_s'], other.get('ttft_p50_s'))} |"
        )
    if len(rows) == 2 and {1, 8} <= set(args.concurrency):
        mine, theirs = rows["fusionlm"], rows["llama-server"]
        lines.append(
            "\nGoal: tok/s at concurrency 8 "
            f"{ratio(mine[8]['output_tok_s'], theirs[8]['output_tok_s'])} (>= 1.2x), TTFT p50 at "
            f"concurrency 1 {ratio(mine[1]['ttft_p50_s'], theirs[1]['ttft_p50_s'])} (<= 1.5x), "
            f"failures {sum(r['failures'] for r in mine.values())} (0), differs "
            f"{sum(r['differs'] or 0 for r in mine.values())} (0)."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


def run_mode(mode: str, args: argparse.Namespace, log_dir: Path) -> tuple[dict, str]:
    servers: dict[str, Server] = {}
    try:
        for name in args.servers:
            port = free_port()
            servers[name] = Server(name, server_command(name, mode, port, args), port, log_dir)
        for name, server in servers.items():  # started together, so they load side by side
            server.wait_ready(args.startup_timeout)
            print(f"{mode} {name}: pid {server.pid}, model {server.model!r}", file=sys.stderr)
        warm = max(args.concurrency)
        for server in servers.values():  # unmeasured: first requests, every batch size
            asyncio.run(closed_loop(server, min(warm, args.requests), warm, args))
        runs: list[dict] = []
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for name, server in servers.items():
                    run = measured(server, closed_loop(server, args.requests, concurrency, args))
                    runs.append(
                        {"server": name, "round": round_, "concurrency": concurrency, **run}
                    )
                    done = [r for r in run["requests"] if r["error"] is None]
                    failed = len(run["requests"]) - len(done)
                    tokens = sum(r["output_tokens"] for r in done)
                    print(f"round {round_ + 1} {mode} {name} c={concurrency}: "
                          f"{tokens / run['wall_s']:.1f} tok/s, {failed} failed, "
                          f"other load {other_load_pct(run):.0f}%",
                          file=sys.stderr, flush=True)  # fmt: skip
            for name, server in servers.items():
                run = measured(server, multi_turn(server, args))
                runs.append({"server": name, "round": round_, "concurrency": "multi-turn", **run})
                print(f"round {round_ + 1} {mode} {name} multi-turn: {run['wall_s']:.1f} s, "
                      f"other load {other_load_pct(run):.0f}%",
                      file=sys.stderr, flush=True)  # fmt: skip
        memory = {name: server.memory_mb() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    rows: dict[str, dict] = {}
    turns: dict[str, dict] = {}
    for name in servers:
        mine = [r for r in runs if r["server"] == name]
        lone = next((r["requests"] for r in mine if r["concurrency"] == 1), None)
        for run in mine:
            if run["concurrency"] == "multi-turn":
                records = [r for conversation in run["conversations"] for r in conversation]
                later = [r for c in run["conversations"] for r in c[1:] if r["error"] is None]
                run["summary"] = summarize(run, records, None)
                run["summary"]["later_ttft_p50_s"] = percentile(
                    [r["ttft_s"] for r in later if r["ttft_s"] is not None], 50
                )
            else:
                run["summary"] = summarize(run, run["requests"], lone)
        rows[name] = {
            c: combine([r["summary"] for r in mine if r["concurrency"] == c])
            for c in args.concurrency
        }
        turns[name] = combine([r["summary"] for r in mine if r["concurrency"] == "multi-turn"])
    result = {
        "servers": {
            name: {
                "command": server.command,
                "pid": server.pid,
                "model": server.model,
                "memory_mb": memory[name],
                "by_concurrency": {str(c): row for c, row in rows[name].items()},
                "multi_turn": turns[name],
            }
            for name, server in servers.items()
        },
        "runs": runs,
    }
    return result, tables(mode, rows, turns, memory, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help=f"at most {len(QUESTIONS)}")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2048, help="tokens per slot")
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("float32", "float16"),
        help="fusionlm serve's KV cache (default: the model's dtype; llama-server's is float16)",
    )
    parser.add_argument("--json", type=Path, help="write settings, requests and figures here")
    parser.add_argument("--only", choices=SERVERS, help="run one server of each pair")
    parser.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds per server")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds per load run")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not 1 <= args.requests <= len(QUESTIONS):
        parser.error(f"--requests must be 1 to {len(QUESTIONS)}, got {args.requests}")
    if min(args.concurrency) < 1:
        parser.error("every --concurrency must be at least 1")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    args.servers = [args.only] if args.only else list(SERVERS)
    if "llama-server" in args.servers and not os.access(args.llama_server, os.X_OK):
        parser.error(f"no llama-server at {args.llama_server}: run `make peers` first")
    # SIGTERM ends the run like Ctrl-C: the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    log_dir = Path(tempfile.mkdtemp(prefix="serve_load-"))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"server logs: {log_dir}", file=sys.stderr)
    results = {"date": str(date.today()), "cpu": cpu, "settings": settings, "modes": {}}
    output = []
    for mode in args.modes:
        results["modes"][mode], text = run_mode(mode, args, log_dir)
        output.append(text)
        if args.json:  # after every mode, so a later failure keeps the earlier figures
            args.json.write_text(json.dumps(results, indent=1))
    print(
        f"{date.today()}, {cpu}, default model {default_gguf().name}; {args.threads} threads, "
        f"{args.slots} slots x {args.ctx} tokens; {args.requests} requests of {args.max_tokens} "
        f"tokens per concurrency; {args.rounds} round(s), medians"
        f"{'' if args.kv_cache_dtype is None else f'; fusionlm KV cache {args.kv_cache_dtype}'}.\n"
    )
    print("\n\n".join(output))


if __name__ == "__main__":
    main()
