"""Loader of the arith_mc lm-eval task: the JSONL beside this file, whatever the current directory."""

from pathlib import Path

import datasets


def load_arith_mc(**kwargs) -> datasets.DatasetDict:
    """DatasetDict {"test": the 60 problems of arith_mc.jsonl} (kwargs: lm-eval's metadata, unused)."""
    path = Path(__file__).with_name("arith_mc.jsonl")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
