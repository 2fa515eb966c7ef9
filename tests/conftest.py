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
