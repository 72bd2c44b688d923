"""LoRA fine-tuning on a CPU with a gain you can measure: reversing a list of words.

The task is generated here, in chat form::

    user:      Reverse the order of these words: river candle tiger
    assistant: tiger candle river

The script measures the default model's exact-match accuracy on held-out word lists (greedy
decoding), fine-tunes a LoRA adapter with ``fusionlm.training.finetune`` for a few minutes,
loads the merged model it wrote, and measures again.

    .venv/bin/python examples/finetune_lora_reverse_words.py       # ~3 minutes on 2 idle cores
    .venv/bin/python examples/finetune_lora_reverse_words.py --steps 60 --task join

It writes the run (metrics, loss curve, adapter, merged model) under ``--out``
(``runs/lora-reverse-words``), replacing what an earlier run left there.

Measured on 2 CPU cores with AVX512-BF16 (torch 2.13): the base model answers 0 of 64 held-out
lists exactly; after 40 LoRA steps (4 packed rows of 256 tokens each, bf16, compiled layers:
the first step compiles for ~22 s, the others take ~2.9 s; 2.4 minutes in all) it answers
62 of 64 (96.9%). In fp32 without compiling, the steps took ~5.7 s and the result was the same.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

import fusionlm
from fusionlm.training import FinetuneConfig, finetune

_WORD_TEXT = (
    "apple river stone cloud green tiger paper music window orange silver garden rocket "
    "candle yellow forest pencil dragon winter summer bridge castle pillow rabbit mirror "
    "planet basket button copper desert engine feather harbor island jungle ladder marble "
    "meadow needle"
)
WORDS = _WORD_TEXT.split()

TASKS = {
    "reverse": (
        "Reverse the order of these words: {}",
        lambda words: " ".join(reversed(words)),
    ),
    "join": ("Join these words with dashes: {}", lambda words: "-".join(words)),
}


def make_items(n: int, *, task: str, rng: random.Random, exclude: set[tuple[str, ...]]):
    question, answer = TASKS[task]
    items, seen = [], set(exclude)
    while len(items) < n:
        words = tuple(rng.sample(WORDS, rng.choice((3, 4))))
        if words in seen:
            continue
        seen.add(words)
        items.append((question.format(" ".join(words)), answer(list(words)), words))
    return items


def accuracy(model, tokenizer, items, *, batch_size: int = 32) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers (surrounding space and a final period ignored)."""
    replies = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [
            tokenizer.encode(
                tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                add_special_tokens=False,
            )
            for q, _, _ in chunk
        ]
        with torch.no_grad():
            out = fusionlm.generate(
                model, prompts, max_new_tokens=16, stop_tokens=tokenizer.stop_ids
            )
        replies += [tokenizer.decode(ids).strip() for ids in out]
    correct = sum(r.rstrip(".") == a for r, (_, a, _) in zip(replies, items, strict=True))
    return correct / len(items), replies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Measures exact-match accuracy before and "
        "after a LoRA fine-tune of the default model: about 6 minutes on 2 idle cores. "
        "Writes the run (metrics.jsonl, loss.png, adapter/, model/) under --out."
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--test", type=int, default=64, help="held-out test items")
    parser.add_argument(
        "--out", default="runs/lora-reverse-words", help="the run's directory (replaced)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    test = make_items(args.test, task=args.task, rng=rng, exclude=set())
    held_out = {words for _, _, words in test}
    val = make_items(32, task=args.task, rng=rng, exclude=held_out)
    train = make_items(3000, task=args.task, rng=rng, exclude=held_out | {w for *_, w in val})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run; resume=true would continue one
    out.mkdir(parents=True)
    for name, items in (("train", train), ("val", val)):
        with (out / f"{name}.jsonl").open("w") as f:
            for question, answer, _ in items:
                f.write(json.dumps({"prompt": question, "response": answer}) + "\n")

    tokenizer = fusionlm.load_tokenizer()
    started = time.perf_counter()
    before, replies = accuracy(fusionlm.load_model(), tokenizer, test)
    print(
        f"base model: {before:.1%} exact match on {len(test)} held-out items "
        f"({time.perf_counter() - started:.0f} s)"
    )
    for (question, answer, _), reply in list(zip(test, replies, strict=True))[:3]:
        print(f"  {question!r} -> {reply!r} (expected {answer!r})")

    config = FinetuneConfig(
        train_data=str(out / "train.jsonl"),
        val_data=str(out / "val.jsonl"),
        output_dir=str(out / "run"),
        seq_len=256,
        batch_size=4,
        max_steps=args.steps,
        learning_rate=1e-3,
        warmup_steps=4,
        lora=True,
        lora_rank=16,
        lora_alpha=32.0,
        lora_targets=["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"],
        seed=args.seed,
    )
    started = time.perf_counter()
    result = finetune(config)
    train_s = time.perf_counter() - started
    print(
        f"LoRA fine-tuning: {args.steps} steps in {train_s / 60:.1f} min; "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
        f"val loss {result.val_loss:.3f}"
    )

    started = time.perf_counter()
    after, replies = accuracy(fusionlm.load_model(result.model_dir), tokenizer, test)
    print(
        f"fine-tuned: {after:.1%} exact match on the same items "
        f"({time.perf_counter() - started:.0f} s)"
    )
    for (question, answer, _), reply in list(zip(test, replies, strict=True))[:3]:
        print(f"  {question!r} -> {reply!r} (expected {answer!r})")
    print(
        f"accuracy {before:.1%} -> {after:.1%}; adapter in {result.adapter_dir}, "
        f"merged model in {result.model_dir}, loss curve {result.plot_path}"
    )


if __name__ == "__main__":
    main()
