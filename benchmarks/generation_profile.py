"""Where a token's time goes in cached generation: a run's student against its teacher, under torch.profiler.

Loads a finished run's teacher (on the project's mixer, `neurons={}`) and its deployed student
(rl, else sparsify, else distill), generates greedily once to warm up, then once more under
torch.profiler, and prints each model's total self CPU time of the ops and the largest shares
(aten::mm = the dense matmuls, spikerl_cpu::backbone_step = the fused step's own C++: neurons,
spike-driven projections, conv, state update; spikerl_cpu::project = the LM head's projection of
the head neuron's spikes after the step). Self time is the calling thread's; the wall clock
also holds generate's Python and the worker threads. Last, the share of nonzero inputs of each
student neuron over the one-token steps (measured on the per-layer path: a hook on a neuron makes
the fused step stand aside), which decides when the step's projections run spike-driven.

    python benchmarks/generation_profile.py --run runs/small          # batch 16, 64 new tokens, 2 threads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import spiking  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from peers import load_run  # noqa: E402 - benchmarks/peers.py, beside this script


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run folder (teacher/, data/ and a student stage)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stage, hf, student, prompt = load_run(Path(args.run), args.batch)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    student.eval()
    teacher = spiking.from_teacher(hf, neurons={}).eval()  # the teacher on the project's mixer
    for name, model in ((f"student ({stage})", student), ("teacher on the project's mixer", teacher)):
        with torch.no_grad():
            model.generate(prompt, **kwargs)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.generate(prompt, **kwargs)
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(self_us.values())
        print(f"{name}: ops' self CPU time {total / 1e3:.1f} ms for {args.new_tokens} steps")
        for key, us in sorted(self_us.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {key:40s} {us / 1e3:8.1f} ms  {us / total:6.1%}")
    shares: dict[str, list[float]] = {}
    for name, neuron in spiking.neurons.iter_neurons(student):
        placement = name.rsplit(".", 1)[-1]

        def record(module, inputs, out, placement=placement):
            if out.shape[1] == 1:  # a one-token step, not the prefill
                shares.setdefault(placement, []).append((out != 0).float().mean().item())

        neuron.register_forward_hook(record)
    with torch.no_grad():
        student.generate(prompt, **kwargs)
    print("student neurons, share of nonzero outputs over the one-token steps (mean, min, max):")
    for placement, values in shares.items():
        print(f"  {placement:20s} {sum(values) / len(values):.3f}  {min(values):.3f}  {max(values):.3f}")


if __name__ == "__main__":
    main()
