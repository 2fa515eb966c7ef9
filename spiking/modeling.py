"""SpikingMamba: an HF `PreTrainedModel` Mamba LM with spiking neurons on chosen linear-layer inputs.

With `neurons = {}` (or `spiking = False`) the model computes exactly what transformers 5.24's
`MambaForCausalLM` computes (same parameter names, same numerics, same left-padding handling), so a
teacher checkpoint loads directly and `convert.to_hf_mamba` gives a genuine HF Mamba back.

Per block (B batch, L tokens, H hidden, D = expand·H mixer channels, N state):

    x [B, L, H] ─ RMSNorm ─ neuron(in_proj) ─ in_proj ─┬─ u ─ causal conv1d ─ SiLU ─┬─ neuron(x_proj) ─ x_proj ─ Δ, B, C
                                                       │                             └─ selective scan(u, Δ, A, B, C, D) ─ y
                                                       └─ z ─────────────────────────── y · SiLU(z) ─ neuron(out_proj) ─ out_proj
    + residual; optional gated MLP (own RMSNorm, neurons on mlp.up and mlp.down inputs) + residual

A student converted from a Transformer (`spiking.from_transformer`, methods.md §13) has two more
kinds of block: a mixer with `bc_proj` (B and C projected from the block input, where the teacher's
keys and queries were copied, x_proj then yielding Δ only), and, for ids in `attention_layers`,
transformers' own `LlamaAttention` as the mixer (a kept attention layer; a KV cache in generation).

Generation is recurrent: the cache (HF `DynamicCache` with one linear-attention layer per block)
holds the last `conv_kernel` conv inputs and the SSM state [B, D, N] per layer, so each new token
costs the same memory and time whatever the length. Neurons act per token (no state across
tokens), so the recurrent path gives the same values as the full-sequence path.

Usage: `import spiking` registers the classes; then `AutoModelForCausalLM.from_pretrained(folder)`.
A saved folder also carries this file and the files it imports (register_for_auto_class below), so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it where spikerl is
not installed: the copies need only torch, transformers and pydantic (triton, mamba-ssm optional).
Every import between the copied files is a same-folder relative import (`from .neurons import`):
those are the ones transformers' remote-code loader follows and copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, MambaConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.utils import ModelOutput

from .fused_step import decode_step, head_logits
from .kernels import SCAN_BACKENDS, gate_neuron, resolve_backend, selective_scan, selective_state_update
from .neurons import ATMN, DEFAULT_D, NEURON_MODULE_NAMES, NeuronSpec, make_neuron

# Where a neuron may sit: the input of that linear layer. "mlp.*" need `mlp_intermediate_size`.
MIXER_PLACEMENTS = ("in_proj", "x_proj", "dt_proj", "out_proj")
MLP_PLACEMENTS = ("mlp.up", "mlp.down")
# "head": the LM head's input, the last op inside the backbone (after norm_f), so TRL's fused LM head
# (which multiplies `backbone(...).last_hidden_state` by the head weight itself) sees the spikes too
MODEL_PLACEMENTS = ("head",)
PLACEMENTS = MIXER_PLACEMENTS + MLP_PLACEMENTS + MODEL_PLACEMENTS


def default_neurons(D: int = DEFAULT_D, learnable: bool = True) -> dict[str, dict]:
    """The SpikingMamba paper's placement: SI-LIF with D levels on the inputs of in_proj and out_proj."""
    spec = NeuronSpec(kind="si_lif", D=D, learnable=learnable).to_config()
    return {"in_proj": dict(spec), "out_proj": dict(spec)}


def lora_target_modules(names=("in_proj", "x_proj", "dt_proj")) -> list[str]:
    """PEFT `target_modules` for the mixer's linear layers: the plain list, Mamba's usual LoRA target.

    PEFT matches a list by name suffix; no neuron's name ends in a projection's name (the neuron
    on in_proj's input is `mixer.neurons.in_proj_input`), so the list adapts the projections only.
    """
    return list(names)


