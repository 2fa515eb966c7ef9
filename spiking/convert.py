"""Teacher (HF Mamba) -> SpikingMamba student, neuron calibration, and the way back to HF Mamba.

    student = from_teacher("state-spaces/mamba-130m-hf", neurons=default_neurons(D=4),
                           calibration_batches=[{"input_ids": ids, "attention_mask": mask}])
    calibrate(student, batches)      # thresholds from the teacher's activations (99.9th pct of |x|)
    teacher = to_hf_mamba(student)   # only for a neuron-free, MLP-free student
    student = load_deployed("runs/tiny/distill")   # a saved student as deployed: SGC off, spikes on
    upgrade_folder("old/distill")    # a folder saved before the neuron rename: new names, its code

The student has the teacher's architecture and weights (same parameter names); neurons start
uncalibrated until `calibrate` runs. Mamba2 teachers are not supported yet.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from .modeling import SpikingMambaConfig, SpikingMambaForCausalLM
from .neurons import NEURON_MODULE_NAMES, iter_neurons, set_sgc_lambda

logger = logging.getLogger(__name__)

# Config keys that are bookkeeping, not architecture: never copied between config classes.
_BOOKKEEPING_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"}
_SPIKING_KEYS = {"neurons", "spiking", "mlp_intermediate_size", "scan_backend"}


def _mamba2_error(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"teacher {what} is a Mamba2 model (model_type 'mamba2'): Mamba2 teachers are not supported yet; "
        "use a Mamba (v1) teacher such as state-spaces/mamba-130m-hf"
    )


def _load_teacher(teacher: MambaForCausalLM | SpikingMambaForCausalLM | str | Path):
    """A Mamba from an instance, a hub id or a folder; other model types -> error.

    HF `MambaForCausalLM` is the usual teacher. A `SpikingMambaForCausalLM` is accepted too: a
    Mamba+MLP teacher (no HF class has that block) or a distilled student refined further.
    """
    if isinstance(teacher, (str, Path)):
        config = AutoConfig.from_pretrained(str(teacher))
        if config.model_type == "mamba2":
            raise _mamba2_error(repr(str(teacher)))
        if config.model_type == SpikingMambaConfig.model_type:
            return SpikingMambaForCausalLM.from_pretrained(str(teacher))
        if config.model_type != "mamba":
            raise ValueError(
                f"teacher {str(teacher)!r} has model_type {config.model_type!r}; only 'mamba' teachers "
                "(MambaForCausalLM) can be converted"
            )
        return MambaForCausalLM.from_pretrained(str(teacher))
    if isinstance(teacher, Mamba2ForCausalLM):
        raise _mamba2_error(type(teacher).__name__)
    if not isinstance(teacher, (MambaForCausalLM, SpikingMambaForCausalLM)):
        model_type = getattr(getattr(teacher, "config", None), "model_type", None)
        raise ValueError(
            f"teacher must be a MambaForCausalLM (or its hub id / folder), got {type(teacher).__name__} "
            f"(model_type {model_type!r})"
        )
    return teacher


def from_teacher(
    teacher: MambaForCausalLM | str | Path,
    neurons: dict | None = None,
    calibration_batches: Iterable | None = None,
    **config_overrides,
) -> SpikingMambaForCausalLM:
    """The student: teacher's config + `neurons` + overrides, teacher's weights, on its device/dtype.

    New modules (neurons, an MLP from `mlp_intermediate_size`) keep their own initialisation; with
    `calibration_batches` the neurons are calibrated on the teacher's activations.
    """
    teacher = _load_teacher(teacher)
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in _BOOKKEEPING_KEYS}
    unknown = sorted(set(config_overrides) - set(fields) - _SPIKING_KEYS)
    if unknown:
        raise ValueError(f"from_teacher: unknown config override {unknown[0]!r}")
    config = SpikingMambaConfig(**(fields | config_overrides | {"neurons": dict(neurons or {})}))
    student = SpikingMambaForCausalLM(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    # a spiking teacher's neurons that the student does not have (other placement or kind) are dropped
    unexpected = [k for k in unexpected if ".neurons." not in k]
    if unexpected:
        raise ValueError(f"from_teacher: teacher weights with no place in the student: {unexpected[:5]}")
    new = [k for k in missing if ".neurons." not in k and ".mlp." not in k and ".mlp_norm." not in k]
    if new:
        raise ValueError(f"from_teacher: student weights missing from the teacher: {new[:5]}")
    parameter = next(teacher.parameters())
    student.to(device=parameter.device, dtype=parameter.dtype)
    student.config._name_or_path = teacher.config._name_or_path
    if calibration_batches is not None:
        calibrate(student, calibration_batches)
    return student


def _model_inputs(batch, device: torch.device) -> dict:
    """A batch (dict with input_ids [, attention_mask] or an input_ids tensor) on `device`."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch.to(device)}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("calibration batches must be dicts with 'input_ids' (and optionally 'attention_mask')")
    inputs = {"input_ids": torch.as_tensor(batch["input_ids"]).to(device)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = torch.as_tensor(batch["attention_mask"]).to(device)
    return inputs


@torch.no_grad()
def calibrate(
    model: SpikingMambaForCausalLM,
    batches: Iterable,
    skip_calibrated: bool = False,
    max_values_per_neuron: int = 2**24,
) -> int:
    """Calibrate every neuron's threshold on its inputs over `batches`; returns how many were set.

    The neurons pass their input through unchanged while this runs, so each one sees the dense
    (teacher) activations, as methods.md §4 prescribes. Padded positions are left out. Each
    neuron keeps a uniform random sample of at most `max_values_per_neuron` values (rows of C),
    so memory stays bounded on large models. `skip_calibrated` leaves already calibrated neurons
    (e.g. on resume) as they are.
    """
    neurons = [(n, m) for n, m in iter_neurons(model) if not (skip_calibrated and bool(m.calibrated))]
    if not neurons:
        return 0
    device = next(model.parameters()).device
    pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (rows [M, C], random keys [M])
    current_mask: list[torch.Tensor | None] = [None]

    def capture(name, channels):
        max_rows = max(1, max_values_per_neuron // channels)

        def hook(module, args, output):
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                x = x[mask.bool()]  # real tokens only
            rows = x.reshape(-1, channels).float()
            keys = torch.rand(rows.shape[0], device=rows.device)
            if name in pools:  # reservoir sampling: keep the rows with the largest random keys
                rows = torch.cat([pools[name][0], rows])
                keys = torch.cat([pools[name][1], keys])
            if rows.shape[0] > max_rows:
                keep = keys.topk(max_rows).indices
                rows, keys = rows[keep], keys[keep]
            pools[name] = (rows, keys)
            return args[0]  # pass-through: downstream layers see the dense activations

        return hook

    handles = [m.register_forward_hook(capture(n, m.channels)) for n, m in neurons]
    was_training, was_spiking = model.training, model.config.spiking
    model.eval()
    model.config.spiking = True  # the neurons must be called for the hooks to see their inputs
    try:
        for batch in batches:
            inputs = _model_inputs(batch, device)
            current_mask[0] = inputs.get("attention_mask")
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.config.spiking = was_spiking
        model.train(was_training)
    if not pools:
        raise ValueError("calibrate: no batches (or no tokens) to calibrate on")
    for name, neuron in neurons:
        neuron.calibrate_(pools[name][0])
    return len(neurons)


def to_hf_mamba(model: SpikingMambaForCausalLM) -> MambaForCausalLM:
    """A genuine HF MambaForCausalLM with the same weights (student without neurons and MLP only)."""
    config = model.config
    if config.neurons:
        raise ValueError(f"to_hf_mamba: the model has neurons {sorted(config.neurons)}; HF Mamba has none")
    if config.mlp_intermediate_size is not None:
        raise ValueError("to_hf_mamba: the model has an MLP (mlp_intermediate_size set); HF Mamba has none")
    fields = {
        k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING_KEYS and k not in _SPIKING_KEYS
    }
    fields.pop("intermediate_size", None)  # MambaConfig derives it from expand
    hf_model = MambaForCausalLM(MambaConfig(**fields))
    hf_model.load_state_dict(model.state_dict(), strict=True)
    parameter = next(model.parameters())
    return hf_model.to(device=parameter.device, dtype=parameter.dtype)


# A neuron key as saved before the neuron modules were renamed so PEFT's name-suffix targets miss
# them: `...mixer.neurons.in_proj.log_V` (now `...neurons.in_proj_input.log_V`), `...mlp.neurons.up.a`.
_OLD_NEURON_KEY = re.compile(r"\.(mixer\.neurons\.(?:in_proj|x_proj|out_proj)|mlp\.neurons\.(?:up|down))\.")


def _new_neuron_key(key: str) -> str:
    def rename(match: re.Match) -> str:
        module, old = match.group(1).rsplit(".", 1)
        placement = old if module.startswith("mixer") else f"mlp.{old}"
        return f".{module}.{NEURON_MODULE_NAMES[placement]}."

    return _OLD_NEURON_KEY.sub(rename, key)


def _old_neuron_keys(folder: Path) -> list[str]:
    """Neuron keys of the folder's safetensors files that use the names before the rename."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found += [key for key in f.keys() if _OLD_NEURON_KEY.search(key)]
    return found


def upgrade_folder(folder: str | Path) -> int:
    """Bring a student folder saved before the neuron rename up to date, in place; returns how many
    tensors were renamed (0: nothing to do).

    The neuron weights get their new names (`mixer.neurons.in_proj` -> `mixer.neurons.in_proj_input`,
    `mlp.neurons.up` -> `mlp.neurons.up_input`, see `spiking.NEURON_MODULE_NAMES`), in every
    safetensors file and its index; then the model is loaded and saved again, which writes the
    modeling code beside it and `auto_map` in HF's form (the folder then loads without spikerl).
    """
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    renamed = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        new = {_new_neuron_key(key): value for key, value in tensors.items()}
        changed = sum(old != key for old, key in zip(tensors, new))
        if changed:
            save_file(new, str(path), metadata={"format": "pt"})
            renamed += changed
    index = folder / "model.safetensors.index.json"
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_new_neuron_key(key): file for key, file in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    if renamed:
        SpikingMambaForCausalLM.from_pretrained(str(folder)).save_pretrained(str(folder))
    return renamed


def load_deployed(folder: str | Path, **kwargs) -> torch.nn.Module:
    """A saved student as it is deployed: SGC off (λ = 0), spikes on, eval mode.

    `kwargs` go to `AutoModelForCausalLM.from_pretrained`. SGC's λ is a training-time setting that
    is not saved, and `spiking: false` in a folder's config is a debugging switch: both are reset
    here, so every stage measures and trains the same spike-driven model (a warning says when
    spikes were off). A local folder saved before the neuron rename is refused (its thresholds
    would load as fresh ones), naming `upgrade_folder`.
    """
    old = _old_neuron_keys(Path(folder)) if Path(folder).is_dir() else []
    if old:
        raise ValueError(
            f"{folder}: saved before spikerl renamed the neuron modules ({old[0]} is now "
            f"{_new_neuron_key(old[0])}); convert it once with spiking.upgrade_folder({str(folder)!r})"
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    set_sgc_lambda(model, 0.0)
    if getattr(model.config, "spiking", True) is False:
        logger.warning("%s was saved with spiking=false; switching spikes on (the deployed model)", folder)
        model.config.spiking = True
    return model.eval()


__all__ = ["calibrate", "from_teacher", "load_deployed", "to_hf_mamba", "upgrade_folder"]
