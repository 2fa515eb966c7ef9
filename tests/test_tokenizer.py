"""Mamba's real tokenizer, built offline from the GGUF vocabulary on PyPI (scripts/fetch_tokenizer.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_tokenizer", ROOT / "scripts" / "fetch_tokenizer.py")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def test_known_ids_and_the_vocabulary_of_gpt_neox_20b(gpt_neox_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(gpt_neox_tokenizer)
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [12092, 1533]
    assert tokenizer(" the", add_special_tokens=False)["input_ids"] == [253]
    assert len(tokenizer) == 50277 <= 50280  # fits mamba-130m-hf's padded embedding
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (0, 0, 1)
    # the 23 runs of spaces are added tokens after the BPE vocabulary, which keeps its own "ĠĠ" (245)
    assert tokenizer.convert_tokens_to_ids([" " * 24, "  "]) == [50254, 50276]
    assert tokenizer.convert_ids_to_tokens(245) == "ĠĠ"
    text = "def f(x):\n    return  x  # über, naïve: 3.14\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: every string round-trips


def test_a_tokenizer_that_is_not_gpt_neox_is_refused(gpt_neox_tokenizer, tmp_path):
    gpt2 = fetch.extract(fetch.sdist_archive(fetch.DEFAULT_CACHE), "models/ggml-vocab-gpt-2.gguf", tmp_path / "gpt2.gguf")
    with pytest.raises(SystemExit, match="is not the GPT-NeoX vocabulary"):
        fetch.build_tokenizer(gpt2)
    from stages.data import build_char_tokenizer

    with pytest.raises(SystemExit, match="built 18 tokens, expected 50277"):
        fetch.check(build_char_tokenizer("0123456789+-*="))
