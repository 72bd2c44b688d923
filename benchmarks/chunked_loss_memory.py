"""Peak memory of the loss: plain cross-entropy, CEWithChunkedOutputLoss, LinearCrossEntropyLoss.

Each variant runs in a fresh subprocess: hidden states ``[b, s, d]`` -> output projection ->
loss -> backward, as at the end of a decoder. Reported: the process's peak RSS above what it
held just before the loss (``ru_maxrss`` minus ``VmRSS``), and the loss, which must agree.

    python benchmarks/chunked_loss_memory.py            # SmolLM2-135M's shapes, seq 2048, fp32
    python benchmarks/chunked_loss_memory.py --seq 4096 --chunks 16 --bf16

``--bf16`` adds the bf16-autocast case (logits in bf16, upcast to fp32 for the loss); it is
slow on CPUs without bf16 matmul units.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VARIANTS = {
    "plain": "F.cross_entropy",
    "chunked": "CEWithChunkedOutputLoss",
    "linear": "LinearCrossEntropyLoss",
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from fusionlm.modules.loss import CEWithChunkedOutputLoss, LinearCrossEntropyLoss

    torch.manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.dim, requires_grad=True)
    output = torch.nn.Linear(args.dim, args.vocab, bias=False)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, : args.seq // 4] = -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    before = _rss_mib()
    with autocast:
        if args.variant == "plain":
            logits = output(hidden)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
            )
        elif args.variant == "chunked":
            chunks = [output(h) for h in hidden.tensor_split(args.chunks, dim=1)]
            loss = CEWithChunkedOutputLoss(args.chunks)(chunks, labels)
        else:
            loss = LinearCrossEntropyLoss()(hidden, labels, weight=output.weight)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loss": loss.item(), "peak_above_start_mib": peak - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--child", choices=list(VARIANTS), dest="variant")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--bf16", action="store_true", help="also measure under bf16 autocast")
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    shape = f"[{args.batch}, {args.seq}] tokens, d={args.dim}, vocab={args.vocab}"
    print(f"loss + backward over {shape}; CEWithChunkedOutputLoss over {args.chunks} chunks")
    print(f"{'dtype':<6} {'variant':<24} {'peak above start (MiB)':>24} {'loss':>10}")
    base = [sys.executable, __file__, *(a for a in sys.argv[1:] if a != "--bf16")]
    for dtype in ("fp32", "bf16") if args.bf16 else ("fp32",):
        for variant, name in VARIANTS.items():
            out = subprocess.run(
                [*base, "--child", variant, "--dtype", dtype],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{dtype:<6} {name:<24} {result['peak_above_start_mib']:>24.0f} {result['loss']:>10.5f}"
            )


if __name__ == "__main__":
    main()
