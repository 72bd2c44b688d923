"""The ``fusionlm`` command: parse, call the library, print.

Errors the user caused (a missing file, a bad option value, a prompt too long) print one
line to stderr and exit with status 2; set ``FUSIONLM_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fusionlm.evaluation import perplexity
from fusionlm.generation import GenerationStats, SamplingParams, generate_stream
from fusionlm.inference.benchmark import benchmark
from fusionlm.loading import QUANTIZATIONS, describe, load_model, load_tokenizer, save_hf
from fusionlm.models.registry import DEFAULT_MODEL
from fusionlm.modules.fusion import DeepFusionModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """A mistake in how the command was called."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        return args.run(args)
    except (UsageError, ValueError, TypeError, OSError) as e:
        if os.environ.get("FUSIONLM_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fusionlm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered name, .gguf file or HF directory (default {DEFAULT_MODEL})",
    )
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    model.add_argument(
        "--quant",
        choices=QUANTIZATIONS,
        default="none",
        help="weight-only linears computing in fp32: bf16 weights, or int8 with group-32 scales",
    )
    model.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )

    decoding = argparse.ArgumentParser(add_help=False)
    decoding.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="decode eagerly instead of with a compiled step (no compile time, slower tokens)",
    )

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, default=256)
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
        "convert", parents=[model], help="write a model as a transformers directory"
    )
    convert.add_argument("source")
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

    evaluate = commands.add_parser("eval", parents=[model], help="measure model quality")
    evaluate.add_argument(
        "--perplexity", required=True, metavar="FILE", help="UTF-8 text file to score"
    )
    evaluate.add_argument("--window", type=int, default=512, help="tokens per scored window")
    evaluate.set_defaults(run=run_eval)

    info = commands.add_parser("info", help="describe a model without loading its weights")
    info.add_argument("source", nargs="?", default=DEFAULT_MODEL)
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
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )


def _load(args: argparse.Namespace):
    started = time.perf_counter()
    model = load_model(args.model, dtype=DTYPES[args.dtype], quant=args.quant)
    tokenizer = load_tokenizer(args.model)
    return model, tokenizer, time.perf_counter() - started


def _messages(args: argparse.Namespace, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": args.system}] if args.system else []) + turns


def _stream_reply(
    model, tokenizer, ids: list[int], args: argparse.Namespace, *, images: Sequence = ()
) -> tuple[str, GenerationStats]:
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


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    _sampling(args)  # validate options before the model loads
    images = _load_images(args.image)  # a bad path fails before the model loads
    model, tokenizer, load_s = _load(args)
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
    image_token = getattr(getattr(model, "config", None), "image_token_index", None)
    if images and image_token is not None and image_token not in ids:
        # A raw prompt without image tokens: the images come first, as Llama 3.2 Vision's.
        ids = [image_token] * len(images) + ids
    _, stats = _stream_reply(model, tokenizer, ids, args, images=images)
    print(f"load {load_s:.2f} s | {stats.summary()}", file=sys.stderr)
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
    print(
        f"loaded {args.model} in {load_s:.2f} s; /reset clears the history, Ctrl-D exits",
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
        reply, stats = _stream_reply(
            model, tokenizer, tokenizer.encode(text, add_special_tokens=False), args
        )
        turns.append({"role": "assistant", "content": reply})
        print(f"[{stats.summary()}]", file=sys.stderr)


def run_convert(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} is not empty; choose another directory or pass --force")
    model = load_model(args.source, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.source)
    save_hf(model, out, tokenizer=tokenizer)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    for name in ("prompt_len", "new_tokens", "prefill_len"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 2")
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    result = benchmark(
        args.model,
        dtype=DTYPES[args.dtype],
        quant=args.quant,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        prefill_len=args.prefill_len,
        repeats=args.repeats,
        compile=args.compile,
    )
    fields = {
        "model": args.model,
        "dtype": args.dtype,
        "quant": args.quant,
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        **dataclasses.asdict(result),
    }
    if args.json:
        print(json.dumps(fields))
    else:
        for key, value in fields.items():
            print(f"{key:<14} {value:.2f}" if isinstance(value, float) else f"{key:<14} {value}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
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
    for key, value in describe(args.source).items():
        print(f"{key:<14} {value}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from fusionlm.training import finetune, load_config

    finetune(load_config(args.config, args.overrides))
    return 0
