"""A bf16 distill step at mamba-130m's shape on one GPU, with each available scan backend.

The model has `state-spaces/mamba-130m-hf`'s config (hidden 768, 24 blocks, state 16, vocabulary
50280) with random weights (nothing is downloaded). One step is what the distill stage runs: the
frozen teacher's forward (the project's mixer, no neurons), the student's forward (SI-LIF D=4 on
in_proj and out_proj, calibrated) and the backward of the distill stage's KL + hidden MSE + CE
(written out below, weights 1), with bf16 weights and activations. For each backend
(ref, triton, mamba_ssm when it imports, auto) it records the median step time, tokens/s, peak
memory and the loss, and checks that every backend's loss and gradient norm agree with the
Triton one (bf16 tolerance): a backend that disagrees fails the run.

    python benchmarks/gpu_distill_step.py --out benchmarks/results/gpu_distill_step.json
    python benchmarks/gpu_distill_step.py --batch 4 --seq-len 1024 --reps 5

Needs CUDA (exits with status 2 and says so without it). Used by scripts/gpu_check.sh.
`--device cpu --tiny` runs the same script logic on a tiny model on CPU (backends ref, cpu, auto):
the check that the script itself works where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

import spiking  # noqa: E402
from spiking.kernels import MAMBA_SSM_AVAILABLE, TRITON_AVAILABLE  # noqa: E402

MAMBA_130M = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4)


def build(args, config: dict):
    torch.manual_seed(0)
    device = torch.device(args.device)
    hf = MambaForCausalLM(MambaConfig(**config))
    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    student = spiking.from_teacher(hf, neurons=spiking.default_neurons(D=4), scan_backend="auto").to(device)
    spiking.calibrate(student, [{"input_ids": ids[:1, :256]}])  # on the device, in fp32, then cast
    teacher = spiking.from_teacher(hf, neurons={}, scan_backend="auto").to(device, torch.bfloat16)
    return teacher.eval().requires_grad_(False), student.to(torch.bfloat16).train(), ids


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def distill_loss(s, t, ids):
    """The distill stage's terms (stages/distill.py), weights 1: KL(p_T‖p_S) + mean block MSE + CE."""
    vocab = s.logits.shape[-1]
    log_q = F.log_softmax(s.logits.float().reshape(-1, vocab), dim=-1)
    log_p = F.log_softmax(t.logits.float().reshape(-1, vocab), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    hidden = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(s.hidden_states[:-1], t.hidden_states[:-1])])
    ce = F.cross_entropy(s.logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
    return kl + hidden.mean() + ce


def step(teacher, student, ids):
    with torch.no_grad():
        t = teacher(input_ids=ids, output_hidden_states=True)
    s = student(input_ids=ids, output_hidden_states=True)
    loss = distill_loss(s, t, ids)
    del s, t  # free the logits before the backward peaks
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in student.parameters() if p.grad is not None))
    student.zero_grad(set_to_none=True)
    return loss.detach().float().item(), grad_norm.item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (Triton compiles its kernels here)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_distill_step.json"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 blocks, vocabulary 256 (script check)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_distill_step: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2

    config = dict(MAMBA_130M, hidden_size=64, num_hidden_layers=2, vocab_size=256) if args.tiny else MAMBA_130M
    teacher, student, ids = build(args, config)
    device = ids.device
    if device.type == "cuda":
        backends = ["ref"] + (["triton"] if TRITON_AVAILABLE else []) + (["mamba_ssm"] if MAMBA_SSM_AVAILABLE else [])
    else:
        backends = ["ref", "cpu"]
    backends.append("auto")
    rows = {}
    for backend in backends:
        teacher.config.scan_backend = student.config.scan_backend = backend
        chosen = spiking.kernels.resolve_backend(backend, ids.device)
        row = {"backend": backend, "resolves_to": chosen}
        try:
            first = step(teacher, student, ids)  # same weights, same batch: same loss each time
            for _ in range(args.warmup - 1):
                step(teacher, student, ids)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.reps):
                synchronize(device)
                start = time.perf_counter()
                step(teacher, student, ids)
                synchronize(device)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            row |= {"loss": first[0], "grad_norm": first[1], "median_s": median, "times_s": times,
                    "tokens_per_s": ids.numel() / median, "peak_mem_gib": peak}
        except torch.cuda.OutOfMemoryError as error:
            row |= {"error": f"out of memory: {str(error).splitlines()[0]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows[backend] = row
        print(json.dumps(row), flush=True)

    # the backends compute one function: their losses and gradient norms must agree (bf16 rounding)
    reference = rows.get("triton") or rows.get("cpu") or rows["ref"]
    problems = []
    for backend, row in rows.items():
        if "error" in row and backend != "ref":  # the reference keeps [L, B, D, N] buffers: OOM is allowed there
            problems.append(f"{backend}: {row['error']}")
        elif "loss" in row and "loss" in reference:
            for key in ("loss", "grad_norm"):
                if abs(row[key] - reference[key]) > 0.05 * abs(reference[key]) + 1e-3:
                    problems.append(f"{backend}: {key} {row[key]:.5g} vs {reference['backend']}'s {reference[key]:.5g}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    payload = {"device": name, "torch": torch.__version__, "model": config,
               "batch": args.batch, "seq_len": args.seq_len, "dtype": "bfloat16", "backends": rows, "problems": problems}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    for backend, row in rows.items():
        if "median_s" in row:
            print(f"{backend:>10s} ({row['resolves_to']}): {row['median_s'] * 1e3:8.1f} ms/step, "
                  f"{row['tokens_per_s']:9.0f} tokens/s, peak {row['peak_mem_gib'] or 0:.1f} GiB, loss {row['loss']:.4f}")
    for line in problems:
        print(f"gpu_distill_step: PROBLEM: {line}", file=sys.stderr)
    print(f"wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
