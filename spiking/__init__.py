"""spikerl's model side: spiking neurons, the SpikingMamba HF model, conversion, energy, kernels.

Importing this package registers `spiking_mamba` with `AutoConfig` / `AutoModelForCausalLM`, so
any stage's output loads with `AutoModelForCausalLM.from_pretrained(folder)` after `import spiking`.
A saved folder also carries modeling.py and the files it imports (see modeling.py's end), so
`from_pretrained(folder, trust_remote_code=True)` loads it where spikerl is not installed.
Nothing here knows about recipes or stages.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .convert import (
    calibrate,
    from_teacher,
    from_transformer,
    init_from_attention,
    is_transformer,
    load_deployed,
    to_hf_mamba,
    upgrade_folder,
)
from .energy import *  # noqa: F403 - helper A's public names (estimate_energy, energy_ratio, ...)
from .energy import __all__ as _energy_all
from .kernels import selective_scan, selective_scan_ref, selective_state_update, selective_state_update_ref
from .modeling import (
    PLACEMENTS,
    SpikingMambaConfig,
    SpikingMambaForCausalLM,
    SpikingMambaModel,
    SpikingMambaPreTrainedModel,
    default_neurons,
    lora_target_modules,
)
from .neurons import *  # noqa: F403 - SILIF, ATMN, NEURON_KINDS, make_neuron, count_spikes, ...
from .neurons import __all__ as _neurons_all

AutoConfig.register(SpikingMambaConfig.model_type, SpikingMambaConfig, exist_ok=True)
AutoModel.register(SpikingMambaConfig, SpikingMambaModel, exist_ok=True)
AutoModelForCausalLM.register(SpikingMambaConfig, SpikingMambaForCausalLM, exist_ok=True)

__all__ = [
    "PLACEMENTS",
    "SpikingMambaConfig",
    "SpikingMambaForCausalLM",
    "SpikingMambaModel",
    "SpikingMambaPreTrainedModel",
    "calibrate",
    "default_neurons",
    "from_teacher",
    "from_transformer",
    "init_from_attention",
    "is_transformer",
    "load_deployed",
    "lora_target_modules",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "to_hf_mamba",
    "upgrade_folder",
    *_neurons_all,
    *_energy_all,
]
