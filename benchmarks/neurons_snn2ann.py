"""SNN2ANN comparison: closed-form neuron training vs. step-by-step (micro-step) simulation training.

The same network (``layers`` × [Linear(C, C) → neuron]) and the same loss, trained two ways:

* ``closed``: the neuron's ``forward``: one pass, straight-through / surrogate gradient computed
  in closed form (SNN2ANN's "spiking mapping"; what this project trains with).
* ``micro``: the neuron's ``simulate``: the D (SI-LIF) or T (ATMN) spike steps unrolled, with
  rectangular surrogate gradients and autograd through the loop; the step outputs are summed
  before the next linear layer, which runs once.
* ``micro_events``: the same loop, but each linear layer consumes every step's events
  (``simulate_steps``, S = D or T matmuls per layer): multi-step SNN training as SNN2ANN's
  baseline does it (BPTT through every step of every layer).

Both give the same forward values and (up to rounding) the same gradients; only the cost differs.
Measured per training step (forward + backward + Adam):

* time: fastest wall time per step after warm-up (median also saved; the minimum is the
  figure least disturbed by other processes on a shared machine);
* activation memory: bytes of tensors autograd saves for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded): the
  memory that training holds between forward and backward, exactly, on any device;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory before the step; on CPU
  the growth of the process's peak RSS (``ru_maxrss``) during training, in a fresh subprocess per
  case: coarse (allocator caching, page granularity), shown as a cross-check only.

SNN2ANN (arXiv 2206.09449) reports 0.27× memory and 0.377× training time for its closed form.

Run: ``python benchmarks/neurons_snn2ann.py`` (writes benchmarks/results/neurons_snn2ann.json);
``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spiking.neurons import make_neuron  # noqa: E402

FORMS = ("closed", "micro", "micro_events")
SNN2ANN_CLAIM = {"memory_ratio": 0.27, "time_ratio": 0.377}
NEURONS = {
    "si_lif_D4": {"kind": "si_lif", "D": 4},
    "atmn_T4": {"kind": "atmn", "T": 4, "tau": 1.0},
}


class NeuronMLP(nn.Module):
    """``layers`` × [Linear(C, C) → neuron]; ``form`` picks the neuron's training form."""

    def __init__(self, channels: int, layers: int, spec: dict, form: str):
        super().__init__()
        self.form = form
        self.linears = nn.ModuleList(nn.Linear(channels, channels) for _ in range(layers))
        self.neurons = nn.ModuleList(make_neuron(spec, channels) for _ in range(layers))
        for neuron in self.neurons:
            with torch.no_grad():
                neuron.set_threshold_(torch.full((channels,), math.exp(-1.0)))  # V ≈ 0.37: activations ~N(0, 1) fire a lot

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C] -> [B, C]
        if self.form == "micro_events":
            return self._forward_events(x)
        for linear, neuron in zip(self.linears, self.neurons):
            h = linear(x)
            x = neuron(h) if self.form == "closed" else neuron.simulate(h)
        return x

    def _forward_events(self, x: torch.Tensor) -> torch.Tensor:
        """Spike-driven simulation: each linear layer consumes the previous neuron's per-step
        events ``[S, B, C]`` (S = D or T matmuls instead of one) and the next neuron integrates
        their sum, as in multi-step SNN training (BPTT through every step of every layer)."""
        h = self.linears[0](x)
        for i, neuron in enumerate(self.neurons):
            events = neuron.simulate_steps(h)  # [S, B, C]
            if i + 1 < len(self.linears):
                h = self.linears[i + 1](events).sum(0) - self.linears[i + 1].bias * (events.shape[0] - 1)
            else:
                h = events.sum(0)
        return h


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes of unique tensor storages autograd saves for backward in one forward (no params)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def run_case(neuron: str, form: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = NeuronMLP(args.channels, args.layers, NEURONS[neuron], form).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.channels, device=device)
    target = torch.randn(args.batch, args.channels, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # baseline before the first training forward: the warm-up steps reach the peak already
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = _current_rss_bytes()
    saved = saved_activation_bytes(model, x, target)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        peak_kind = "cuda max_memory_allocated - before"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        peak_kind = "cpu peak RSS growth (coarse)"
    return {
        "neuron": neuron,
        "form": form,
        # min over steps: the least disturbed by other processes on a shared machine
        "ms_per_step": 1e3 * min(times),
        "ms_per_step_median": 1e3 * statistics.median(times),
        "saved_activation_mb": saved / 2**20,
        "peak_mb": max(peak, 0) / 2**20,
        "peak_kind": peak_kind,
    }


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    # wide batch, narrow layers: the neurons' elementwise work is a visible share of the step
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared machine)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "neurons_snn2ann.json"))
    p.add_argument("--case", nargs=2, metavar=("NEURON", "FORM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.case:  # worker: one case in this process, JSON on stdout
        print(json.dumps(run_case(*args.case, args)))
        return

    results = []
    for neuron in NEURONS:
        for form in FORMS:
            # a fresh process per case, so the CPU peak RSS of one case does not hide another's
            cmd = [sys.executable, __file__, "--case", neuron, form] + _forward_args(args)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))

    rows, ratios = [], {}
    header = f"{'neuron':<10} {'form':<12} {'ms/step':>9} {'saved act MB':>13} {'peak MB':>9}"
    print(f"device={args.device} batch={args.batch} C={args.channels} layers={args.layers} threads={args.threads}")
    print(header)
    for r in results:
        rows.append(f"{r['neuron']:<10} {r['form']:<12} {r['ms_per_step']:>9.1f} {r['saved_activation_mb']:>13.1f} {r['peak_mb']:>9.1f}")
    print("\n".join(rows))
    print(f"\nratios closed / simulation (SNN2ANN claims memory {SNN2ANN_CLAIM['memory_ratio']}x, "
          f"time {SNN2ANN_CLAIM['time_ratio']}x)")
    for neuron in NEURONS:
        c = next(r for r in results if r["neuron"] == neuron and r["form"] == "closed")
        for form in FORMS[1:]:
            m = next(r for r in results if r["neuron"] == neuron and r["form"] == form)
            q = ratios.setdefault(neuron, {})[form] = {
                "time_ratio": c["ms_per_step"] / m["ms_per_step"],
                "saved_activation_ratio": c["saved_activation_mb"] / m["saved_activation_mb"],
                "peak_ratio": c["peak_mb"] / m["peak_mb"] if m["peak_mb"] > 0 else None,
            }
            peak = f"{q['peak_ratio']:.3f}x" if q["peak_ratio"] is not None else "n/a"
            print(f"{neuron:<10} vs {form:<12} time {q['time_ratio']:.3f}x  saved activations "
                  f"{q['saved_activation_ratio']:.3f}x  peak {peak}")
    print(f"(peak = {results[0]['peak_kind']})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "neurons_snn2ann",
        "config": {k: getattr(args, k) for k in ("device", "batch", "channels", "layers", "steps", "warmup", "threads")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "results": results,
        "ratios_closed_over_micro": ratios,
        "snn2ann_claim": SNN2ANN_CLAIM,
        "measured": "time: fastest training step (median in results); saved activations: exact bytes autograd keeps "
                    "for backward (params excluded); peak: see peak_kind",
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    print(f"\nwrote {out}")


def _forward_args(args) -> list[str]:
    out = []
    for k in ("device", "batch", "channels", "layers", "steps", "warmup", "threads"):
        out += [f"--{k}", str(getattr(args, k))]
    return out


if __name__ == "__main__":
    main()
