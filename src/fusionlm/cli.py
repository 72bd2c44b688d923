"""The ``fusionlm`` command: parse, call the library, print.

Errors the user caused (a missing file, a bad option value, a prompt too long: an
``OSError`` or a ``fusionlm.errors.FusionlmError``) print one line to stderr and exit with
status 2; anything else is a bug of ours: one line saying so and where the traceback was
written, exit status 1. ``FUSIONLM_DEBUG=1`` raises either with its traceback.

Parsing imports nothing heavy (``--help`` answers before torch loads); each command imports
what it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fusionlm.errors import FusionlmError
from fusionlm.inference.weight_formats import QUANTIZATIONS
from fusionlm.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:  # imported where used: parsing needs none of them
    import torch

    from fusionlm.generation import GenerationStats, SamplingParams
    from fusionlm.modules.decoder import TransformerDecoder
    from fusionlm.serving.local import ServedModel
    from fusionlm.tokenizer import Tokenizer

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_NEW_TOKENS = 256


class UsageError(FusionlmError):
    """A mistake in how the command was called."""


# Commands that leave nothing to finish once their output is flushed (no files to close,
# no workers to join): the ``fusionlm`` executable ends them with ``os._exit``. The orderly
# teardown of an interpreter that imported torch takes ~0.4 s here, a sixth of a short reply.
ENDS_AT_ONCE = ("generate", "chat", "info", "bench", "eval")


def run() -> None:
    """The ``fusionlm`` executable: ``main``, then exit."""
    argv = sys.argv[1:]
    status = main(argv)
    if argv and argv[0] in ENDS_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        if args.run is not run_generate:  # which may take its reply from a server, torchless
            _set_threads(args)
        return args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FUSIONLM_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, (FusionlmError, OSError)):
            print(f"fusionlm: error: {message}", file=sys.stderr)
            return 2
        print(
            f"fusionlm: internal error: {type(e).__name__}: {message} (a bug in fusionlm; the "
            f"traceback is in {_write_traceback()}, FUSIONLM_DEBUG=1 prints it)",
            file=sys.stderr,
        )
        return 1


def _write_traceback() -> str:
    """The exception being handled's traceback, in a new file; returns its path."""
    with tempfile.NamedTemporaryFile(
        "w", prefix="fusionlm-traceback-", suffix=".txt", delete=False
    ) as out:
        traceback.print_exc(file=out)
    return out.name


