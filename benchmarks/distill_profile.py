"""Where a distillation step spends its time: neurons vs selective scan vs projections vs the rest.

    python benchmarks/distill_profile.py [--threads 2]

One step as the distill stage runs it (teacher forward without grad, student forward + backward
of KL + hidden MSE + CE) at the tiny recipe's shape: hidden 64, 4 blocks, batch 32 × 24 tokens,
SI-LIF D=4 on in_proj and out_proj. torch.profiler's self CPU time is attributed to the nearest
enclosing named op: the neuron and scan autograd Functions (forward and backward), and the
linear / matmul ops (in_proj, x_proj, dt_proj, out_proj, LM head). Writes
benchmarks/results/distill_profile.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import MambaConfig, MambaForCausalLM

import spiking
from stages.distill import LossConfig, distillation_loss

CATEGORIES = {  # substring of an op name (or of an ancestor's) -> category, first match wins
    "range:neuron": "neurons",
    "range:scan": "selective scan (incl. discretisation)",
    "SILIF": "neurons",
    "ATMN": "neurons",
    "_GradScale": "neurons",
    "_LinearRecurrence": "selective scan (incl. discretisation)",
    "aten::linear": "projections",
    "AddmmBackward": "projections",
    "MmBackward": "projections",
    "aten::addmm": "projections",
    "aten::mm": "projections",
    "aten::bmm": "projections",
    "aten::matmul": "projections",
}


OTHER = "other (conv1d, norms, gate, embedding, KL / MSE / CE)"


def own_category(event) -> str | None:
    """Category from the event's own name or an enclosing op / range (forward ops)."""
    node = event
    while node is not None:
        for key, name in CATEGORIES.items():
            if key in node.name:
                return name
        node = node.cpu_parent
    return None


def ranged(fn, label: str):
    """Wrap fn in a profiler range so every op it runs (forward) is attributed to `label`."""

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"range:{label}"):
            return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    hf = MambaForCausalLM(MambaConfig(vocab_size=18, hidden_size=64, num_hidden_layers=4, state_size=16))
    teacher = spiking.from_teacher(hf, neurons={}).eval().requires_grad_(False)
    ids = torch.randint(0, 18, (32, 24))
    student = spiking.from_teacher(hf, neurons=spiking.default_neurons(D=4), calibration_batches=[{"input_ids": ids}])
    loss_cfg = LossConfig(kl=1.0, hidden=1.0, ce=1.0)

    def step():
        with torch.no_grad():
            t = teacher(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        s = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        heads = (student.get_output_embeddings(), teacher.get_output_embeddings())
        loss = distillation_loss(
            s.hidden_states[-1], t.hidden_states[-1], s.hidden_states[:-1], t.hidden_states[:-1], ids, loss_cfg, heads
        )["loss"]
        loss.backward()

    # the scan entry point and every neuron's forward run inside named ranges
    import spiking.scan as scan_module

    scan_module.selective_scan_ref = ranged(scan_module.selective_scan_ref, "scan")
    for _, neuron in spiking.iter_neurons(student):
        neuron.forward = ranged(neuron.forward, "neuron")

    step()  # warm-up
    start = time.perf_counter()
    with torch.profiler.profile() as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - start) / args.steps
    # backward nodes run outside the forward ranges: map them to their forward op's category
    # through the autograd sequence number the profiler records on both
    events = prof.events()
    by_sequence: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and "Backward" not in event.name and "autograd::engine" not in event.name:
            by_sequence.setdefault(event.sequence_nr, own_category(event) or OTHER)
    totals: dict[str, float] = {}
    for event in events:
        name = own_category(event)
        if name is None:
            node = event
            while node is not None and name is None:  # a backward node, or an op inside one
                if node.sequence_nr >= 0 and ("Backward" in node.name or "autograd::engine" in node.name):
                    name = by_sequence.get(node.sequence_nr)
                node = node.cpu_parent
        name = name or OTHER
        totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    shares = {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    tokens_per_s = ids.numel() / wall
    print(f"distill step, batch 32 x 24 tokens, {args.threads} thread(s): {wall * 1e3:.0f} ms/step (profiled), {tokens_per_s:,.0f} tokens/s")
    for name, share in shares.items():
        print(f"  {name:<62} {share:6.1%}")
    out = Path(__file__).parent / "results" / "distill_profile.json"
    out.write_text(json.dumps({"threads": args.threads, "ms_per_step": wall * 1e3, "tokens_per_s": tokens_per_s, "shares": shares}, indent=1))


if __name__ == "__main__":
    main()
