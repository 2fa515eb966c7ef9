"""The student against transformers' Mamba on CPU: a training step and cached greedy generation.

One run, one process, the same weights everywhere, repetitions interleaved across the models (so
load from other jobs hits them alike) and the median kept. On a shared machine a round of
repetitions during which other processes kept more than 0.15 of a core busy (from /proc/stat, ours
subtracted) is dropped and run again, after waiting for a quiet second; the JSON records how many. The anchor (1.00x) is transformers'
fastest CPU path, `MambaConfig(use_mambapy=True)` with the `mambapy` package (a parallel scan),
not its default sequential loop.

Training step (forward + LM loss + backward) at d64 x 4 layers, B64 x L24 (the tiny recipe);
d256 x 4, B8 x L256; d768 x 2, B2 x L512 (mamba-130m's width), vocabulary 512:
  * HF loop          MambaForCausalLM, transformers' default sequential scan (only where affordable)
  * HF + mambapy     MambaForCausalLM(use_mambapy=True): the anchor
  * student          SI-LIF D=4 on in_proj + out_proj, scan_backend "auto" (the C++ scan on CPU)
  * neurons off      the same student with spiking=False (= the teacher on the project's mixer)
  * student, ref     the student on scan_backend "ref", the PyTorch scan (the previous CPU path)
Generation: greedy `model.generate`, d256 x 4, batch 16, prompt 8, 64 new tokens:
  * HF generate      MambaForCausalLM(use_mambapy=True).generate: the anchor
  * student          fused one-token backbone step (spiking/fused_step.py)
  * teacher (own)    SpikingMambaForCausalLM with neurons {} (the project's mixer), same fused step
  * teacher (own), per-layer / student, per-layer   scan_backend "ref": the per-layer Python step
With `--run DIR` (a finished run folder, e.g. runs/small after `spikerl run recipes/small.yaml`), the
same generation table for the run's own trained models: its teacher (HF generate with mambapy, and
on the project's mixer) against its deployed student (the newest of rl / sparsify / distill), on
prompts cut from the run's held-out corpus blocks, so the student spikes at the rates it was trained to.

    python benchmarks/peers.py                          # 2 threads, 5 timed reps (after 1 warm-up)
    python benchmarks/peers.py --skip-training --run runs/small   # + the trained student of a run
    python benchmarks/peers.py --threads 2 --reps 7 --skip-generation

Prints the tables (time and ratio to HF + mambapy) and writes benchmarks/results/peers.json.
Ratios come from one run; absolute seconds on a shared machine mean little.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # HF's "falling back to PyTorch" notes, once per kernel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "peers.json"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402
from transformers.utils.import_utils import is_mambapy_available  # noqa: E402

from spiking import default_neurons, from_teacher  # noqa: E402
from spiking.kernels import resolve_backend  # noqa: E402

from quiet import Quiet, interleaved  # noqa: E402 - benchmarks/quiet.py, beside this script

SHAPES = {  # name: (hidden, layers, batch, seq_len)
    "d64x4 B64xL24": (64, 4, 64, 24),
    "d256x4 B8xL256": (256, 4, 8, 256),
    "d768x2 B2xL512": (768, 2, 2, 512),
}
TRAIN_LABELS = {
    "hf_loop": "HF loop (transformers' default CPU scan)",
    "hf_mambapy": "HF + mambapy (use_mambapy=True)",
    "student": "student, SI-LIF D=4 (scan auto = cpu)",
    "student_off": "student, neurons off (spiking=False)",
    "student_ref": "student, SI-LIF D=4, scan_backend=ref",
}
QUIET: "Quiet | None" = None  # set in main from the flags

GEN_LABELS = {
    "hf_generate": "HF generate (use_mambapy=True)",
    "student": "student (fused step)",
    "teacher_own": "teacher on the project's mixer (fused step)",
    "teacher_own_ref": "teacher on the project's mixer, per-layer (ref)",
    "student_ref": "student, per-layer (ref)",
}


def hf_pair(hidden: int, layers: int, vocab: int, seed: int = 0) -> tuple[MambaForCausalLM, MambaForCausalLM]:
    """(loop, mambapy): one set of random weights, transformers' two CPU scans."""
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=16,
                         use_mambapy=True)
    fast = MambaForCausalLM(config)
    loop = copy.deepcopy(fast)
    loop.config.use_mambapy = False
    for layer in loop.backbone.layers:
        layer.mixer.use_mambapy = False  # the mixer reads its own copy of the flag
    return loop, fast


