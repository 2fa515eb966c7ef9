"""Peak memory of the distillation loss at a 50 k vocabulary: whole-batch logits vs chunks of tokens.

The KD loss (distill: τ²·KL + CE) and the SBDS loss (sparsify: T spike steps of forward and reverse
KL) are computed from the final hidden states [B, L, H] through each model's LM head
(`stages.training.head_logits_sums`). "naive" computes the [B·L, V] fp32 logits of both models
at once (what the stages did before, `chunk_tokens: null`); "chunked" computes them `--chunk`
tokens at a time under activation checkpointing. Only the loss is measured: hidden states and
heads are made first, then the peak resident memory (Linux VmHWM, reset through
/proc/self/clear_refs) above that level during the loss's forward and backward is the loss's
extra memory. Each variant runs in its own subprocess, with glibc's mmap threshold fixed at 1 MiB
(`MALLOC_MMAP_THRESHOLD_`): every tensor above that is its own mapping, returned to the system
when freed, so the peak RSS is the peak of live tensors (with glibc's default sliding threshold,
freed chunk logits stay in the heap and the RSS peak depends on the allocation order instead).

    python benchmarks/kd_memory.py                       # vocab 50280, hidden 768, B1 x L2048, chunk 256
    python benchmarks/kd_memory.py --length 512 --sbds-steps 4

Prints the table and writes benchmarks/results/kd_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kd_memory.json"


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(loss: str, chunk: int | None, args) -> dict:
    """In a subprocess: the loss's extra peak RSS (MB) and time for one forward + backward."""
    import torch

    sys.path.insert(0, str(ROOT))
    from stages import distill, sparsify

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, L, H, V = args.batch, args.length, args.hidden, args.vocab
    heads = (torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False))
    heads[1].requires_grad_(False)  # the frozen teacher's head
    labels = torch.randint(0, V, (B, L))
    teacher_final = torch.randn(B, L, H)
    steps = args.sbds_steps if loss == "sbds" else 1
    student_finals = [torch.randn(B, L, H, requires_grad=True) for _ in range(steps)]

    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    if loss == "distill":
        cfg = distill.LossConfig(kl=1.0, hidden=0.0, ce=1.0, chunk_tokens=chunk)
        total = distill.distillation_loss(student_finals[0], teacher_final, (), (), labels, cfg, heads, chunk)["loss"]
    else:
        cfg = sparsify.SBDSConfig(gamma=0.0, ce=1.0, chunk_tokens=chunk)
        total = sparsify.sbds_loss(student_finals, teacher_final, [[]] * steps, [], cfg, labels, heads)["loss"]
    total.backward()
    seconds = time.perf_counter() - start
    return {"extra_peak_mb": rss_mb("VmHWM") - base, "seconds": seconds, "loss": float(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--sbds-steps", type=int, default=4, help="ATMN T of the SBDS row (0: skip the row)")
    parser.add_argument("--sbds-length", type=int, default=512, help="tokens per row of the SBDS row (T× the logits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("LOSS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        loss, chunk = args.child
        print(json.dumps(measure(loss, None if chunk == "none" else int(chunk), args)))
        return

    rows = []
    plans = [("distill", args.length)] + ([("sbds", args.sbds_length)] if args.sbds_steps else [])
    for loss, length in plans:
        row = {"loss": loss, "tokens": args.batch * length, "vocab": args.vocab, "chunk_tokens": args.chunk}
        for name, chunk in (("naive", "none"), ("chunked", str(args.chunk))):
            command = [sys.executable, __file__, "--child", loss, chunk, "--vocab", str(args.vocab), "--hidden",
                       str(args.hidden), "--batch", str(args.batch), "--length", str(length), "--sbds-steps",
                       str(args.sbds_steps), "--threads", str(args.threads)]
            env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_=str(1 << 20))
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            row[name] = json.loads(out.stdout.strip().splitlines()[-1])
        assert abs(row["naive"]["loss"] - row["chunked"]["loss"]) <= 1e-4 * abs(row["naive"]["loss"]), row  # same loss
        row["memory_ratio"] = row["chunked"]["extra_peak_mb"] / row["naive"]["extra_peak_mb"]
        row["time_ratio"] = row["chunked"]["seconds"] / row["naive"]["seconds"]
        rows.append(row)

    print(f"KD loss memory, vocab {args.vocab}, hidden {args.hidden}, chunks of {args.chunk} tokens, {args.threads} threads")
    print(f"{'loss':<8} {'tokens':>7} {'naive MB':>10} {'chunked MB':>11} {'memory':>8} {'time':>7}")
    for row in rows:
        label = row["loss"] if row["loss"] == "distill" else f"sbds T={args.sbds_steps}"
        print(f"{label:<8} {row['tokens']:>7} {row['naive']['extra_peak_mb']:>10.0f} {row['chunked']['extra_peak_mb']:>11.0f} "
              f"{row['memory_ratio']:>7.3f}x {row['time_ratio']:>6.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "settings": vars(args) | {"child": None},
        "rows": rows,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
