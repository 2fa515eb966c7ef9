"""Kernels: each fast path beside its PyTorch `_ref` twin, picked by an explicit `backend`.

scan.py            selective_scan_ref / selective_state_update_ref, the dispatch (resolve_backend)
neuron_gate.py     gate_neuron_ref: y·SiLU(z) then the out_proj neuron; its dispatch
cpu_kernels.py     the C++ CPU scan (fwd + bwd) and one-token step, built from cpu_kernels.cpp on
                   first use                                                      (imported lazily)
triton_scan.py     Triton selective scan (fwd + bwd, chunked) and one-token step   (imported lazily)
triton_neurons.py  Triton fused gate + SI-LIF / ATMN (fwd + bwd)                  (imported lazily)
triton_resources.py  compiles the Triton kernels for sm_80 / sm_90, reports registers and spills

The files sit flat in spiking/, next to modeling.py, not in a subpackage: a saved model folder
carries the modeling code (transformers' `custom_object_save`), and transformers copies only the
files a module reaches through same-folder relative imports (`from .scan import ...`). This
module is the dispatch surface the model and the tests import (`from spiking.kernels import ...`).
"""

from .scan import (
    MAMBA_SSM_AVAILABLE,
    SCAN_BACKENDS,
    TRITON_AVAILABLE,
    linear_recurrence,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)
from .neuron_gate import gate_neuron, gate_neuron_ref

__all__ = [
    "MAMBA_SSM_AVAILABLE",
    "SCAN_BACKENDS",
    "TRITON_AVAILABLE",
    "gate_neuron",
    "gate_neuron_ref",
    "linear_recurrence",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
