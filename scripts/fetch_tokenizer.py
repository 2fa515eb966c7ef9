"""Build Mamba's tokenizer (GPT-NeoX-20B) as an HF tokenizer folder, offline except for PyPI.

    python scripts/fetch_tokenizer.py                          # -> local/tokenizers/gpt-neox-20b
    python scripts/fetch_tokenizer.py --out DIR --cache DIR

state-spaces/mamba-*-hf use EleutherAI's GPT-NeoX-20B tokenizer. Where the hub cannot be reached,
the same vocabulary ships inside the `llama-cpp-python` source distribution on PyPI (MIT), as the
vocab-only GGUF file `vendor/llama.cpp/models/ggml-vocab-gpt-neox.gguf`: 50,432 tokens (the real
50,277 plus `[PAD…]` placeholders) and 50,009 merges. This script downloads that sdist with pip
(once; cached), reads the GGUF with transformers' own GGUF tokenizer conversion (needs the `gguf`
package, in the dev extra), keeps the real 50,277 tokens, and saves a `PreTrainedTokenizerFast`
with `<|endoftext|>` as BOS / EOS / UNK and `<|padding|>` as the pad token. It then checks known
ids ("Hello world" -> [12092, 1533], " the" -> [253]) and refuses to write a tokenizer that
disagrees. Mamba's embedding has 50,280 rows (padded); the tokenizer's 50,277 fit.

Recipes that need it (recipes/smoke-130m.yaml) name the output folder in `model.tokenizer`; on a
machine with the hub, a recipe keeps loading the teacher's own tokenizer instead.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "local" / "tokenizers" / "gpt-neox-20b"
DEFAULT_CACHE = ROOT / "local" / "downloads"
SDIST = "llama-cpp-python"
GGUF_MEMBER = "vendor/llama.cpp/models/ggml-vocab-gpt-neox.gguf"
REAL_VOCAB = 50277  # GPT-NeoX-20B's tokens; the GGUF pads to 50,432 with "[PADn]" placeholders
BPE_VOCAB = 50254  # ids 0..50253: the BPE vocabulary; 50254..50276: 23 added runs of spaces (24 down to 2)
KNOWN_IDS = {"Hello world": [12092, 1533], " the": [253]}


def sdist_archive(cache: Path) -> Path:
    """The llama-cpp-python source distribution, downloaded with pip into `cache` once."""
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        print(f"downloading the {SDIST} source distribution from PyPI (about 77 MB) into {cache} ...", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache), SDIST]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise SystemExit(f"fetch_tokenizer: `{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    return archives[-1]


def extract(archive: Path, member_suffix: str, target: Path) -> Path:
    """Copy the archive member whose path ends in `member_suffix` to `target`."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(member_suffix)), None)
        if member is None:
            raise SystemExit(f"fetch_tokenizer: {archive} has no {member_suffix}")
        with tar.extractfile(member) as src, open(target, "wb") as dst:
            dst.write(src.read())
    return target


def download_gguf(cache: Path) -> Path:
    """The GGUF file, extracted from the llama-cpp-python sdist (pip download, cached in `cache`)."""
    target = cache / Path(GGUF_MEMBER).name
    return target if target.is_file() else extract(sdist_archive(cache), GGUF_MEMBER, target)


def build_tokenizer(gguf_path: Path):
    """A PreTrainedTokenizerFast from the GGUF's vocabulary, merges and special tokens."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as error:  # pragma: no cover - transformers is pinned
        raise SystemExit(f"fetch_tokenizer: transformers has no GGUF tokenizer support here ({error})") from None
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    try:
        architecture, vocab, config = get_gguf_tokenizer(str(gguf_path))
    except ImportError as error:
        raise SystemExit(f"fetch_tokenizer: {error}; install it with: pip install gguf") from None
    tokens = vocab["tokens"]
    placeholders = [i for i, token in enumerate(tokens) if re.fullmatch(r"\[PAD\d+\]", token)]
    spaces = tokens[BPE_VOCAB:REAL_VOCAB]
    if placeholders != list(range(REAL_VOCAB, len(tokens))) or any(set(t) != {" "} for t in spaces):
        raise SystemExit(f"fetch_tokenizer: {gguf_path} is not the GPT-NeoX vocabulary this script expects")
    # The runs of spaces are GPT-NeoX's added tokens (stored raw in the GGUF). Given to the BPE
    # vocabulary they would be byte-mapped to 'ĠĠ'... and overwrite the BPE tokens of those
    # strings (e.g. id 245): so the BPE part is built alone and the runs are added after it.
    for key in ("tokens", "token_type", "scores"):
        if key in vocab:
            vocab[key] = vocab[key][:BPE_VOCAB]
    backend, _ = convert_gguf_tokenizer(architecture, vocab)
    special = config["eos_token"]  # "<|endoftext|>": BOS, EOS and UNK of GPT-NeoX-20B
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special, eos_token=special, unk_token=special, pad_token="<|padding|>",
        clean_up_tokenization_spaces=False,  # model_max_length: none (documents are packed by the data stage)
    )
    tokenizer.add_tokens([AddedToken(run, normalized=True, special=False) for run in spaces])
    return tokenizer


def check(tokenizer) -> None:
    """Known ids and the vocabulary size; SystemExit naming the first disagreement."""
    if len(tokenizer) != REAL_VOCAB:
        raise SystemExit(f"fetch_tokenizer: built {len(tokenizer)} tokens, expected {REAL_VOCAB}")
    for text, ids in KNOWN_IDS.items():
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            raise SystemExit(f"fetch_tokenizer: {text!r} -> {got}, GPT-NeoX-20B gives {ids}")
    if tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) != [0, 1]:
        raise SystemExit("fetch_tokenizer: <|endoftext|> / <|padding|> are not ids 0 / 1")
    runs = [" " * n for n in range(24, 1, -1)]  # the added runs of spaces, ids 50254..50276
    if tokenizer.convert_tokens_to_ids(runs) != list(range(BPE_VOCAB, REAL_VOCAB)) or len(set(tokenizer.get_vocab().values())) != REAL_VOCAB:
        raise SystemExit("fetch_tokenizer: the 23 runs of spaces are not ids 50254..50276, or two tokens share an id")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"tokenizer folder to write (default {DEFAULT_OUT})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the sdist and the GGUF are kept")
    args = parser.parse_args(argv)
    if (args.out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        check(AutoTokenizer.from_pretrained(args.out))
        print(f"{args.out}: already built and checked")
        return args.out
    tokenizer = build_tokenizer(download_gguf(args.cache))
    check(tokenizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}-"))
    tokenizer.save_pretrained(tmp)  # written whole, then renamed: never half a tokenizer folder
    tmp.rename(args.out)
    print(f"{args.out}: GPT-NeoX-20B tokenizer, {len(tokenizer)} tokens; 'Hello world' -> {KNOWN_IDS['Hello world']}")
    return args.out


if __name__ == "__main__":
    main()