def _set_threads(args: argparse.Namespace) -> None:
    """Give torch the ``--threads`` the command was given, if any."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    naming = argparse.ArgumentParser(add_help=False)  # how every command names its model
    naming.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered name, .gguf file or HF directory (default {DEFAULT_MODEL})",
    )
    model = argparse.ArgumentParser(add_help=False, parents=[naming])
    model.add_argument("--dtype", choices=DTYPES, default="float32")
    model.add_argument(
        "--quant",
        choices=QUANTIZATIONS,
        default="auto",
        help="weights computing in fp32 activations: auto (default) runs a GGUF file's own "
        "Q4_0/Q4_1/Q4_K (as int4), Q8_0 (int8) or BF16 weights as stored, anything else as "
        "fp32 (none); or convert to bf16, int8 (group-32 scales) or int4 (group-32 scales "
        "and offsets); w8a8: int8 weights with activations rounded to int8 as well, as "
        "llama.cpp's Q8_0 computes (less precise; several times faster for a server's batch)",
    )
    model.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )

    decoding = argparse.ArgumentParser(add_help=False)
    compiling = decoding.add_mutually_exclusive_group()
    compiling.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const=True,
        default="auto",
        help="use the compiled decode step, building it first if it is not stored (about a "
        "minute, once). Without this or --no-compile, generate and chat use a stored step, "
        "or decode eagerly and build it in the background; bench builds it",
    )
    compiling.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=False,
        help="decode eagerly, and build nothing",
    )

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--min-p", type=float, default=None)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--system", default=None, help="system message for chat models")

    gen = commands.add_parser(
        "generate",
        parents=[model, decoding, sampling],
        help="continue a prompt, streaming to stdout",
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    gen.add_argument(
        "--no-server",
        action="store_true",
        help="compute the reply in this process even when a local `fusionlm serve` runs this "
        "model with the same settings (by default the reply comes from it, without loading)",
    )
    gen.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file for a vision model (repeatable; needs fusionlm[vision])",
    )
    gen.set_defaults(run=run_generate)

    chat = commands.add_parser(
        "chat",
        parents=[model, decoding, sampling],
        help="interactive chat; /reset clears, Ctrl-D exits",
    )
    chat.set_defaults(run=run_chat)

    convert = commands.add_parser(
        "convert", parents=[model], help="write the model as a transformers directory"
    )
    convert.add_argument("out_dir")
    convert.add_argument("--force", action="store_true", help="write into a non-empty directory")
    convert.set_defaults(run=run_convert)

    bench = commands.add_parser(
        "bench", parents=[model, decoding], help="measure load, prefill and decode speed (batch 1)"
    )
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--prefill-len", type=int, default=512)
    bench.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=run_bench)

    compile_step = commands.add_parser(
        "compile",
        parents=[model],
        help="build the compiled decode step for a model and settings ahead of time",
    )
    compile_step.add_argument("--batch-size", type=int, default=1)
    compile_step.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help="KV cache slots (a multiple of 256 serves every reply that fits; default: "
        "what `generate` uses with its default --max-new-tokens for a short prompt)",
    )
    _add_kv_cache_dtype(compile_step)
    compile_step.set_defaults(run=run_compile)

    server = commands.add_parser(
        "serve",
        parents=[model, decoding],
        help="an OpenAI-compatible server (needs fusionlm[serve])",
        description="Serve the model over OpenAI's API with continuous batching. Without "
        "--no-compile it uses the compiled decode step for --slots rows of --ctx tokens, "
        "building it first with `fusionlm compile` if it is not stored (/health answers 503 "
        "until it is ready).",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--slots", type=int, default=4, help="requests decoded at once (KV-cache rows)"
    )
    server.add_argument("--ctx", type=int, default=2048, help="tokens per row: prompt and reply")
    server.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a row before 429"
    )
    server.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="require this key as 'Authorization: Bearer KEY' (repeatable)",
    )
    server.add_argument("--api-key-file", help="a file of keys, one per line")
    server.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests may take to finish after SIGTERM",
    )
    _add_kv_cache_dtype(server)
    server.add_argument(
        "--prefill-chunk",
        type=int,
        help="prompt tokens prefilled between two decode steps (default 256, as generate runs "
        "them)",
    )
    server.set_defaults(run=run_serve)

    evaluate = commands.add_parser("eval", parents=[model], help="measure model quality")
    evaluate.add_argument(
        "--perplexity", required=True, metavar="FILE", help="UTF-8 text file to score"
    )
    evaluate.add_argument("--window", type=int, default=512, help="tokens per scored window")
    evaluate.set_defaults(run=run_eval)

    info = commands.add_parser(
        "info", parents=[naming], help="describe the model without loading its weights"
    )
    info.set_defaults(run=run_info)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a model (full or LoRA) from a TOML config; torchrun shards it with FSDP2",
    )
    finetune.add_argument("config", help="TOML file of key = value lines (see docs/finetuning.md)")
    finetune.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key")
    finetune.set_defaults(run=run_finetune)
    return parser


def _sampling(args: argparse.Namespace) -> SamplingParams:
    from fusionlm.generation import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )


def _add_kv_cache_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("float32", "float16"),
        help="the KV cache's dtype (default: --dtype's); float16, llama.cpp's default, halves "
        "its memory and the attention's reads at long contexts, for keys and values rounded "
        "to fp16",
    )


def _dtype(args: argparse.Namespace) -> torch.dtype:
    import torch

    return getattr(torch, args.dtype)


def _kv_cache_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """``--kv-cache-dtype``, None where it is not given (or the command has none)."""
    import torch

    name = getattr(args, "kv_cache_dtype", None)
    return None if name is None else getattr(torch, name)


def _load(args: argparse.Namespace) -> tuple[TransformerDecoder, Tokenizer, float]:
    from fusionlm.loading import load_model, load_tokenizer

    started = time.perf_counter()
    model = load_model(args.model, dtype=_dtype(args), quant=args.quant)
    tokenizer = load_tokenizer(args.model)
    return model, tokenizer, time.perf_counter() - started


def _messages(args: argparse.Namespace, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": args.system}] if args.system else []) + turns


def _stream_reply(
    model: TransformerDecoder,
    tokenizer: Tokenizer,
    ids: list[int],
    args: argparse.Namespace,
    *,
    images: Sequence = (),
) -> tuple[str, GenerationStats]:
    """Stream the reply to stdout; returns its text and ``GenerationStats``."""
    from fusionlm.generation import GenerationStats, generate_stream

    stats = GenerationStats()
    pieces = []
    for piece in generate_stream(
        model,
        tokenizer,
        ids,
        max_new_tokens=args.max_new_tokens,
        sampling=_sampling(args),
        seed=args.seed,
        stop_strings=args.stop,
        stats=stats,
        images=images,
        compile=args.compile,
    ):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces), stats


def _reply_step(
    args: argparse.Namespace, model: TransformerDecoder, prompt_len: int
) -> tuple[Path, int] | None:
    """Where the compiled step a reply decodes with is stored (or would be), and its cache
    length; None with ``--no-compile`` or for a model that decodes eagerly (a fusion model)."""
    from fusionlm.generation import cache_length
    from fusionlm.inference.decode_step import stored_step_path
    from fusionlm.modules.decoder import TransformerDecoder

    if args.compile is False or type(model) is not TransformerDecoder:
        return None
    cache_len = cache_length(prompt_len + args.max_new_tokens, model.max_seq_len)
    return stored_step_path(model, batch_size=1, cache_len=cache_len), cache_len


def _build_if_missing(args: argparse.Namespace, step: tuple[Path, int] | None) -> None:
    """After a reply that decoded without its stored step (``_reply_step``), start building
    it, so the next reply of this length class has it."""
    if step is not None and not step[0].is_file():
        _build_step_in_background(args, *step)


def _build_step_in_background(args: argparse.Namespace, step: Path, cache_len: int) -> None:
    """Start ``fusionlm compile`` for the step this run decoded without, detached and at low
    priority, so later runs load it; ``FUSIONLM_BACKGROUND_COMPILE=0`` turns this off. A build
    that ran and left no step (its log is there) is not started again by itself."""
    from fusionlm.inference.decode_step import build_in_progress

    if os.environ.get("FUSIONLM_BACKGROUND_COMPILE", "1") == "0" or build_in_progress(step):
        return
    log = step.with_suffix(".log")
    if log.is_file():
        print(
            f"fusionlm: decoded eagerly; the last build of the compiled decode step failed "
            f"(see {log}); `fusionlm compile` tries again",
            file=sys.stderr,
        )
        return
    low_priority = ["nice", "-n", "10"] if shutil.which("nice") else []
    command = [*low_priority, *_compile_command(args, batch_size=1, cache_len=cache_len)]
    try:
        start_detached(command, log=log)
    except OSError as error:
        print(f"fusionlm: not building the decode step ({error})", file=sys.stderr)
        return
    print(
        "fusionlm: decoded eagerly; building the compiled decode step in the background "
        f"for later runs (about a minute; log: {log})",
        file=sys.stderr,
    )


def _compile_command(args: argparse.Namespace, *, batch_size: int, cache_len: int) -> list[str]:
    """``fusionlm compile`` for the decode step this process would build: the same model,
    dtype, quantization, KV cache dtype and thread count (the step's key has them all)."""
    import torch

    cache_dtype = getattr(args, "kv_cache_dtype", None)
    return [
        sys.executable, "-m", "fusionlm.cli", "compile", "--model", args.model,
        "--dtype", args.dtype, "--quant", args.quant, "--threads", str(torch.get_num_threads()),
        "--batch-size", str(batch_size), "--cache-len", str(cache_len),
        *([] if cache_dtype is None else ["--kv-cache-dtype", cache_dtype]),
    ]  # fmt: skip


def _step_builder(args: argparse.Namespace) -> Callable[[int, int], None]:
    """The server's ``build_step``: runs ``fusionlm compile`` for its slots and context and
    waits (its progress goes to this process's stderr). Compiling imports and runs Inductor,
    whose memory a process keeps for good: a server that compiled its own step held twice
    the memory for its whole life."""

    def build(batch_size: int, cache_len: int) -> None:
        command = _compile_command(args, batch_size=batch_size, cache_len=cache_len)
        try:
            status = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False
            ).returncode
            failure = f"exit status {status}" if status else None
        except OSError as error:
            failure = str(error)
        if failure:
            print(
                f"fusionlm: building the decode step in another process failed ({failure}); "
                "building it in this one",
                file=sys.stderr,
                flush=True,
            )

    return build