def students(teacher: MambaForCausalLM, calibration: torch.Tensor) -> dict[str, torch.nn.Module]:
    student = from_teacher(teacher, neurons=default_neurons(D=4), calibration_batches=[{"input_ids": calibration}])
    off = copy.deepcopy(student)
    off.config.spiking = False
    ref = copy.deepcopy(student)
    ref.config.scan_backend = "ref"
    return {"student": student, "student_off": off, "student_ref": ref}


def step(model, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def training(args) -> list[dict]:
    rows = []
    for shape, (hidden, layers, batch, seq_len) in SHAPES.items():
        if args.shapes and shape.split()[0] not in args.shapes:
            continue
        loop, fast = hf_pair(hidden, layers, args.vocab)
        ids = torch.randint(0, args.vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1))
        models = {"hf_mambapy": fast.train()} | {k: m.train() for k, m in students(fast, ids[:2]).items()}
        if batch * seq_len * 2 * hidden <= args.hf_loop_max_elements:
            models = {"hf_loop": loop.train()} | models
        times = interleaved({name: (lambda m=m: step(m, ids)) for name, m in models.items()}, args.reps, args.warmup,
                            QUIET)
        anchor = statistics.median(times["hf_mambapy"])
        row = {"shape": shape, "hidden": hidden, "layers": layers, "batch": batch, "seq_len": seq_len, "models": {}}
        for name in TRAIN_LABELS:
            if name in times:
                median = statistics.median(times[name])
                row["models"][name] = {"median_s": median, "times_s": times[name], "vs_hf_mambapy": median / anchor}
            else:
                row["models"][name] = None
        rows.append(row)
        print_training([row], header=not rows[:-1])
        del models, loop, fast
    return rows


def time_generation(models: dict, prompt: torch.Tensor, new: int, args, **extra) -> tuple[dict, dict]:
    """Greedy `generate` of `new` tokens by every model, interleaved: ({name: tokens/s, times, x HF},
    same tokens on every path). `models` holds hf_generate, student, teacher_own and their _ref twins."""
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  pad_token_id=0, eos_token_id=None, **extra)
    outputs = {}

    def run(name, model):
        outputs[name] = model.generate(prompt, **kwargs)

    for model in models.values():
        model.eval()
    times = interleaved({name: (lambda n=name, m=m: run(n, m)) for name, m in models.items()}, args.reps, args.warmup,
                        QUIET)
    batch = prompt.shape[0]
    anchor = batch * new / statistics.median(times["hf_generate"])
    rows = {}
    for name, t in times.items():
        tps = batch * new / statistics.median(t)
        rows[name] = {"tokens_per_s": tps, "times_s": t, "vs_hf_generate": tps / anchor}
    # same tokens: the student's fused and per-layer paths, the teacher's fused and per-layer paths and HF.
    # Not a given for a spiking model: a spike-driven sum adds in another order than the dense matmul,
    # and a neuron input within rounding of a level boundary then spikes one level apart.
    def agreement(a: str, b: str) -> dict:
        equal = outputs[a][:, prompt.shape[1]:] == outputs[b][:, prompt.shape[1]:]
        return {"same": bool(equal.all()), "rows_equal": int(equal.all(1).sum()), "rows": int(equal.shape[0]),
                "tokens_equal": int(equal.sum()), "tokens": int(equal.numel())}

    same = {
        "student_fused_vs_per_layer": agreement("student", "student_ref"),
        "teacher_own_fused_vs_per_layer": agreement("teacher_own", "teacher_own_ref"),
        "teacher_own_vs_hf": agreement("teacher_own", "hf_generate"),
    }
    return rows, same


