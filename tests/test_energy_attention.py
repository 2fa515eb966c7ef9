"""Tests of spiking/energy.py on models with attention: a tiny HF Llama teacher, a hybrid student
whose kept layer is a LlamaAttention mixer, and a Mamba mixer with a bc_proj (B, C from the block
input), each against counts written out by hand; the attention context (keys per token) and its
default (the causal mean over the measured real tokens).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_energy_attention.py -q
"""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

import spiking
from spiking.energy import (
    HOROWITZ_45NM,
    OpCount,
    energy_report,
    energy_shares,
    estimate_energy,
    has_attention,
    measure,
    memory_model,
    project,
    spike_costs,
)
from spiking.modeling import SpikingMambaConfig, SpikingMambaForCausalLM

# Llama: hidden d, h query heads, kv key/value heads, head_dim dh = d / h, MLP width F, vocabulary V
d, h, kv, F, V = 16, 2, 1, 24, 11
dh = d // h
# Mamba (tests/test_energy.py's TINY): E = 2d, N, R = ceil(d / 16)
MAMBA = dict(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)
E, N, R = 32, 4, math.ceil(16 / 16)


def tiny_llama(layers: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=F, num_hidden_layers=layers, num_attention_heads=h,
                         num_key_value_heads=kv, tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def llama_layer_by_hand(c: float) -> OpCount:
    """One Llama decoder layer (no biases), one token attending c keys, op by op (compute only)."""
    mac = (
        d  # input_layernorm sum of squares
        + d * h * dh + 2 * d * kv * dh  # q_proj, k_proj, v_proj
        + h * dh * c  # QKᵀ (the 1/√dh scale folded into q_proj)
        + h * dh * c  # AV
        + h * dh * d  # o_proj
        + d  # post_attention_layernorm
        + 3 * d * F  # gate, up, down
    )
    ac = (h + kv) * dh + h * c + d + d  # RoPE add, softmax sum, the two residuals
    mul = 2 * d + 2 * (h + kv) * dh + 2 * h * c + 2 * d + 3 * F  # norm, RoPE, exp + normalise, norm, SiLU·up
    return OpCount(float(mac), float(ac), float(mul))


def test_llama_attention_ops_at_a_context_equal_the_hand_count_and_grow_linearly():
    model = tiny_llama()
    assert has_attention(model)
    for c in (1, 7, 100):
        report = energy_report(model, None, 1, context=c)
        ops = report.layers[0].ops
        assert ops["attn_scores"] == OpCount(mac=2 * 8 * c)  # h·dh·c
        assert ops["attn_values"] == OpCount(mac=2 * 8 * c)
        assert ops["attn_softmax"] == OpCount(mul=2 * 2 * c, ac=2 * c)  # exp + normalise h·c Mul each, sum h·c AC
        assert ops["rope"] == OpCount(mul=2 * 3 * 8, ac=3 * 8)  # (h+kv)·dh elements of q and k
        assert ops["q_proj"] == OpCount(mac=16 * 16) and ops["k_proj"] == ops["v_proj"] == OpCount(mac=16 * 8)
        assert report.layers[0].total == llama_layer_by_hand(c)
        assert report.layers[1].total == OpCount(mac=d + d * V, mul=2 * d)  # norm + tied LM head
        assert report.context == c and report.to_dict()["context"] == c
    # per key attended, one layer: 2·h·dh MAC + 2·h Mul + h AC = 32 MAC + 4 Mul + 2 AC = 163.8 pJ
    slope = 32 * 4.6 + 4 * 3.7 + 2 * 0.9
    e1, e100 = (energy_report(model, None, 1, context=c).pj_per_token for c in (1, 100))
    assert (e100 - e1) / 99 == pytest.approx(slope, rel=1e-12)
    two = tiny_llama(layers=2)  # the slope is per attention layer
    e1, e100 = (energy_report(two, None, 1, context=c).pj_per_token for c in (1, 100))
    assert (e100 - e1) / 99 == pytest.approx(2 * slope, rel=1e-12)


def test_llama_kv_cache_traffic_grows_with_the_context():
    model = tiny_llama()
    cost = memory_model(1)
    s1, s101 = (energy_report(model, None, 1, cost, context=c).total for c in (1, 101))
    # per key: K and V read (2·kv·dh values: on chip, like the SSM state), a score written, read and
    # written by the softmax and read by AV (4·h values), 4 bytes each; no DRAM (no weights depend on c)
    assert (s101.sram_bytes - s1.sram_bytes) / 100 == pytest.approx((2 * kv * dh + 4 * h) * 4)
    assert s101.dram_bytes == s1.dram_bytes
    scores = energy_report(model, None, 1, cost, context=5).layers[0].ops["attn_scores"]
    # q read (h·dh), 5 scores written (h·5), 5 cached keys read + the new one written ((5+1)·kv·dh)
    assert scores.sram_bytes == (h * dh + h * 5 + 6 * kv * dh) * 4 and scores.dram_bytes == 0


def test_attention_without_a_context_is_refused_by_energy_report():
    with pytest.raises(ValueError, match="context"):
        energy_report(tiny_llama(), None, 1)
    with pytest.raises(ValueError, match="context must be > 0"):
        energy_report(tiny_llama(), None, 1, context=0)


def test_a_mamba_model_costs_the_same_at_every_context():
    torch.manual_seed(0)
    model = SpikingMambaForCausalLM(SpikingMambaConfig(**MAMBA, neurons=spiking.default_neurons(D=4))).eval()
    assert not has_attention(model)
    ids = torch.randint(0, 50, (2, 6))
    for cost in (HOROWITZ_45NM, memory_model(1)):
        report, stats = measure(model, ids, cost)
        at10 = energy_report(model, stats, report.tokens, cost, context=10).to_dict()
        at1000 = energy_report(model, stats, report.tokens, cost, context=1000).to_dict()
        assert at10 == at1000 == report.to_dict()
        assert report.context is None and at10["context"] is None
    assert measure(model, ids, context=7)[0].to_dict() == measure(model, ids)[0].to_dict()
    plain = SpikingMambaConfig(**MAMBA, neurons={})  # project still builds Mamba configs on meta
    assert project(plain, {}, context=50).to_dict() == project(plain, {}).to_dict()


def test_measure_takes_the_causal_mean_context_over_real_tokens():
    model = tiny_llama()
    L = 9
    ids = torch.randint(0, V, (1, L))
    report, stats = measure(model, ids)
    assert stats is None and report.context == (L + 1) / 2  # keys 1..L
    assert report.to_dict() == energy_report(model, None, L, context=(L + 1) / 2).to_dict()
    # left padding: row 0 has 3 real tokens (keys 1, 2, 3), row 1 has 5 (keys 1..5): 21 keys / 8 tokens
    ids = torch.randint(0, V, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    report, _ = measure(model, [{"input_ids": ids, "attention_mask": mask}])
    assert report.context == 21 / 8 and report.tokens == 8
    assert estimate_energy(model, ids, mask).context == 21 / 8
    # several batches: one mean over all their real tokens (1..4 and 1..2: 13 keys / 6 tokens)
    report, _ = measure(model, [torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)])
    assert report.context == 13 / 6
    assert measure(model, ids, context=300)[0].context == 300


def test_hybrid_student_counts_its_kept_attention_layer_dense_and_its_mamba_layer_from_spikes():
    torch.manual_seed(0)
    model = SpikingMambaForCausalLM(SpikingMambaConfig(**MAMBA, neurons=spiking.default_neurons(D=4))).eval()
    ids = torch.randint(0, 50, (2, 6))
    mamba_only, stats = measure(model, ids)
    # layer 1's mixer becomes a kept LlamaAttention (the spike counts of layer 0 are unchanged)
    attn_config = LlamaConfig(hidden_size=16, num_attention_heads=h, num_key_value_heads=kv, attn_implementation="eager")
    model.backbone.layers[1].mixer = LlamaAttention(attn_config, layer_idx=1)
    assert has_attention(model)
    with pytest.raises(ValueError, match="context"):
        energy_report(model, stats, mamba_only.tokens)
    c = 40
    hybrid = energy_report(model, stats, mamba_only.tokens, context=c)
    assert hybrid.layers[0].ops == mamba_only.layers[0].ops  # spiking Mamba layer as before
    kept = hybrid.layers[1]
    assert kept.spikes_per_token == {} and kept.firing_rate is None  # never spiking
    assert not any(op.endswith(".neuron") for op in kept.ops)
    mac = 16 + 16 * 16 + 2 * 16 * 8 + 2 * 2 * 8 * c + 16 * 16  # norm, q/k/v, QKᵀ + AV, o_proj
    ac = 3 * 8 + 2 * c + 16  # RoPE, softmax sum, residual
    mul = 2 * 16 + 2 * 3 * 8 + 2 * 2 * c
    assert kept.total == OpCount(float(mac), float(ac), float(mul))
    assert hybrid.context == c


def test_bc_proj_is_counted_dense_and_from_in_projs_spikes():
    torch.manual_seed(0)
    dense = SpikingMambaForCausalLM(SpikingMambaConfig(**MAMBA, neurons={})).eval()
    before = estimate_energy(dense, torch.zeros(1, 1, dtype=torch.long)).total
    for layer in dense.backbone.layers:  # the stand-in: B, C from the block input, x_proj to R only
        layer.mixer.bc_proj = nn.Linear(16, 2 * N, bias=False)
        layer.mixer.x_proj = nn.Linear(E, R, bias=False)
    report = estimate_energy(dense, torch.zeros(1, 1, dtype=torch.long))
    for layer in report.layers[:-1]:
        assert layer.ops["bc_proj"] == OpCount(mac=16 * 2 * N)  # d·2N
        assert layer.ops["x_proj"] == OpCount(mac=E * R)
    # per layer: + d·2N (bc_proj) − E·2N (x_proj's B and C columns) = 128 − 256 MACs
    assert report.total.mac - before.mac == 2 * (16 * 2 * N - E * 2 * N)

    spiking_model = SpikingMambaForCausalLM(SpikingMambaConfig(**MAMBA, neurons=spiking.default_neurons(D=4))).eval()
    ids = torch.randint(0, 50, (2, 6))
    measured, stats = measure(spiking_model, ids)  # the forward before the stand-in (its x_proj split is Mamba's)
    for layer in spiking_model.backbone.layers:
        layer.mixer.bc_proj = nn.Linear(16, 2 * N, bias=False)
    cost = memory_model(1)
    report = energy_report(spiking_model, stats, measured.tokens, cost)
    for layer in report.layers[:-1]:
        spikes = layer.spikes_per_token["in_proj"]  # Σ|s| per token on in_proj's input
        assert spikes > 0
        assert layer.ops["bc_proj"].ac == pytest.approx(spikes * 2 * N) and layer.ops["bc_proj"].mac == 0
        assert layer.ops["in_proj"].ac == pytest.approx(spikes * 2 * E)
    costs = spike_costs(spiking_model)
    in_proj_neuron = next(name for name in costs if name.endswith("in_proj_input"))
    assert costs[in_proj_neuron] == pytest.approx((2 * E + 2 * N) * HOROWITZ_45NM.ac_pj)
    # bc_proj's energy is in in_proj's share (the ops its neuron feeds)
    shares = energy_shares(report)
    in_proj_pj = sum(layer.ops[op].energy_pj(cost) for layer in report.layers[:-1]
                     for op in ("in_proj", "bc_proj", "in_proj.neuron"))
    assert shares["in_proj"] == pytest.approx(in_proj_pj / report.pj_per_token)
