"""How much a finished stage's held-out reasoning accuracy moves under tiny random weight noise.

Every floating-point tensor of the stage's model is scaled by (1 + scale * N(0, 1)), one seed per
draw, and the held-out problems are scored as every stage scores them (greedy, recurrent path,
`tasks.exact_match_accuracy`). The spread is a noise floor that the bootstrap over problems does
not see: an RL gain smaller than it cannot be told from a perturbation of the same size.

    python benchmarks/weight_noise.py --run runs/small-new --stage sparsify --scale 1e-4 --seeds 4
    python benchmarks/weight_noise.py --run runs/small-new --seeds 0 --against runs/small-rl-X/rl

`--against` also prints how far another model's tensors are from the stage's (the largest change
of any tensor, relative to that tensor's largest value): the size of a real update, beside the noise.

Prints the unperturbed accuracy and one line per seed; writes benchmarks/results/weight_noise.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoTokenizer

import spiking
from stages import tasks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "weight_noise.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (data/ and the stage's folder)")
    parser.add_argument("--stage", default="sparsify", help="the stage whose model is perturbed")
    parser.add_argument("--scale", type=float, default=1e-4, help="relative noise: w * (1 + scale * N(0, 1))")
    parser.add_argument("--seeds", type=int, default=4, help="perturbations drawn")
    parser.add_argument("--samples", type=int, default=400, help="held-out problems scored")
    parser.add_argument("--against", type=Path, help="another model folder (e.g. an rl stage from this stage's model)")
    args = parser.parse_args()

    model_dir = args.run / args.stage
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_from_disk(str(args.run / "data" / "prompts"))["test"]
    prompts = prompts.select(range(min(args.samples, len(prompts))))
    budget = tasks.answer_token_budget(tokenizer, prompts["answer"])
    model = spiking.SpikingMambaForCausalLM.from_pretrained(model_dir).eval()
    clean = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    if args.against is not None:
        other = spiking.SpikingMambaForCausalLM.from_pretrained(args.against).state_dict()
        moved = max(
            ((other[name].float() - tensor.float()).abs().max() / tensor.float().abs().max().clamp_min(1e-12)).item()
            for name, tensor in clean.items() if tensor.is_floating_point()
        )
        print(f"{args.against}: largest relative change of a tensor {moved:.2e}")

    def accuracy() -> float:
        return tasks.exact_match_accuracy(model, tokenizer, prompts, max_new_tokens=budget)["accuracy"]

    result = {"run": str(args.run), "stage": args.stage, "scale": args.scale, "problems": len(prompts),
              "unperturbed": accuracy(), "perturbed": [],
              **({"against": str(args.against), "largest_relative_change": moved} if args.against else {})}
    print(f"{args.stage} unperturbed: {result['unperturbed']:.4f} on {len(prompts)} problems")
    for seed in range(args.seeds):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(clean[name] * (1 + args.scale * torch.randn(tensor.shape, generator=generator)))
        result["perturbed"].append(accuracy())
        print(f"seed {seed}: {result['perturbed'][-1]:.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
