"""Rollout speed: generated tokens/s of the spiking policy vs its Mamba teacher vs a same-size Llama (CPU).

RL spends most of its time generating, so this times `model.generate` (the recurrent path with
the cache for both Mambas, the KV cache for Llama) at several completion lengths. Every model
generates exactly `length` new tokens (min_new_tokens = max_new_tokens, greedy) for a batch of
prompts; the first call of each model is a warm-up and is not timed.

    python benchmarks/rollout.py                           # hidden 64, 4 layers, batch 8, lengths 64 256 1024
    python benchmarks/rollout.py --run-dir runs/tiny       # the run's distill student and teacher
    python benchmarks/rollout.py --hidden 256 --threads 2 --lengths 64 256

Models (random weights unless --run-dir): the teacher is HF `MambaForCausalLM`; the policy is
`spiking.from_teacher(teacher)` with the paper's neurons (SI-LIF D=4 on in_proj and out_proj)
calibrated on the prompts; Llama has the same hidden size, layer count and vocabulary and an MLP
sized to about the teacher's parameter count. Prints a table with ratios and writes
benchmarks/results/rollout.json. Ratios within one run on one machine; never compare absolute
figures across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

import spiking

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rollout.json"


def build_models(args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    if args.run_dir:
        run = Path(args.run_dir)
        teacher = AutoModelForCausalLM.from_pretrained(run / "teacher")
        policy_dir = run / "sparsify" if (run / "sparsify" / "model.safetensors").is_file() else run / "distill"
        policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    else:
        teacher = MambaForCausalLM(
            MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16)
        )
        calibration = [{"input_ids": torch.randint(0, args.vocab, (8, 32))}]
        policy = spiking.from_teacher(teacher, neurons=spiking.default_neurons(D=4), calibration_batches=calibration)
    config = teacher.config
    mamba_params = sum(p.numel() for p in teacher.parameters())
    embed = config.vocab_size * config.hidden_size
    # Llama block: 4·H² attention + 3·H·I MLP; pick I so the total matches the Mamba's
    per_layer = (mamba_params - embed) / config.num_hidden_layers
    intermediate = max(8, int((per_layer - 4 * config.hidden_size**2) / (3 * config.hidden_size)))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            intermediate_size=intermediate, num_attention_heads=max(1, config.hidden_size // 32),
            max_position_embeddings=max(args.lengths) + 64, tie_word_embeddings=True,
        )
    )
    spiking.set_sgc_lambda(policy, 0.0)
    return {"spiking_policy": policy.eval(), "mamba_teacher": teacher.eval(), "llama_same_size": llama.eval()}


@torch.no_grad()
def tokens_per_second(model, prompt_ids: torch.Tensor, length: int, reps: int) -> float:
    kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs | {"max_new_tokens": 4, "min_new_tokens": 4})
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
        best = min(best, time.perf_counter() - start)
        assert out.shape[1] == prompt_ids.shape[1] + length
    return prompt_ids.shape[0] * length / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="use RUN_DIR/teacher and RUN_DIR/distill (or sparsify)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together (a rollout batch)")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = build_models(args)
    vocab = next(iter(models.values())).config.vocab_size
    torch.manual_seed(1)
    prompt_ids = torch.randint(2, vocab, (args.batch, args.prompt_len))
    rows = []
    for length in args.lengths:
        row = {"completion_length": length}
        for name, model in models.items():
            row[name] = tokens_per_second(model, prompt_ids, length, args.reps)
        row["policy_vs_teacher"] = row["spiking_policy"] / row["mamba_teacher"]
        row["policy_vs_llama"] = row["spiking_policy"] / row["llama_same_size"]
        rows.append(row)
        print(
            f"len {length:5d}: policy {row['spiking_policy']:8.1f} tok/s  teacher {row['mamba_teacher']:8.1f}  "
            f"llama {row['llama_same_size']:8.1f}  policy/teacher {row['policy_vs_teacher']:.2f}x  "
            f"policy/llama {row['policy_vs_llama']:.2f}x",
            flush=True,
        )
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    result = {
        "what": "generated tokens/s (batch x new tokens / best wall time of model.generate), greedy, CPU",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "versions": {"torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": params,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"parameters: {params}\nwrote {args.out}")


if __name__ == "__main__":
    main()