@torch.no_grad()
def generation(args) -> dict:
    hidden, layers, batch, prompt_len, new = 256, 4, args.gen_batch, 8, args.new_tokens
    _, hf = hf_pair(hidden, layers, args.vocab)
    prompt = torch.randint(2, args.vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    made = students(hf, prompt)
    teacher_own = from_teacher(hf, neurons={})
    teacher_own_ref = copy.deepcopy(teacher_own)
    teacher_own_ref.config.scan_backend = "ref"
    models = {"hf_generate": hf, "student": made["student"], "teacher_own": teacher_own,
              "teacher_own_ref": teacher_own_ref, "student_ref": made["student_ref"]}
    rows, same = time_generation(models, prompt, new, args)
    return {"hidden": hidden, "layers": layers, "batch": batch, "prompt_len": prompt_len, "new_tokens": new,
            "models": rows, "same_tokens": same}


def print_training(rows, header=True):
    if header:
        print("training step (forward + LM loss + backward), time / HF + mambapy (median seconds)")
        print(f"{'shape':16s} " + " ".join(f"{name:>16s}" for name in TRAIN_LABELS))
    for row in rows:
        cells = []
        for name in TRAIN_LABELS:
            r = row["models"][name]
            cells.append(f"{'not run':>16s}" if r is None else f"{r['vs_hf_mambapy']:8.3f} ({r['median_s']:5.2f}s)")
        print(f"{row['shape']:16s} " + " ".join(cells), flush=True)


def load_run(run: Path, batch: int, prompt_len: int = 8):
    """A finished run's (student stage, its teacher as HF Mamba with mambapy, its deployed student
    (newest of rl / sparsify / distill) on scan "auto", prompts [batch, prompt_len] cut from its
    held-out corpus blocks). Exits with the reason when the folder lacks one of them."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    stage = next((s for s in ("rl", "sparsify", "distill") if (run / s / "config.json").is_file()), None)
    if stage is None or not (run / "teacher" / "config.json").is_file():
        sys.exit(f"--run {run}: needs a finished teacher/ and one of rl/, sparsify/, distill/ (a model folder each)")
    blocks = load_from_disk(str(run / "data" / "corpus"))["test"]
    if len(blocks) < batch:
        sys.exit(f"--run {run}: {len(blocks)} held-out blocks, fewer than the batch {batch}")
    prompt = torch.tensor([blocks[i]["input_ids"][:prompt_len] for i in range(batch)])
    hf = MambaForCausalLM.from_pretrained(run / "teacher", use_mambapy=True)
    student = AutoModelForCausalLM.from_pretrained(run / stage)
    student.config.scan_backend = "auto"
    return stage, hf, student, prompt


@torch.no_grad()
def generation_of_run(args) -> dict:
    """The generation table for a finished run's own teacher and deployed student (real weights, real text)."""
    run = Path(args.run)
    batch, prompt_len, new = args.gen_batch, 8, args.new_tokens
    stage, hf, student, prompt = load_run(run, batch, prompt_len)
    teacher_own = from_teacher(hf, neurons={})
    copies = {}
    for name, model in {"student": student, "teacher_own": teacher_own}.items():
        copies[name + "_ref"] = copy.deepcopy(model)
        copies[name + "_ref"].config.scan_backend = "ref"
    models = {"hf_generate": hf, "student": student, "teacher_own": teacher_own} | copies
    # use_cache: a run's saved configs say False (training); generation here is the cached kind
    rows, same = time_generation(models, prompt, new, args, use_cache=True)
    return {"run": str(run), "student_stage": stage, "hidden": hf.config.hidden_size,
            "layers": hf.config.num_hidden_layers, "vocab": hf.config.vocab_size, "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new, "student_neurons": sorted(student.config.neurons),
            "models": rows, "same_tokens": same}


def print_generation(gen: dict, title: str) -> None:
    print(f"\n{title}: greedy generate, d{gen['hidden']}x{gen['layers']}, batch {gen['batch']}, "
          f"{gen['new_tokens']} new tokens (tokens/s, x HF generate)")
    for name, label in GEN_LABELS.items():
        r = gen["models"][name]
        print(f"  {label:52s} {r['tokens_per_s']:8.0f}  x{r['vs_hf_generate']:.2f}")
    s, t = gen["models"]["student"], gen["models"]["teacher_own"]
    print(f"  student / teacher on the project's mixer (both fused): x{s['tokens_per_s'] / t['tokens_per_s']:.2f}; "
          f"student / that teacher per-layer: x{s['tokens_per_s'] / gen['models']['teacher_own_ref']['tokens_per_s']:.2f}")
    for pair, a in gen["same_tokens"].items():
        print(f"  same tokens, {pair}: {a['tokens_equal']}/{a['tokens']} new tokens, {a['rows_equal']}/{a['rows']} rows")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model (median kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--shapes", nargs="*", default=None, help="subset of d64x4 d256x4 d768x2")
    parser.add_argument("--hf-loop-max-elements", type=int, default=300_000,
                        help="run the HF loop only where B*L*d_inner is at most this (it is ~10-100x slower)")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--run", default=None,
                        help="a finished run folder: also time its own teacher and deployed student (real weights)")
    parser.add_argument("--quiet-threshold", type=float, default=0.15,
                        help="drop and redo a round in which other processes kept more than this many cores busy")
    parser.add_argument("--max-wait", type=float, default=1800, help="seconds of waiting for quiet rounds, in all")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    global QUIET
    QUIET = Quiet(args.quiet_threshold, args.max_wait) if args.quiet_threshold >= 0 else None
    if not is_mambapy_available():
        sys.exit("peers.py needs the mambapy package (HF's fastest CPU path): pip install --no-deps mambapy==1.2.0")
    torch.set_num_threads(args.threads)
    backend = resolve_backend("auto", torch.device("cpu"))
    if backend != "cpu":
        print(f"warning: scan_backend 'auto' resolves to {backend!r} here (the C++ extension did not build)")

    payload = {
        "what": "CPU training step and cached greedy generation: the student vs transformers' Mamba (HF + mambapy = 1.00)",
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "mambapy": _version("mambapy"), "spiking_scan_auto_on_cpu": backend},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    payload["load_average_start"] = os.getloadavg()  # other jobs on the machine (1, 5, 15 minutes)
    print(f"load average at the start: {payload['load_average_start'][0]:.2f} on {os.cpu_count()} CPUs")
    if not args.skip_training:
        payload["training"] = training(args)
        for row in payload["training"]:
            s, off = row["models"]["student"], row["models"]["student_off"]
            print(f"  {row['shape']}: neurons on / off x{s['median_s'] / off['median_s']:.2f}")
    if not args.skip_generation:
        gen = payload["generation"] = generation(args)
        print_generation(gen, "random weights, SI-LIF D=4 calibrated")
    if args.run:
        gen = payload["generation_of_run"] = generation_of_run(args)
        print_generation(gen, f"{gen['run']}: its teacher and its {gen['student_stage']} student "
                              f"(neurons on {', '.join(gen['student_neurons'])}), held-out text prompts")
    payload["load_average_end"] = os.getloadavg()
    if QUIET is not None:
        payload["quiet"] = {"threshold_cores": QUIET.threshold, "rounds_dropped": QUIET.dropped,
                            "others_cores_in_kept_rounds": QUIET.others_cores,
                            "deadline_reached": time.monotonic() >= QUIET.deadline}
        print(f"rounds dropped for other processes' load: {QUIET.dropped}; others' cores in kept rounds: "
              f"max {max(QUIET.others_cores, default=0):.2f}")
    print(f"load average at the end: {payload['load_average_end'][0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