class SpikingMambaConfig(MambaConfig):
    """`MambaConfig` plus the spiking fields.

    neurons: placement -> neuron spec (see `spiking.neurons.make_neuron`); {} = plain Mamba.
    spiking: False bypasses every neuron at run time (the logits then equal the teacher's).
    mlp_intermediate_size: width of an optional gated MLP after the mixer in each block (None = none).
        Not `intermediate_size`: MambaConfig already uses that name for the mixer width expand·H.
    scan_backend: "auto" | "ref" | "cpu" | "triton" | "mamba_ssm" (see `spiking/scan.py`).
    bc_proj: B and C are projected from the block input (a `bc_proj` linear beside in_proj), not from the
        conv output through x_proj (which then yields Δ only): MambaInLlama's Mamba-1 mixer, the shape an
        attention layer's keys and queries map onto (`spiking.from_transformer`, methods.md §13).
    attention_layers: ids of blocks whose mixer is kept as the teacher's attention (a hybrid student;
        generation keeps a KV cache for them). Their mixer carries no neurons (their MLP may).
    attention: the attention layers' settings, `LlamaConfig` fields (num_attention_heads,
        num_key_value_heads, head_dim, attention_bias, rope_parameters, max_position_embeddings).
    """

    model_type = "spiking_mamba"

    neurons: dict = field(default_factory=dict)
    spiking: bool = True
    mlp_intermediate_size: int | None = None
    scan_backend: str = "auto"
    bc_proj: bool = False
    attention_layers: list = field(default_factory=list)
    attention: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.neurons, dict):
            raise ValueError(f"neurons must be a dict placement -> spec, got {type(self.neurons).__name__}")
        for placement, spec in self.neurons.items():
            if placement not in PLACEMENTS:
                raise ValueError(f"neurons: unknown placement {placement!r}; known: {list(PLACEMENTS)}")
            if not isinstance(spec, dict):
                raise ValueError(f"neurons.{placement}: spec must be a dict, got {type(spec).__name__}")
            try:
                NeuronSpec.of(spec)  # a bad spec fails here, naming the placement, not at the first forward
            except ValueError as error:
                raise ValueError(f"neurons.{placement}: {error}") from error
            if placement in MLP_PLACEMENTS and self.mlp_intermediate_size is None:
                raise ValueError(f"neurons: placement {placement!r} needs mlp_intermediate_size (no MLP otherwise)")
        if self.mlp_intermediate_size is not None and self.mlp_intermediate_size < 1:
            raise ValueError(f"mlp_intermediate_size must be >= 1 or None, got {self.mlp_intermediate_size}")
        if self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend must be one of {SCAN_BACKENDS}, got {self.scan_backend!r}")
        bad = [i for i in self.attention_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"attention_layers: {bad[0]!r} is not a layer id in 0..{self.num_hidden_layers - 1}")
        if self.attention_layers and not self.attention:
            raise ValueError("attention_layers needs `attention` (the attention layers' LlamaConfig fields)")
        # config.auto_map ("modeling.SpikingMambaConfig", HF's "<file>.<Class>" form) is written at
        # save time by register_for_auto_class (end of this file), together with the code files.

    @property
    def layer_types(self) -> list[str]:
        """Per layer, the cache it needs: a KV cache for kept attention, the conv + SSM state otherwise."""
        return ["full_attention" if i in self.attention_layers else "linear_attention" for i in range(self.num_hidden_layers)]

    def attention_config(self) -> LlamaConfig:
        """The kept attention layers' config (transformers' own attention module runs them)."""
        config = LlamaConfig(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers, vocab_size=self.vocab_size,
            rms_norm_eps=self.layer_norm_epsilon, **self.attention,
        )
        config._attn_implementation = "sdpa"  # exact softmax attention, PyTorch's fused kernel
        return config