def start_detached(command: list[str], *, log: Path) -> None:
    """Start ``command`` in a session of its own (it outlives this process), its output to
    ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


def _local_server(args: argparse.Namespace) -> ServedModel | None:
    """A running local ``fusionlm serve`` that computes this command's reply exactly as this
    process would (``fusionlm.serving.local``), unless ``--no-server``."""
    if args.no_server:
        return None
    from fusionlm.serving.local import find_server

    return find_server(args.model, dtype=args.dtype, quant=args.quant, threads=args.threads)


def _generate_on_server(args: argparse.Namespace, served: ServedModel) -> bool:
    """Stream the reply from ``served`` to stdout; False, having written nothing, when the
    server cannot take the request now (queue full, shutting down, prompt longer than its
    rows): this process then computes it."""
    from fusionlm.serving.local import ServerError, stream

    chat = served.chat and not args.raw
    body = {
        "model": served.name,
        "max_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = _messages(args, [{"role": "user", "content": args.prompt}])
    else:
        body["prompt"] = args.prompt
    started = time.perf_counter()
    first_s, usage = None, {}
    try:
        for event in stream(served, "/v1/chat/completions" if chat else "/v1/completions", body):
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                text = choice["delta"].get("content") if chat else choice["text"]
                if text:
                    first_s = first_s or time.perf_counter() - started
                    sys.stdout.write(text)
                    sys.stdout.flush()
    except (ServerError, OSError) as error:
        busy = isinstance(error, OSError) or error.status in (429, 503)
        if first_s is not None or not (busy or error.code == "context_length_exceeded"):
            raise UsageError(f"the server at {served.url}: {error}") from None
        print(
            f"fusionlm: the server at {served.url} cannot take this request ({error}); "
            "computing it here",
            file=sys.stderr,
        )
        return False
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - started
    tokens = usage.get("completion_tokens", 0)
    print(
        f"{served.precision} | from the server at {served.url} (pid {served.pid}; --no-server "
        f"computes here) | {tokens} new tok in {elapsed:.2f} s, first after {first_s or 0:.2f} s",
        file=sys.stderr,
    )
    return True


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    served = None if args.image else _local_server(args)
    if served is not None and _generate_on_server(args, served):
        return 0
    _set_threads(args)
    _sampling(args)  # validate options before the model loads
    images = _load_images(args.image)  # a bad path fails before the model loads
    model, tokenizer, load_s = _load(args)
    from fusionlm.inference.quantize import precision
    from fusionlm.modules.fusion import DeepFusionModel

    if images and not isinstance(model, DeepFusionModel):
        raise UsageError(f"{args.model} is a text-only model; --image needs a vision model")
    if tokenizer.is_chat and not args.raw:
        # Chat templates of vision models place an image token for each image content part.
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": args.prompt}]
        text = tokenizer.apply_chat_template(
            _messages(args, [{"role": "user", "content": content if images else args.prompt}])
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(args.prompt)
    image_token = getattr(model.config, "image_token_index", None)
    if images and image_token is not None and image_token not in ids:
        # A raw prompt without image tokens: the images come first, as Llama 3.2 Vision's.
        ids = [image_token] * len(images) + ids
    step = _reply_step(args, model, len(ids))
    mode = "compiled" if step is not None and step[0].is_file() else "eager"
    _, stats = _stream_reply(model, tokenizer, ids, args, images=images)
    print(
        f"{precision(model)} | load {load_s:.2f} s | {mode} decode | {stats.summary()}",
        file=sys.stderr,
    )
    _build_if_missing(args, step)
    return 0


def _load_images(paths: Sequence[str]) -> list:
    if not paths:
        return []
    from fusionlm.images import load_image

    try:
        return [load_image(path) for path in paths]
    except ImportError as e:  # Pillow is an optional dependency
        raise UsageError(str(e)) from None


def run_chat(args: argparse.Namespace) -> int:
    _sampling(args)
    model, tokenizer, load_s = _load(args)
    if not tokenizer.is_chat:
        raise UsageError(f"{args.model} has no chat template; use `fusionlm generate --raw`")
    from fusionlm.inference.quantize import precision

    print(
        f"loaded {args.model} ({precision(model)}) in {load_s:.2f} s; /reset clears the "
        "history, Ctrl-D exits",
        file=sys.stderr,
    )
    turns: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() == "/reset":
            turns.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(_messages(args, turns))
        ids = tokenizer.encode(text, add_special_tokens=False)
        reply, stats = _stream_reply(model, tokenizer, ids, args)
        turns.append({"role": "assistant", "content": reply})
        print(f"[{stats.summary()}]", file=sys.stderr)
        _build_if_missing(args, _reply_step(args, model, len(ids)))  # for a later turn


def run_convert(args: argparse.Namespace) -> int:
    from fusionlm.loading import load_model, load_tokenizer, save_hf

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} is not empty; choose another directory or pass --force")
    model = load_model(args.model, dtype=_dtype(args))
    tokenizer = load_tokenizer(args.model)
    save_hf(model, out, tokenizer=tokenizer)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    for name in ("prompt_len", "new_tokens", "prefill_len"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 2")
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    import dataclasses

    import torch

    from fusionlm.benchmark import benchmark

    # The fast path unless told otherwise: built if not stored (the warm-up shows the cost).
    compile_step = True if args.compile == "auto" else args.compile
    result = benchmark(
        args.model,
        dtype=_dtype(args),
        quant=args.quant,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        prefill_len=args.prefill_len,
        repeats=args.repeats,
        compile=compile_step,
    )
    fields = {
        "model": args.model,
        "dtype": args.dtype,
        "quant": args.quant,
        "threads": torch.get_num_threads(),
        "compile": compile_step,
        **dataclasses.asdict(result),
    }
    if args.json:
        print(json.dumps(fields))
    else:
        for key, value in fields.items():
            print(f"{key:<14} {value:.2f}" if isinstance(value, float) else f"{key:<14} {value}")
    return 0


def run_compile(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    from fusionlm.generation import cache_length
    from fusionlm.inference.decode_step import compile_decode_step

    model, _, _ = _load(args)
    cache_len = (
        args.cache_len
        if args.cache_len is not None
        else cache_length(1 + DEFAULT_MAX_NEW_TOKENS, model.max_seq_len)
    )
    path = compile_decode_step(
        model, batch_size=args.batch_size, cache_len=cache_len, cache_dtype=_kv_cache_dtype(args)
    )
    print(path)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    for name in ("slots", "ctx", "port", "prefill_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    keys = list(args.api_key)
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        keys += [line.strip() for line in lines if line.strip()]
        if not keys:
            raise UsageError(f"{args.api_key_file} holds no keys")
    try:
        from fusionlm.serving.server import serve
    except ImportError as e:
        raise UsageError(
            f"serving needs the serve extra: pip install 'fusionlm[serve]' ({e})"
        ) from None
    from fusionlm.inference.quantize import precision
    from fusionlm.loading import load_model, load_tokenizer
    from fusionlm.serving.local import LOOPBACK_HOSTS, ServedModel, model_identity, registered

    tokenizer = load_tokenizer(args.model)
    # A registered name as it is; a file or directory by its name.
    name = Path(args.model).stem if Path(args.model).exists() else args.model
    records = contextlib.ExitStack()

    def load() -> TransformerDecoder:
        model = load_model(args.model, dtype=_dtype(args), quant=args.quant)
        # Offered to this machine's generate commands, whose replies must be what they would
        # compute themselves: not with a narrower KV cache.
        same_cache = args.kv_cache_dtype in (None, args.dtype)
        if args.host in LOOPBACK_HOSTS and not keys and same_cache:
            import torch

            served = ServedModel(
                url=f"http://{args.host}:{args.port}",
                pid=os.getpid(),
                name=name,
                weights=model_identity(args.model),
                dtype=args.dtype,
                quant=args.quant,
                threads=torch.get_num_threads(),
                chat=tokenizer.is_chat,
                precision=precision(model),
            )
            records.enter_context(registered(served))
        cache = "" if same_cache else f", {args.kv_cache_dtype} KV cache"
        print(
            f"fusionlm: serving {args.model} ({precision(model)}{cache}), {args.slots} slots "
            f"of {args.ctx} tokens, on http://{args.host}:{args.port}",
            file=sys.stderr,
            flush=True,
        )
        return model

    with records:
        serve(
            load,
            tokenizer,
            model_name=name,
            host=args.host,
            port=args.port,
            slots=args.slots,
            ctx=args.ctx,
            max_queue=args.max_queue,
            api_keys=keys,
            drain_timeout=args.drain_timeout,
            compile=True if args.compile == "auto" else args.compile,
            build_step=_step_builder(args),
            cache_dtype=_kv_cache_dtype(args),
            **({} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}),
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from fusionlm.evaluation import perplexity

    path = Path(args.perplexity)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text: {e}") from None
    model, tokenizer, _ = _load(args)
    ids = tokenizer.encode(text)
    print(f"perplexity {perplexity(model, ids, window=args.window):.4f} ({len(ids)} tokens)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from fusionlm.loading import describe

    for key, value in describe(args.model).items():
        print(f"{key:<14} {value}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from fusionlm.training import finetune, load_config

    finetune(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    run()
