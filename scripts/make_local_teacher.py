"""A local Mamba teacher folder at a real model's shape, with random weights (no hub needed).

    python scripts/make_local_teacher.py --shape mamba-130m             # -> local/teachers/mamba-130m (516 MB)
    python scripts/make_local_teacher.py --shape mamba-130m --layers 2  # same width and vocabulary, 2 of 24 blocks
    python scripts/make_local_teacher.py --shape mamba-1.4b --config-only  # config.json alone (shape checks)

The configs are state-spaces/mamba-*-hf's (d_model, layers, vocab 50280 padded from GPT-NeoX-20B's
50,277, state 16, expand 2, conv 4, tied embeddings), so a recipe that runs on this folder runs
the same code, tensor shapes and memory as on the pretrained model; only the numbers it learns
are meaningless. Weights come from transformers' own `MambaForCausalLM` initialisation under a
fixed seed, saved with `save_pretrained` (safetensors). `--config-only` writes just config.json,
for checks that need the shape, not the weights (a 1.4 B fp32 model is 5.6 GB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# state-spaces/mamba-{130m,370m,790m,1.4b}-hf config.json fields that set the shape
SHAPES: dict[str, dict] = {
    "mamba-130m": {"hidden_size": 768, "num_hidden_layers": 24},
    "mamba-370m": {"hidden_size": 1024, "num_hidden_layers": 48},
    "mamba-790m": {"hidden_size": 1536, "num_hidden_layers": 48},
    "mamba-1.4b": {"hidden_size": 2048, "num_hidden_layers": 48},
}
COMMON = {
    "vocab_size": 50280, "state_size": 16, "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
    "time_step_rank": "auto", "residual_in_fp32": True, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}


def config_for(shape: str, layers: int | None = None):
    from transformers import MambaConfig

    fields = {**COMMON, **SHAPES[shape]}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return MambaConfig(**fields)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (same width and vocab)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write (default local/teachers/<shape>[-<N>l])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-only", action="store_true", help="write config.json only (no weights)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "local" / "teachers" / (args.shape + (f"-{args.layers}l" if args.layers else ""))
    config = config_for(args.shape, args.layers)
    if args.config_only:
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        print(f"{out}: config of {args.shape} ({config.num_hidden_layers} blocks, d_model {config.hidden_size})")
        return out
    if (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text()).get("num_hidden_layers") == config.num_hidden_layers:
        print(f"{out}: already there")
        return out

    import torch
    from transformers import MambaForCausalLM

    torch.manual_seed(args.seed)
    model = MambaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    print(f"{out}: random-weight {args.shape} ({config.num_hidden_layers} blocks, d_model {config.hidden_size}, "
          f"vocab {config.vocab_size}), {params / 1e6:.1f} M parameters")
    return out


if __name__ == "__main__":
    main()
