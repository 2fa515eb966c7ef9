"""Teacher (HF Mamba) -> SpikingMamba student, neuron calibration, and the way back to HF Mamba.

    student = from_teacher("state-spaces/mamba-130m-hf", neurons=default_neurons(D=4),
                           calibration_batches=[{"input_ids": ids, "attention_mask": mask}])
    calibrate(student, batches)      # thresholds from the teacher's activations (99.9th pct of |x|)
    teacher = to_hf_mamba(student)   # only for a neuron-free, MLP-free student
    student = load_deployed("runs/tiny/distill")   # a saved student as deployed: SGC off, spikes on
    upgrade_folder("old/distill")    # a folder saved before the neuron rename: new names, its code
    student = from_transformer("runs/llama/teacher", neurons=default_neurons(), keep_attention=[2])

A Mamba teacher's student has the teacher's architecture and weights (same parameter names). A
Transformer teacher (Llama layout) gets a Mamba student whose mixers start from its attention
weights (`from_transformer`, methods.md §13). Neurons start uncalibrated until `calibrate` runs.
Mamba2 teachers are not supported yet.
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
_SPIKING_KEYS = {"neurons", "spiking", "mlp_intermediate_size", "scan_backend", "bc_proj", "attention_layers", "attention"}
# Transformer teachers whose decoder layer is Llama's: q/k/v/o projections (RoPE), a gated SiLU MLP
# (gate/up/down), RMSNorm before each. Their FFN fits the student's MLP, their attention transformers'
# LlamaAttention (Qwen2's q/k/v biases included: a kept layer gets attention_bias and a zero o_proj
# bias). GPT-2 (LayerNorm, GELU MLP, fused c_attn) does not fit.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")


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
    keep_attention: Iterable[int] = (),
    **config_overrides,
) -> SpikingMambaForCausalLM:
    """The student: teacher's config + `neurons` + overrides, teacher's weights, on its device/dtype.

    New modules (neurons, an MLP from `mlp_intermediate_size`) keep their own initialisation; with
    `calibration_batches` the neurons are calibrated on the teacher's activations. A Transformer
    teacher goes to `from_transformer` (with `keep_attention` and the overrides).
    """
    if is_transformer(teacher):
        return from_transformer(teacher, neurons=neurons, keep_attention=keep_attention,
                                calibration_batches=calibration_batches, **config_overrides)
    if list(keep_attention):
        raise ValueError("keep_attention: the teacher is a Mamba; only a Transformer teacher has attention to keep")
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


def is_transformer(teacher) -> bool:
    """Is `teacher` (an instance, hub id or folder) an attention model rather than a Mamba?"""
    if isinstance(teacher, (str, Path)):
        model_type = AutoConfig.from_pretrained(str(teacher)).model_type
    else:
        model_type = getattr(getattr(teacher, "config", None), "model_type", None)
    return model_type not in ("mamba", "mamba2", SpikingMambaConfig.model_type, None)


def _transformer_teacher(teacher):
    """A Llama-layout causal LM from an instance, a hub id or a folder; other layouts -> a clear error."""
    if isinstance(teacher, (str, Path)):
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher))
    config = teacher.config
    if config.model_type not in LLAMA_LAYOUT:
        raise ValueError(
            f"from_transformer: teacher model_type {config.model_type!r} is not supported; the student's block "
            f"(RMSNorm, gated SiLU MLP) holds Llama-layout teachers: {list(LLAMA_LAYOUT)}"
        )
    problems = {
        "hidden_act": (config.hidden_act, "silu"), "mlp_bias": (getattr(config, "mlp_bias", False) or False, False),
        "sliding_window": (getattr(config, "sliding_window", None), None),
    }
    for key, (value, wanted) in problems.items():
        if value != wanted:
            raise ValueError(f"from_transformer: teacher config {key}={value!r} is not supported (needs {wanted!r})")
    kinds = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]) - {"full_attention"})
    if kinds:
        raise ValueError(f"from_transformer: teacher layer_types {kinds} are not supported (full attention only)")
    return teacher


def _attention_bias(attention) -> bool:
    """Whether an attention module has any projection bias (Qwen2: q, k, v; Llama with attention_bias: all four)."""
    return any(getattr(attention, f"{n}_proj").bias is not None for n in "qkvo")


@torch.no_grad()
def init_from_attention(mixer, attention, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Initialise a `bc_proj` Mamba mixer from one attention layer (methods.md §13, MambaInLlama).

    Copied: x (in_proj's first half) <- V, repeated per query head as GQA shares it; B <- K;
    C <- Q, the query heads sharing one KV head averaged, times the score scale 1/sqrt(head_dim);
    out_proj <- O. Projection biases (Qwen2's q/k/v) have no place in the mixer and are dropped.
    The state size N takes the first N rows of K and of the averaged Q (all of them
    at N = num_kv_heads·head_dim: then C·B = Σ_kv-heads q·k/sqrt(dh), one merged head). The conv
    starts as the identity (x = SiLU(V·h) at the start). New (the mixer's own initialisation): the
    gate z (in_proj's second half), Δ (x_proj, dt_proj), A, D. RoPE and the softmax have no place.
    """
    D, N = mixer.intermediate_size, mixer.ssm_state_size
    if num_heads * head_dim != D:
        raise ValueError(f"init_from_attention: heads·head_dim = {num_heads * head_dim} but the mixer width is {D}")
    if N > num_kv_heads * head_dim:
        raise ValueError(f"init_from_attention: state_size {N} > key width {num_kv_heads * head_dim}")
    groups = num_heads // num_kv_heads
    hidden = attention.v_proj.in_features
    v = attention.v_proj.weight.view(num_kv_heads, head_dim, hidden).repeat_interleave(groups, dim=0)
    mixer.in_proj.weight[:D].copy_(v.reshape(D, hidden))
    q = attention.q_proj.weight.view(num_kv_heads, groups, head_dim, hidden).mean(dim=1).reshape(-1, hidden)
    mixer.bc_proj.weight[:N].copy_(attention.k_proj.weight[:N])
    mixer.bc_proj.weight[N:].copy_(q[:N] * head_dim**-0.5)
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0  # the tap on the current token
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()


