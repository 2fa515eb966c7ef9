"""GPU memory and time budget of the paper recipes: a projection from counts measured here.

    python benchmarks/gpu_budget.py            # recipes/spikingmamba-130m.yaml and -1.4b.yaml, 8 × 80 GB

Measured on this machine (CPU, exact counts, no GPU needed):
* parameters: the teacher's and the student's, from the real configs (`scripts/make_local_teacher.py`
  shapes; built on the meta device, no weights);
* activations saved for backward per token per block: one distill training step of the student
  (SI-LIF on in_proj and out_proj) at the real width, counted with
  `torch.autograd.graph.saved_tensors_hooks` (bytes of every tensor autograd keeps). The selective
  scan's own saved tensors are counted apart and replaced by what mamba-ssm's CUDA kernel keeps
  (u, Δ, B, C, z, the output and one state per 2048-token chunk; it recomputes the states in
  backward), the kernel `scan_backend: auto` picks on a GPU; the rest is the same code on GPU.

Projected (stated assumptions, printed with the table):
* mixed-precision Adam (ZeRO paper accounting): 2 B bf16 weights + 2 B bf16 gradients + 12 B fp32
  master weights and Adam moments per trained parameter; DDP keeps all of it on every GPU, ZeRO-2
  shards the 2 + 12 B over the GPUs, ZeRO-3 all 16 B; the frozen teacher in bf16 (2 B per parameter)
  is loaded whole on every GPU (it is not a DeepSpeed engine);
* activations in bf16 (half the fp32 bytes counted here), × the recipe's micro-batch × sequence
  length, all blocks kept (gradient checkpointing off; with it on, the 1.4b recipe's default, one
  block's activations plus each block's input);
* the KD loss: the chunked vocabulary terms (stages.distill.loss.chunk_tokens, default 1024: a few
  fp32 [1024, 50280] tensors, counted), never whole [B, L, V] logits;
* time: FLOPs per token = 6 × student parameters (forward + backward) + 2 × teacher parameters
  (forward), at an assumed model-FLOPs utilisation (default 35% of an A100's 312 bf16 TFLOP/s),
  for the recipe's token budget (max_steps × micro-batch × accumulation × sequence × GPUs).

Prints the table (markdown) and writes benchmarks/results/gpu_budget.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_budget.json"
sys.path.insert(0, str(ROOT))

RECIPES = {"mamba-130m": ROOT / "recipes" / "spikingmamba-130m.yaml", "mamba-1.4b": ROOT / "recipes" / "spikingmamba-1.4b.yaml"}
GIB = 1024**3


def parameter_count(shape: str) -> int:
    import torch
    from transformers import MambaForCausalLM

    from scripts.make_local_teacher import config_for

    with torch.device("meta"):
        model = MambaForCausalLM(config_for(shape))
    return sum(p.numel() for p in model.parameters())  # tied LM head counted once


def saved_bytes_per_token_per_block(shape: str, length: int) -> dict[str, float]:
    """fp32 bytes autograd saves per token per block in a distill step of one student block."""
    import torch

    import spiking
    import spiking.scan as scan_module
    from scripts.make_local_teacher import config_for
    from transformers import MambaForCausalLM

    config = config_for(shape, layers=1)
    config.vocab_size = 64  # the head and embedding are accounted apart; one block is what is measured
    torch.manual_seed(0)
    teacher = MambaForCausalLM(config)
    student = spiking.from_teacher(teacher, neurons=spiking.default_neurons(), scan_backend="ref").train()
    ids = torch.randint(0, 64, (1, length))
    spiking.calibrate(student, [{"input_ids": ids}])
    inside_scan = [False]
    totals = {"all": 0, "scan": 0}

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        totals["all"] += size
        if inside_scan[0]:
            totals["scan"] += size
        return tensor

    original = scan_module.selective_scan

    def counted_scan(*args, **kwargs):
        inside_scan[0] = True
        try:
            return original(*args, **kwargs)
        finally:
            inside_scan[0] = False

    scan_module.selective_scan = counted_scan
    import spiking.modeling as modeling

    modeling.selective_scan = counted_scan
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block_input = student.backbone.embeddings(ids).detach().requires_grad_()
            out = student.backbone.layers[0](block_input)
        out.float().pow(2).mean().backward()
    finally:
        scan_module.selective_scan = original
        modeling.selective_scan = original
    E, N = config.intermediate_size, config.state_size
    # mamba-ssm's selective_scan_fn saves u, delta, B, C, z, out ([B, D|N, L] each) and x: one
    # [D, 2N] state per 2048-token chunk: per token, fp32 when the inputs are fp32
    mamba_ssm = 4 * (4 * E + 2 * N) + 4 * E * 2 * N / 2048
    return {
        "measured_total": totals["all"] / length,
        "measured_scan_ref": totals["scan"] / length,
        "scan_mamba_ssm": mamba_ssm,
        "per_token_per_block": (totals["all"] - totals["scan"]) / length + mamba_ssm,
    }


def projection(shape: str, recipe_path: Path, gpus: int, gpu_gib: float, mfu: float, peak_tflops: float, length: int) -> dict:
    import yaml

    recipe = yaml.safe_load(recipe_path.read_text())
    distill = recipe["stages"]["distill"]
    seq = recipe["stages"]["data"]["seq_len"]
    micro, accum, steps = distill["batch_size"], distill["grad_accum"], distill["max_steps"]
    checkpointing = bool((distill.get("trainer") or {}).get("gradient_checkpointing", False))
    params = parameter_count(shape)
    from scripts.make_local_teacher import config_for

    config = config_for(shape)
    counts = saved_bytes_per_token_per_block(shape, length)
    chunk = (distill.get("loss") or {}).get("chunk_tokens", 1024)
    tokens_per_micro = micro * seq
    activations_fp32 = counts["per_token_per_block"] * tokens_per_micro * (1 if checkpointing else config.num_hidden_layers)
    if checkpointing:  # each block's input kept, one block's internals live in backward
        activations_fp32 += 4 * config.hidden_size * tokens_per_micro * config.num_hidden_layers
    activations = activations_fp32 / 2  # bf16
    loss = 6 * 4 * min(chunk, tokens_per_micro) * config.vocab_size  # a few fp32 [chunk, V] tensors
    hidden_kd = 2 * 2 * config.hidden_size * tokens_per_micro * config.num_hidden_layers  # teacher + student residual streams, bf16
    teacher = 2 * params
    modes = {
        "DDP": 16 * params,
        "ZeRO-2": 2 * params + 14 * params / gpus,
        "ZeRO-3": 16 * params / gpus,
    }
    rows = {}
    for mode, state in modes.items():
        total = state + teacher + activations + loss + hidden_kd
        rows[mode] = {"model_states_gib": state / GIB, "teacher_gib": teacher / GIB, "activations_gib": activations / GIB,
                      "kd_gib": (loss + hidden_kd) / GIB, "total_gib": total / GIB, "fits": total < gpu_gib * GIB}
    flops_per_token = 6 * params + 2 * params
    tokens = steps * micro * accum * seq * gpus
    seconds = tokens * flops_per_token / (gpus * mfu * peak_tflops * 1e12)
    return {
        "shape": shape, "recipe": str(recipe_path.relative_to(ROOT)), "parameters": params,
        "micro_batch": micro, "grad_accum": accum, "seq_len": seq, "max_steps": steps, "gradient_checkpointing": checkpointing,
        "saved_bytes": counts, "per_gpu": rows, "distill_tokens": tokens, "distill_hours": seconds / 3600,
        **sparsify_budget(recipe, params, gpus, mfu, peak_tflops),
    }


def sparsify_budget(recipe: dict, params: int, gpus: int, mfu: float, peak_tflops: float) -> dict:
    """Tokens and hours of the recipe's sparsify stage: T student forwards + backwards (spike-aware
    SBDS, T = the largest ATMN T) and one teacher forward per token."""
    from stages.sparsify import Config

    cfg = Config.model_validate(recipe["stages"]["sparsify"])
    steps_t = max((m.T or 4 for m in cfg.modules.values() if m.kind == "atmn"), default=1)
    seq = recipe["stages"]["data"]["seq_len"]
    tokens = cfg.max_steps * cfg.batch_size * cfg.grad_accum * seq * gpus
    flops = (steps_t if cfg.sbds.spike_aware else 1) * 6 * params + 2 * params
    return {"sparsify_tokens": tokens, "sparsify_spike_steps": steps_t,
            "sparsify_hours": tokens * flops / (gpus * mfu * peak_tflops * 1e12) / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, default=312.0, help="bf16 dense peak per GPU (A100: 312)")
    parser.add_argument("--length", type=int, default=128, help="tokens of the measured step (bytes are per token)")
    args = parser.parse_args()
    results = [projection(shape, path, args.gpus, args.gpu_gib, args.mfu, args.peak_tflops, args.length) for shape, path in RECIPES.items()]

    print(f"Projection (not measured on GPUs): distill stage, {args.gpus} × {args.gpu_gib:.0f} GB, bf16, "
          f"{args.mfu:.0%} MFU of {args.peak_tflops:.0f} TFLOP/s\n")
    print("| recipe | params | micro-batch × length | mode | model states | teacher (bf16) | activations | KD terms | total / GPU | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for mode, row in r["per_gpu"].items():
            print(f"| {r['shape']} | {r['parameters'] / 1e6:.0f} M | {r['micro_batch']} × {r['seq_len']}"
                  f"{' (ckpt)' if r['gradient_checkpointing'] else ''} | {mode} | {row['model_states_gib']:.1f} GB | "
                  f"{row['teacher_gib']:.1f} GB | {row['activations_gib']:.1f} GB | {row['kd_gib']:.1f} GB | "
                  f"{row['total_gib']:.1f} GB | {'yes' if row['fits'] else 'no'} |")
    print()
    for r in results:
        print(f"{r['shape']}: distill {r['distill_tokens'] / 1e9:.1f} B tokens ({r['max_steps']} steps) ≈ {r['distill_hours']:.1f} h, "
              f"sparsify {r['sparsify_tokens'] / 1e9:.2f} B tokens × T={r['sparsify_spike_steps']} ≈ {r['sparsify_hours']:.1f} h; "
              f"saved for backward per token per block {r['saved_bytes']['per_token_per_block'] / 1024:.1f} KiB fp32 "
              f"(measured {r['saved_bytes']['measured_total'] / 1024:.1f} KiB with the reference scan, whose states are "
              f"{r['saved_bytes']['measured_scan_ref'] / 1024:.1f} KiB of it)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "assumptions": vars(args), "recipes": results}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
