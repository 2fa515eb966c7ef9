"""Tests of spiking/energy.py: op counts per layer, the cost table, teacher / student ratio.

The dense model is counted against the op table written out by hand; the spiking student's
AC counts against spikes recomputed from each neuron's captured input.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_energy.py -q
"""

import dataclasses
import json
import math

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from spiking.energy import (
    COST_TABLES,
    HOROWITZ_45NM,
    OpCount,
    dense_linear_ops,
    energy_ratio,
    estimate_energy,
    rms_norm_ops,
    spiking_linear_ops,
)
from spiking.modeling import SpikingMambaConfig, SpikingMambaForCausalLM
from spiking.neurons import iter_neurons

TINY = dict(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)
d, E, N, K, VOCAB = 16, 32, 4, 4, 50
R = math.ceil(d / 16)  # HF's time_step_rank "auto"


def test_dense_linear_layer_is_n_in_times_n_out_macs():
    assert dense_linear_ops(16, 64) == OpCount(mac=1024.0, ac=0.0, mul=0.0)
    assert dense_linear_ops(16, 64, bias=True) == OpCount(mac=1024.0, ac=64.0, mul=0.0)


def test_spiking_linear_layer_costs_abs_spikes_times_n_out_acs():
    s = torch.tensor([2, 0, -1, 3, 0, -4])  # signed spike counts of one token
    assert spiking_linear_ops(s.abs().sum().item(), 5) == OpCount(mac=0.0, ac=50.0, mul=0.0)
    # an ATMN train [T=2, C=3]: every nonzero step of every input costs n_out ACs
    train = torch.tensor([[1, 0, -1], [1, 0, 0]])
    assert spiking_linear_ops(train.abs().sum().item(), 7).ac == 21.0
    assert spiking_linear_ops(0, 1000) == OpCount()  # zero spikes cost nothing


def test_cost_table_is_named_frozen_and_has_the_horowitz_values():
    assert COST_TABLES["45nm-horowitz"] is HOROWITZ_45NM
    assert (HOROWITZ_45NM.mac_pj, HOROWITZ_45NM.ac_pj, HOROWITZ_45NM.mul_pj) == (4.6, 0.9, 3.7)
    assert HOROWITZ_45NM.describe() == "45nm-horowitz: MAC 4.6 pJ, AC 0.9 pJ, Mul 3.7 pJ"
    with pytest.raises(dataclasses.FrozenInstanceError):
        HOROWITZ_45NM.mac_pj = 1.0
    assert OpCount(mac=2, ac=10, mul=1).energy_pj(HOROWITZ_45NM) == pytest.approx(2 * 4.6 + 10 * 0.9 + 3.7)


def dense_block_by_hand() -> OpCount:
    """One HF Mamba block (use_bias False, conv bias True), one token, written out op by op."""
    mac = (
        d  # RMSNorm sum of squares
        + d * 2 * E  # in_proj
        + E * K  # depthwise conv
        + E * (R + 2 * N)  # x_proj
        + R * E  # dt_proj
        + E * N  # h = Ā·h + B̄x
        + E * N  # y = C·h
        + E  # D skip
        + E * d  # out_proj
    )
    ac = E + E + d  # conv bias, dt_proj bias, residual add
    mul = 2 * d + 2 * E + E + 2 * E * N + (E + E * N) + 3 * E  # norm, SiLU, softplus, Ā, B̄x, gate
    return OpCount(float(mac), float(ac), float(mul))


def head_by_hand() -> OpCount:
    return OpCount(mac=float(d + d * VOCAB), mul=float(2 * d))


def test_hf_mamba_counted_analytically():
    torch.manual_seed(0)
    teacher = MambaForCausalLM(MambaConfig(**TINY))
    ids = torch.randint(0, VOCAB, (2, 6))
    report = estimate_energy(teacher, ids)
    assert not report.spiking and report.firing_rate is None and report.tokens == 12
    assert len(report.layers) == 3  # 2 blocks + head
    for layer in report.layers[:2]:
        assert layer.total == dense_block_by_hand()
    assert report.layers[2].total == head_by_hand()
    expected = dense_block_by_hand() + dense_block_by_hand() + head_by_hand()
    assert report.total == expected
    assert report.pj_per_token == pytest.approx(expected.energy_pj(HOROWITZ_45NM))


def test_report_names_its_cost_table_and_says_memory_access_is_not_counted():
    teacher = MambaForCausalLM(MambaConfig(**TINY))
    report = estimate_energy(teacher, torch.randint(0, VOCAB, (1, 4)))
    data = report.to_dict()
    json.dumps(data)  # serialisable as is
    assert data["cost_table"]["name"] == "45nm-horowitz"
    assert any("memory access is not counted" in note for note in data["notes"])
    assert "45nm-horowitz" in report.summary() and "memory access is not counted" in report.summary()
    for op in ("in_proj", "conv1d", "x_proj", "dt_proj", "dt_softplus", "discretize_A", "scan_state",
               "scan_output", "gate", "D_skip", "norm", "out_proj", "norm_f", "lm_head"):
        assert op in report.ops_counted, op


