"""Kernels: each fast path beside its PyTorch `_ref` twin, picked by an explicit `backend`."""

from .scan import (
    MAMBA_SSM_AVAILABLE,
    SCAN_BACKENDS,
    linear_recurrence,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

__all__ = [
    "MAMBA_SSM_AVAILABLE",
    "SCAN_BACKENDS",
    "linear_recurrence",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
