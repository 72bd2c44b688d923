"""Fine-tuning throughput and peak memory: fusionlm vs transformers on the default model.

One run measures four loops over identical random token rows (sequence 512 by default), each
in a fresh subprocess so its peak RSS is its own (model, gradients, optimizer state and
activations; the loading phase peaks far lower): fusionlm full fine-tuning, fusionlm LoRA,
transformers full fine-tuning, and transformers + PEFT LoRA (skipped without ``peft``). Every
loop is the same: forward, mean token cross-entropy, backward, AdamW step, in fp32. fusionlm
uses its chunked loss (``num_output_chunks=8``); transformers computes its loss from whole logits.
Throughput is from the median step time (and the best step, which is what an idle machine
gives: on a shared CPU, other processes stretch some steps).

    python benchmarks/finetune_throughput.py                 # seq 512, batch 1, 2 + 5 steps
    python benchmarks/finetune_throughput.py --steps 8 --bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("fusionlm-full", "fusionlm-lora", "transformers-full", "transformers-lora")
LORA = {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}


def child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    rows = torch.randint(0, 49152, (args.warmup + args.steps, args.batch, args.seq + 1))
    if args.variant.startswith("fusionlm"):
        import fusionlm
        from fusionlm.modules.lora import apply_lora
        from fusionlm.modules.loss import CEWithChunkedOutputLoss

        model = fusionlm.load_model(args.model_dir).train()
        if args.variant.endswith("lora"):
            apply_lora(model, targets=LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"])
        model.set_num_output_chunks(8)
        loss_fn = CEWithChunkedOutputLoss(8)

        def loss_of(tokens, labels):
            return loss_fn(model(tokens), labels)

    else:
        import warnings

        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
            ).train()
        if args.variant.endswith("lora"):
            import peft

            config = peft.LoraConfig(
                r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"]
            )
            model = peft.get_peft_model(model, config)

        def loss_of(tokens, labels):
            logits = model(input_ids=tokens).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    losses, times = [], []
    for i, row in enumerate(rows):
        started = time.perf_counter()
        with autocast:
            loss = loss_of(row[:, :-1], row[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    tokens = args.batch * args.seq
    return {
        "variant": args.variant,
        "tokens_per_s": tokens / statistics.median(times),
        "best_tokens_per_s": tokens / min(times),
        "step_s": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "first_loss": losses[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", dest="variant", choices=VARIANTS)
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    import torch

    import fusionlm

    with tempfile.TemporaryDirectory() as tmp:
        # Both libraries start from the same fp32 weights: the default model written as a
        # transformers directory.
        fusionlm.save_hf(fusionlm.load_model(args.model), tmp)
        print(
            f"fine-tuning {args.model}: batch {args.batch} x seq {args.seq}, "
            f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.warmup} warmup + {args.steps} "
            f"timed steps, torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print(
            f"{'loop':<20} {'trainable':>10} {'tokens/s':>9} {'best':>6} {'s/step':>7} "
            f"{'peak RSS MiB':>13} {'first loss':>11}"
        )
        for variant in args.variants.split(","):
            command = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--model-dir",
                tmp,
                "--seq",
                str(args.seq),
                "--batch",
                str(args.batch),
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
            ] + (["--bf16"] if args.bf16 else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"{variant:<20} skipped: {reason}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{variant:<20} {r['trainable_m']:>9.2f}M {r['tokens_per_s']:>9.0f} "
                f"{r['best_tokens_per_s']:>6.0f} {r['step_s']:>7.2f} {r['peak_rss_mib']:>13.0f} "
                f"{r['first_loss']:>11.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