def apply_mask_to_padding_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions ([B, L, C] * [B, L]), as HF Mamba does, so left padding changes nothing."""
    if attention_mask is not None:
        dtype = hidden_states.dtype
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    return hidden_states


def _make_neurons(config: SpikingMambaConfig, channels: dict[str, int]) -> nn.ModuleDict:
    """The neurons of one module (mixer or MLP): `NEURON_MODULE_NAMES[placement]` -> neuron, for the
    placements of `config.neurons` among `channels` (placement -> input channels)."""
    modules = nn.ModuleDict()
    for placement, width in channels.items():
        if placement in config.neurons:
            try:
                modules[NEURON_MODULE_NAMES[placement]] = make_neuron(dict(config.neurons[placement]), width)
            except ValueError as error:
                raise ValueError(f"neurons.{placement}: {error}") from error
    return modules


class _NeuronOwner:
    """A module holding neurons in `self.neurons` (a ModuleDict keyed by `NEURON_MODULE_NAMES`) and
    the model's `self.config`: the mixer, the MLP and the backbone (the LM head's input)."""

    def neuron(self, placement: str) -> nn.Module | None:
        """The neuron on the input of `placement` held here, or None (no neuron there)."""
        key = NEURON_MODULE_NAMES[placement]
        return self.neurons[key] if key in self.neurons else None

    def spike(self, placement: str, x: torch.Tensor) -> torch.Tensor:
        """The neuron at `placement` applied to x [..., C], or x itself (no neuron / spiking off)."""
        neuron = self.neuron(placement)
        if self.config.spiking and neuron is not None:
            return neuron(x)
        return x


class SpikingMambaMixer(_NeuronOwner, nn.Module):
    """Mamba's selective-SSM mixer with optional neurons on the inputs of in_proj, x_proj, out_proj."""

    def __init__(self, config: SpikingMambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.intermediate_size = config.intermediate_size
        self.time_step_rank = int(config.time_step_rank)
        self.use_bias = config.use_bias
        self.conv1d = nn.Conv1d(
            in_channels=self.intermediate_size,
            out_channels=self.intermediate_size,
            bias=config.use_conv_bias,
            kernel_size=config.conv_kernel,
            groups=self.intermediate_size,
            padding=config.conv_kernel - 1,
        )
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported (Mamba's), got {config.hidden_act!r}")
        self.in_proj = nn.Linear(self.hidden_size, self.intermediate_size * 2, bias=config.use_bias)
        # with bc_proj, B and C come from the block input (MambaInLlama's layout) and x_proj yields Δ only
        self.bc_proj = nn.Linear(self.hidden_size, self.ssm_state_size * 2, bias=False) if config.bc_proj else None
        x_proj_out = self.time_step_rank + (0 if config.bc_proj else self.ssm_state_size * 2)
        self.x_proj = nn.Linear(self.intermediate_size, x_proj_out, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)
        self.neurons = _make_neurons(
            config,
            channels={
                "in_proj": self.hidden_size,
                "x_proj": self.intermediate_size,
                "dt_proj": self.time_step_rank,
                "out_proj": self.intermediate_size,
            },
        )

    @torch.no_grad()
    def init_mamba_weights(self):
        """S4D-real A, D = 1, and dt_proj so softplus(bias) is log-uniform in [time_step_min, time_step_max] (HF's)."""
        config = self.config
        A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32, device=self.A_log.device)[None, :]
        A = A.expand(self.intermediate_size, -1).contiguous()
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        dt_init_std = config.time_step_rank**-0.5 * config.time_step_scale
        if config.time_step_init_scheme == "constant":
            init.constant_(self.dt_proj.weight, dt_init_std)
        elif config.time_step_init_scheme == "random":
            init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(
            torch.rand(self.intermediate_size, device=self.dt_proj.bias.device, dtype=torch.float32)
            * (math.log(config.time_step_max) - math.log(config.time_step_min))
            + math.log(config.time_step_min)
        ).clamp(min=config.time_step_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        init.copy_(self.dt_proj.bias, inv_dt)

    def fused_out_neuron(self, device: torch.device) -> nn.Module | None:
        """The out_proj neuron when the Triton backend runs it fused with the gate, else None.

        Fused: SI-LIF and ATMN (tau = 1), SGC and learnable thresholds (LSQ) included. Not fused
        (the unfused path runs, same values): while spikes are counted (the kernel returns no
        counts), ATA updates in training (they need the gated activations), ATMN with a leak.
        """
        neuron = self.neuron("out_proj")
        if not self.config.spiking or neuron is None:
            return None
        if resolve_backend(self.config.scan_backend, device) != "triton":
            return None
        if neuron.is_counting or (neuron.training and neuron.ata_momentum > 0):
            return None
        if isinstance(neuron, ATMN) and neuron.tau != 1.0:
            return None
        return neuron

    def forward(self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask=None) -> torch.Tensor:
        """hidden_states [B, L, H] -> [B, L, H]. With `cache`, reads and updates this layer's conv/SSM state."""
        seq_len = hidden_states.shape[1]
        dtype = hidden_states.dtype
        conv_state = ssm_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)
            ssm_state = cache.get_recurrent_state(self.layer_idx)

        # 1. input projection (neuron on its input); padded positions are zeroed first
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        spikes_in = self.spike("in_proj", hidden_states)
        projected = self.in_proj(spikes_in).transpose(1, 2)  # [B, 2D, L]
        if self.bc_proj is not None:  # B, C [B, L, N] from the same (spiking) input as in_proj
            B, C = self.bc_proj(spikes_in).chunk(2, dim=-1)
        x, gate = projected.chunk(2, dim=1)  # [B, D, L] each
        A = -torch.exp(self.A_log.float())  # [D, N]

        # 2. causal depthwise conv + SiLU; the module is called (not its weight read) so that
        # DeepSpeed ZeRO-3 / accelerate hooks gather its parameters
        step = conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx)
        if step:
            window = torch.cat([conv_state, x], dim=-1)[..., -self.conv_kernel_size :]  # [B, D, K]
            conv_state.copy_(window)
            last = self.conv_kernel_size - 1  # the output that sees exactly the K window inputs
            x = F.silu(self.conv1d(window.to(self.conv1d.weight.dtype))[..., last : last + 1]).to(dtype)
        else:
            if cache is not None:  # prefill or continuation: the cache returns [previous inputs | x]
                x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
            full_len = x.shape[-1]
            x = F.silu(self.conv1d(x.to(self.conv1d.weight.dtype))[..., :full_len]).to(dtype)
            x = x[..., -seq_len:]

        # 3. input-dependent Δ, B, C; padded positions zeroed again so the state stays 0 through left padding
        x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # [B, L, D]
        if self.bc_proj is None:
            time_step, B, C = torch.split(
                self.x_proj(self.spike("x_proj", x)),
                [self.time_step_rank, self.ssm_state_size, self.ssm_state_size],
                dim=-1,
            )
        else:
            time_step = self.x_proj(self.spike("x_proj", x))
        # the module is called (HF reads dt_proj.weight): a LoRA adapter / ZeRO-3 hook on it then takes effect
        time_step = self.dt_proj(self.spike("dt_proj", time_step)).transpose(1, 2)  # [B, D, L], bias included

        # 4. selective scan, gated by SiLU(z) (the gate moves into the neuron kernel when that is fused)
        backend = self.config.scan_backend
        fused_neuron = self.fused_out_neuron(x.device)
        scan_gate = gate if fused_neuron is None else None
        if step and ssm_state is not None:
            y = selective_state_update(
                ssm_state, x[:, 0], time_step[..., 0], A, B[:, 0], C[:, 0], self.D,
                z=scan_gate[..., 0] if scan_gate is not None else None, dt_softplus=True, backend=backend,
            ).unsqueeze(-1)  # [B, D, 1]
        else:
            result = selective_scan(
                x.transpose(1, 2), time_step, A, B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=scan_gate,
                delta_softplus=True, return_last_state=cache is not None,
                # continuing from a cached state (several new tokens) must not restart the state at 0
                initial_state=ssm_state, backend=backend,
            )
            if cache is not None:
                y, last_state = result
                cache.update_recurrent_state(last_state.to(dtype), self.layer_idx)
            else:
                y = result

        # 5. output projection (neuron on its input)
        if fused_neuron is not None:
            # one kernel: y·SiLU(z) -> neuron -> [B, L, D]; V through threshold_for keeps LSQ's gradient scale
            spikes_out = gate_neuron(
                y, gate, fused_neuron.threshold_for(y), fused_neuron.kind, fused_neuron.levels(), fused_neuron.sgc_lambda,
                out_dtype=dtype, backend=backend,
            )
            return self.out_proj(spikes_out)
        y = y.transpose(1, 2).to(dtype)  # [B, L, D]
        return self.out_proj(self.spike("out_proj", y))


class SpikingMambaRMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (HF's MambaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class SpikingMambaMLP(_NeuronOwner, nn.Module):
    """Gated MLP down(SiLU(gate(x)) · up(x)); neurons on the input of gate/up ("mlp.up") and of down ("mlp.down")."""

    def __init__(self, config: SpikingMambaConfig):
        super().__init__()
        self.config = config
        width = config.mlp_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.down_proj._zero_init = True  # see SpikingMambaPreTrainedModel._init_weights
        self.neurons = _make_neurons(config, channels={"mlp.up": config.hidden_size, "mlp.down": width})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]."""
        x = self.spike("mlp.up", x)
        return self.down_proj(self.spike("mlp.down", F.silu(self.gate_proj(x)) * self.up_proj(x)))


@dataclass
class AttentionInputs:
    """What kept attention layers need beyond the hidden states: RoPE's (cos, sin) for the new
    tokens' positions and the additive mask [B | 1, 1, L, past + L] (causal, padded keys hidden)."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor


def attention_mask_4d(mask: torch.Tensor | None, batch: int, length: int, past: int, dtype, device) -> torch.Tensor:
    """Additive causal mask for `length` new tokens after `past` cached ones: 0 where a query may
    look, dtype-min elsewhere (not -inf: a fully padded query row then stays finite, as in HF).
    `mask` [B, past + length] (1 = real token) hides padded keys; None = no padding."""
    keys = past + length
    allowed = (torch.arange(keys, device=device)[None, :] <= torch.arange(past, keys, device=device)[:, None])[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, -keys:].bool()
    else:
        allowed = allowed.expand(batch, 1, length, keys)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class SpikingMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)) [+ mlp(mlp_norm(·))]; residual in fp32 if configured.

    The mixer is Mamba's, or, for a layer in `config.attention_layers`, transformers' `LlamaAttention`
    (a kept attention layer of a hybrid student: the teacher's own module and weights, no neurons)."""

    def __init__(self, config: SpikingMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = SpikingMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.is_attention = layer_idx in config.attention_layers
        if self.is_attention:
            self.mixer = LlamaAttention(config.attention_config(), layer_idx=layer_idx)
        else:
            self.mixer = SpikingMambaMixer(config, layer_idx=layer_idx)
        if config.mlp_intermediate_size is not None:
            self.mlp_norm = SpikingMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
            self.mlp = SpikingMambaMLP(config)
        else:
            self.mlp_norm = self.mlp = None

    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask=None,
        attention_inputs: AttentionInputs | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        if self.is_attention:
            mixed, _ = self.mixer(
                hidden_states, position_embeddings=attention_inputs.position_embeddings,
                attention_mask=attention_inputs.mask, cache=cache,
            )
        else:
            mixed = self.mixer(hidden_states, cache=cache, attention_mask=attention_mask)
        hidden_states = residual + mixed
        if self.mlp is not None:
            residual = hidden_states
            hidden_states = self.mlp(self.mlp_norm(hidden_states.to(dtype=self.mlp_norm.weight.dtype)))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
            hidden_states = residual + hidden_states
        return hidden_states


class SpikingMambaPreTrainedModel(PreTrainedModel):
    config_class = SpikingMambaConfig
    config: SpikingMambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["SpikingMambaBlock", "SpikingMambaMixer"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    def _init_weights(self, module):
        """HF Mamba's initialisation; a freshly added MLP starts as a no-op (down_proj = 0)."""
        super()._init_weights(module)
        if isinstance(module, SpikingMambaMixer):
            module.init_mamba_weights()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            if self.config.rescale_prenorm_residual:
                module.out_proj.weight /= math.sqrt(self.config.num_hidden_layers)
        elif getattr(module, "_zero_init", False):
            # the MLP's down_proj: adding an MLP to a converted teacher leaves its function unchanged
            init.zeros_(module.weight)


@dataclass
class SpikingMambaOutput(ModelOutput):
    """Backbone output. last_hidden_state [B, L, H] (after norm_f, and the head neuron if any);
    hidden_states: each block's
    output then the normed last one (HF Mamba's convention); cache: the recurrent state."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class SpikingMambaCausalLMOutput(ModelOutput):
    """loss (with labels), logits [B, L', V] (fp32), cache, hidden_states (see SpikingMambaOutput)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _pick_cache(cache, past_key_values, cache_params):
    given = [c for c in (cache, past_key_values, cache_params) if c is not None]
    if len(given) > 1:
        raise ValueError("pass the recurrent state once: cache (or its aliases past_key_values / cache_params)")
    return given[0] if given else None


class SpikingMambaModel(_NeuronOwner, SpikingMambaPreTrainedModel):
    """Embeddings, blocks, final RMSNorm. What TRL's fused LM head calls (`model.backbone`)."""

    def __init__(self, config: SpikingMambaConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SpikingMambaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.norm_f = SpikingMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.neurons = _make_neurons(config, channels={"head": config.hidden_size})
        # RoPE for kept attention layers (one table for all, as in LlamaModel)
        self.rotary_emb = LlamaRotaryEmbedding(config.attention_config()) if config.attention_layers else None
        self.post_init()

    def _attention_inputs(self, hidden: torch.Tensor, cache: Cache | None, mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None) -> AttentionInputs:
        """RoPE and the mask for the kept attention layers. Positions as in HF Llama: given
        (generate derives them from the mask, so left padding starts each row at 0), else counted
        on from the cached length."""
        batch, length = hidden.shape[:2]
        past = cache.get_seq_length(self.config.attention_layers[0]) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device)[None].expand(batch, -1)
        position_ids = position_ids[:, -length:]
        if mask is not None and mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} tokens, but the kept attention layers see "
                f"{past} cached + {length} new: pass the mask over past and new tokens"
            )
        return AttentionInputs(
            position_embeddings=self.rotary_emb(hidden, position_ids),
            mask=attention_mask_4d(mask, batch, length, past, hidden.dtype, hidden.device),
        )

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        cache_params: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> SpikingMambaOutput | tuple:
        cache = _pick_cache(cache, past_key_values, cache_params)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if self.gradient_checkpointing and self.training and use_cache and torch.is_grad_enabled():
            # recomputing a block would update the cache twice; without grad nothing is recomputed, so a
            # rollout generated in training mode (TRL's GRPO) keeps its cache and the one-token step
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        seq_len = inputs_embeds.shape[1]
        attention_inputs = None
        if self.rotary_emb is not None:  # kept attention layers read the mask over past + new tokens
            attention_inputs = self._attention_inputs(inputs_embeds, cache, attention_mask, position_ids)
        if attention_mask is not None:
            # a mask over past + new tokens (as generate keeps it) is cut to the new ones
            attention_mask = attention_mask[:, -seq_len:]

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        fused = None
        # the fused C++ step knows the plain Mamba block only (no bc_proj, no kept attention)
        plain = not self.config.bc_proj and not self.config.attention_layers
        if plain and cache is not None and seq_len == 1 and not output_hidden_states:
            # generation's one-token step: all blocks in one C++ call on CPU when it applies (fused_step.py)
            fused = decode_step(self, hidden_states, cache, attention_mask)
        if fused is not None:
            hidden_states = fused  # norm_f's output through the head neuron, as below
        else:
            for block in self.layers:
                hidden_states = block(
                    hidden_states, cache=cache, attention_mask=attention_mask, attention_inputs=attention_inputs
                )
                if output_hidden_states:
                    all_hidden_states = all_hidden_states + (hidden_states,)
            hidden_states = self.norm_f(hidden_states)
            hidden_states = self.spike("head", hidden_states)  # [B, L, H]: what the LM head reads, spikes included
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)

        # a cache passed in is read and updated either way (as in HF Mamba); it is returned if use_cache
        cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return SpikingMambaOutput(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class SpikingMambaForCausalLM(SpikingMambaPreTrainedModel, GenerationMixin):
    """Causal LM: `backbone` (SpikingMambaModel) + `lm_head` tied to the embeddings by default."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: SpikingMambaConfig):
        super().__init__(config)
        self.backbone = SpikingMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        return self.backbone.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        use_cache=None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration and not self.config.attention_layers:
            # new tokens are never padding, and the one-token step has nothing to mask (HF Mamba does the
            # same); kept attention layers still need the mask over the cached keys
            model_inputs["attention_mask"] = None
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> SpikingMambaCausalLMOutput | tuple:
        """input_ids [B, L] -> logits [B, L', V] (L' = L, or the kept positions with `logits_to_keep`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache_params = kwargs.pop("cache_params", None)
        # accepted and ignored: a recurrence needs no positions. Not a named argument: generate()
        # builds cache_position for a registered-for-auto-class model whose forward names it, from
        # cache.get_seq_length(), which a recurrent-only cache refuses
        kwargs.pop("cache_position", None)
        outputs = self.backbone(
            input_ids,
            cache=_pick_cache(cache, past_key_values, cache_params),
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            use_cache=use_cache,
            attention_mask=attention_mask,
            position_ids=position_ids,  # read by kept attention layers only: a recurrence needs no positions
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        # after the fused one-token step, the head's spikes are projected spike-driven (fused_step.py)
        logits = head_logits(self.lm_head, hidden_states, _pick_cache(cache, past_key_values, cache_params))
        if logits is None:
            logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return SpikingMambaCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


# A saved folder carries its code: save_pretrained copies this file and the files it reaches by
# same-folder relative imports, and writes config.auto_map in HF's form ("modeling.<Class>"), so
# AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) needs no spikerl. With
# spikerl imported, its registered classes take precedence (transformers prefers explicit local code).
SpikingMambaConfig.register_for_auto_class("AutoConfig")
SpikingMambaModel.register_for_auto_class("AutoModel")
SpikingMambaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PLACEMENTS",
    "SpikingMambaConfig",
    "SpikingMambaForCausalLM",
    "SpikingMambaModel",
    "SpikingMambaPreTrainedModel",
    "default_neurons",
    "lora_target_modules",
]
