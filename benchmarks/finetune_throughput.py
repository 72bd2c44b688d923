"""Fine-tuning throughput and peak memory: fusionlm vs transformers on the default model.

Every loop is the same: forward, mean token cross-entropy, backward, AdamW step (fused, as
transformers' Trainer uses by default), over identical random token rows, each loop in a fresh
subprocess so that its peak RSS is its own (model, gradients, optimizer state, activations).

- ``fusionlm``: what ``fusionlm finetune`` runs by default: bf16 autocast where the CPU
  multiplies bf16 natively (LoRA's frozen weights held in bf16), compiled decoder layers
  (the first step compiles; it is a warm-up step), and the output projection fused with the
  loss (``LinearCrossEntropyLoss``).
- ``transformers``: transformers' model (SDPA attention) in fp32, its default.
- ``transformers-bf16``: the same under bf16 autocast, the like-for-like reference.

Each is run in full and LoRA fine-tuning (r=8 on q and v; PEFT for transformers), at one row
of 512 tokens and at 4 rows of 512 (full rows, as packing makes them, causal attention), over
interleaved rounds: this machine's speed drifts by tens of percent over minutes, so ratios
are taken within a round. Throughput is from the median timed step.

    python benchmarks/finetune_throughput.py                      # 2 rounds, 2 warm-up + 5 steps
    python benchmarks/finetune_throughput.py --rounds 1 --shapes 1x512 --modes lora
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

SYSTEMS = ("fusionlm", "transformers", "transformers-bf16")
MODES = ("full", "lora")
LORA = {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}


def child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    batch, seq = (int(n) for n in args.shape.split("x"))
    rows = torch.randint(0, 49152, (args.warmup + args.steps, batch, seq + 1))
    bf16 = args.system == "transformers-bf16"
    if args.system == "fusionlm":
        import fusionlm
        from fusionlm.modules.lora import apply_lora
        from fusionlm.modules.loss import LinearCrossEntropyLoss
        from fusionlm.training.compiled import compile_layers
        from fusionlm.training.precision import hold_frozen_in_bf16, native_bf16

        model = fusionlm.load_model(args.model_dir).train()
        if args.mode == "lora":
            apply_lora(model, targets=LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"])
        else:
            model.requires_grad_(True)
        bf16 = native_bf16(torch.device("cpu"))
        if bf16:
            hold_frozen_in_bf16(model)
        compile_layers(model)
        model.skip_output_layer = True
        loss_fn = LinearCrossEntropyLoss()
        loss_fn.set_model_output(model)

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
        if args.mode == "lora":
            import peft

            config = peft.LoraConfig(
                r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"]
            )
            model = peft.get_peft_model(model, config)

        def loss_of(tokens, labels):
            logits = model(input_ids=tokens).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    losses, times = [], []
    for row in rows:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(row[:, :-1], row[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - started)
    return {
        "tokens_per_s": batch * seq / statistics.median(times[args.warmup :]),
        "first_step_s": times[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": "bf16" if bf16 else "fp32",
        "first_loss": losses[0],
    }


def run_child(args: argparse.Namespace, model_dir: str, system: str, mode: str, shape: str):
    command = [sys.executable, __file__, "--child", system, "--mode", mode, "--shape", shape]
    command += ["--model-dir", model_dir, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"  {system} {mode} {shape}: failed: {reason}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["1x512", "4x512"], help="ROWSxTOKENS")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--child", dest="system", choices=SYSTEMS)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--shape")
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.system:
        print(json.dumps(child(args)))
        return

    import torch

    import fusionlm

    results: dict[tuple[str, str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Both libraries start from the same fp32 weights: the default model written as a
        # transformers directory.
        fusionlm.save_hf(fusionlm.load_model(args.model), tmp)
        print(
            f"fine-tuning {args.model}: {args.rounds} interleaved rounds, {args.warmup} warm-up "
            f"+ {args.steps} timed steps, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        for r in range(args.rounds):
            for shape in args.shapes:
                for mode in args.modes:
                    for system in args.systems:
                        got = run_child(args, tmp, system, mode, shape)
                        if got is None:
                            continue
                        results.setdefault((shape, mode, system), []).append(got)
                        print(
                            f"round {r + 1} {shape} {mode:<4} {system:<17} {got['precision']} "
                            f"{got['tokens_per_s']:7.1f} tok/s  peak {got['peak_rss_mib']:6.0f} MiB"
                            f"  first step {got['first_step_s']:5.1f} s  loss {got['first_loss']:.4f}",
                            flush=True,
                        )
    print_summary(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {"shape": k[0], "mode": k[1], "system": k[2], "runs": v}
                    for k, v in results.items()
                ],
                f,
                indent=1,
            )


def print_summary(results: dict, args: argparse.Namespace) -> None:
    print(
        "\n| shape | mode | system | precision | tokens/s (each round) | peak RSS MiB (max) "
        "| fusionlm tok/s vs this (each round) | fusionlm memory vs this |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for mode in args.modes:
            ours = results.get((shape, mode, "fusionlm"), [])
            for system in args.systems:
                runs = results.get((shape, mode, system), [])
                if not runs:
                    continue
                speeds = " / ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
                peak = max(r["peak_rss_mib"] for r in runs)
                speed_ratio = memory_ratio = ""
                if system != "fusionlm" and len(ours) == len(runs):
                    speed_ratio = " / ".join(
                        f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
                        for a, b in zip(ours, runs, strict=True)
                    )
                    memory_ratio = f"{max(r['peak_rss_mib'] for r in ours) / peak:.2f}x"
                print(
                    f"| {shape} | {mode} | {system} | {runs[0]['precision']} | {speeds} | "
                    f"{peak:.0f} | {speed_ratio} | {memory_ratio} |"
                )


if __name__ == "__main__":
    main()