def from_transformer(
    teacher,
    neurons: dict | None = None,
    keep_attention: Iterable[int] = (),
    calibration_batches: Iterable | None = None,
    attention_init: bool = True,
    **config_overrides,
) -> SpikingMambaForCausalLM:
    """A (spiking) Mamba student of a Llama-layout Transformer teacher (instance, hub id or folder).

    From the teacher: tokenizer ids and vocabulary, embeddings, every RMSNorm, the LM head, each
    layer's FFN as the student's MLP (`mlp_intermediate_size`), and for layers in `keep_attention`
    the attention itself (transformers' LlamaAttention, KV cache in generation). Every other
    attention layer becomes a Mamba mixer with B, C from the block input (`bc_proj`), of width
    heads·head_dim and state size num_kv_heads·head_dim (override `state_size` for less),
    initialised by `init_from_attention` (`attention_init=False`: Mamba's own initialisation
    instead, the ablation of MambaInLlama's choice). `config_overrides` go to SpikingMambaConfig
    (conv_kernel, scan_backend, state_size, ...).
    """
    teacher = _transformer_teacher(teacher)
    tc = teacher.config
    keep = sorted(set(int(i) for i in keep_attention))
    bad = [i for i in keep if not 0 <= i < tc.num_hidden_layers]
    if bad:
        raise ValueError(f"keep_attention: {bad[0]} is not a layer id of the teacher (0..{tc.num_hidden_layers - 1})")
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads or tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    if (heads * head_dim) % tc.hidden_size:
        raise ValueError(f"from_transformer: heads·head_dim = {heads * head_dim} is not a multiple of hidden_size {tc.hidden_size}")
    fields = dict(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=tc.num_hidden_layers,
        state_size=kv_heads * head_dim, expand=heads * head_dim // tc.hidden_size, conv_kernel=4,
        use_bias=False, use_conv_bias=True, layer_norm_epsilon=tc.rms_norm_eps, residual_in_fp32=False,
        tie_word_embeddings=tc.tie_word_embeddings, pad_token_id=tc.pad_token_id, bos_token_id=tc.bos_token_id,
        eos_token_id=tc.eos_token_id, initializer_range=tc.initializer_range, mlp_intermediate_size=tc.intermediate_size,
        bc_proj=True, attention_layers=keep,
        attention=dict(
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            attention_bias=_attention_bias(teacher.model.layers[0].self_attn),
            attention_dropout=tc.attention_dropout, rope_parameters=dict(tc.rope_parameters),
            max_position_embeddings=tc.max_position_embeddings,
        ),
    )
    fixed = sorted({"bc_proj", "attention_layers", "attention"} & set(config_overrides))
    if fixed:  # the conversion sets them (the weights are copied to match): keep_attention chooses the layers
        raise ValueError(f"from_transformer: {fixed[0]!r} is set by the conversion; choose kept layers with keep_attention")
    unknown = sorted(set(config_overrides) - set(fields) - _SPIKING_KEYS - {"conv_kernel", "time_step_rank"})
    if unknown:
        raise ValueError(f"from_transformer: unknown config override {unknown[0]!r}")
    config = SpikingMambaConfig(**(fields | config_overrides | {"neurons": dict(neurons or {})}))
    parameter = next(teacher.parameters())
    student = SpikingMambaForCausalLM(config).to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        source = teacher.model
        student.backbone.embeddings.weight.copy_(source.embed_tokens.weight)
        student.backbone.norm_f.weight.copy_(source.norm.weight)
        if not config.tie_word_embeddings:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
        for i, (block, layer) in enumerate(zip(student.backbone.layers, source.layers)):
            block.norm.load_state_dict(layer.input_layernorm.state_dict())
            block.mlp_norm.load_state_dict(layer.post_attention_layernorm.state_dict())
            for name in ("gate_proj", "up_proj", "down_proj"):  # the student's MLP may hold neurons too
                getattr(block.mlp, name).weight.copy_(getattr(layer.mlp, name).weight)
            if i in keep:
                state = layer.self_attn.state_dict()
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # a bias the teacher lacks is 0 (Qwen2's o_proj)
                    if config.attention["attention_bias"] and f"{name}.bias" not in state:
                        state[f"{name}.bias"] = torch.zeros_like(getattr(block.mixer, name).bias)
                block.mixer.load_state_dict(state)
            elif attention_init:
                init_from_attention(block.mixer, layer.self_attn, heads, kv_heads, head_dim)
    student.config._name_or_path = tc._name_or_path
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
    if config.bc_proj or config.attention_layers:
        raise ValueError("to_hf_mamba: the model was converted from a Transformer (bc_proj / kept attention); HF Mamba has neither")
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


__all__ = ["LLAMA_LAYOUT", "calibrate", "from_teacher", "from_transformer", "init_from_attention", "is_transformer", "load_deployed", "to_hf_mamba", "upgrade_folder"]