def spiking_student(neurons, mlp=None, threshold=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = SpikingMambaConfig(**TINY, neurons=neurons, mlp_intermediate_size=mlp)
    model = SpikingMambaForCausalLM(cfg)
    for _, neuron in iter_neurons(model):
        with torch.no_grad():
            neuron.set_threshold_(torch.full((neuron.channels,), float(threshold)))
    return model.eval()


def capture_neuron_inputs(model):
    """Forward pre-hooks (test-side observation) that keep each neuron's input."""
    inputs, handles = {}, []
    for name, neuron in iter_neurons(model):
        handles.append(neuron.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0])))
    return inputs, handles


def calibrate_on(model, ids, rounds=2):
    """Thresholds from each neuron's own input (a second round sees the calibrated upstream)."""
    for _ in range(rounds):
        inputs, handles = capture_neuron_inputs(model)
        with torch.no_grad():
            model(input_ids=ids)
        for h in handles:
            h.remove()
        for name, neuron in iter_neurons(model):
            neuron.calibrate_(inputs[name].reshape(-1, neuron.channels))


@pytest.mark.parametrize("mask", [False, True])
def test_spiking_student_acs_equal_hand_computed_from_its_spikes(mask):
    neurons = {
        "in_proj": {"kind": "si_lif", "D": 4},
        "out_proj": {"kind": "atmn", "T": 3},
        "x_proj": {"kind": "si_lif", "D": 2},
        "mlp.up": {"kind": "si_lif", "D": 4},
        "mlp.down": {"kind": "atmn", "T": 2, "tau": 2.0},
    }
    F = 24
    model = spiking_student(neurons, mlp=F)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    calibrate_on(model, ids)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]) if mask else None
    report = estimate_energy(model, ids, attention_mask)
    tokens = 10 if mask else 12
    assert report.spiking and report.tokens == tokens

    # the same forward again, this time keeping each neuron's input, spikes recomputed by hand
    inputs, handles = capture_neuron_inputs(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    keep = attention_mask.bool() if mask else torch.ones(2, 6, dtype=torch.bool)
    n_out = {"in_proj": [2 * E], "out_proj": [d], "x_proj": [R + 2 * N], "mlp.up": [F, F], "mlp.down": [d]}
    linear = {"in_proj": ["in_proj"], "out_proj": ["out_proj"], "x_proj": ["x_proj"],
              "mlp.up": ["mlp.gate_proj", "mlp.up_proj"], "mlp.down": ["mlp.down_proj"]}
    modules = dict(model.named_modules())
    for i in range(2):
        layer = report.layers[i]
        for placement, prefix in (("in_proj", "mixer.neurons.in_proj_input"), ("out_proj", "mixer.neurons.out_proj_input"),
                                  ("x_proj", "mixer.neurons.x_proj_input"), ("mlp.up", "mlp.neurons.up_input"),
                                  ("mlp.down", "mlp.neurons.down_input")):
            name = f"backbone.layers.{i}.{prefix}"
            s = modules[name].spike_counts(inputs[name])  # SI-LIF [B, L, C]; ATMN [T, B, L, C]
            per_token = s.abs().sum(0) if s.dim() == 4 else s.abs()
            abs_sum = int(per_token[keep].sum())
            assert abs_sum > 0, f"{name} did not fire: the test would not check anything"
            assert layer.spikes_per_token[placement] == pytest.approx(abs_sum / tokens)
            for op, width in zip(linear[placement], n_out[placement]):
                assert layer.ops[op].mac == 0
                assert layer.ops[op].ac == pytest.approx(abs_sum / tokens * width), (name, op)
        # the layers left dense keep their MACs
        assert layer.ops["dt_proj"].mac == R * E and layer.ops["conv1d"].mac == E * K


def test_teacher_over_student_ratio_is_above_one_when_firing_is_low():
    teacher = MambaForCausalLM(MambaConfig(**TINY))
    neurons = {"in_proj": {"kind": "si_lif", "D": 4}, "out_proj": {"kind": "si_lif", "D": 4}}
    student = spiking_student(neurons, threshold=1.0)
    student.load_state_dict(teacher.state_dict(), strict=False)
    ids = torch.randint(0, VOCAB, (2, 8))
    report = estimate_energy(student, ids)
    assert 0 < report.firing_rate < 0.5
    ratio = energy_ratio(teacher, student, ids)
    assert ratio == pytest.approx(estimate_energy(teacher, ids).pj_per_token / report.pj_per_token)
    assert ratio > 1.0

    # spiking switched off at run time: every layer is dense again, same energy as the teacher
    student.config.spiking = False
    assert energy_ratio(teacher, student, ids) == pytest.approx(1.0)


def test_student_without_neurons_counts_like_the_teacher():
    teacher = MambaForCausalLM(MambaConfig(**TINY))
    plain = spiking_student({})
    ids = torch.randint(0, VOCAB, (1, 5))
    assert estimate_energy(plain, ids).total == estimate_energy(teacher, ids).total


def test_model_without_mamba_backbone_is_rejected():
    with pytest.raises(ValueError, match="backbone"):
        estimate_energy(torch.nn.Linear(3, 3), torch.zeros(1, 2, dtype=torch.long))


def test_norm_ops_convention():
    assert rms_norm_ops(16) == OpCount(mac=16.0, mul=32.0)
