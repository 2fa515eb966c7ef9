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
from spiking.neurons import iter_neurons, neuron_placement

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


# ------------------------------------------------------------------- the other cost models (§10)


def dense_block_bytes_by_hand(batch: int) -> tuple[float, float]:
    """(SRAM bytes, DRAM bytes) of one dense block per token under 45nm-memory: 4-byte weights and
    activations; each MAC reads its weight on chip, each op reads its inputs and writes its output
    on chip; weights come from DRAM once per `batch` tokens."""
    w = 4
    ops = {  # op: (weights, activations read + written + state values moved)
        "norm": (d, d + d),
        "in_proj": (d * 2 * E, d + 2 * E),
        "conv1d": (E * K + E, E + E * K),  # + bias; the K-wide window is the conv state
        "conv_silu": (0, E + E),
        "x_proj": (E * (R + 2 * N), E + R + 2 * N),
        "dt_proj": (R * E + E, R + E),  # + bias
        "dt_softplus": (0, E + E),
        "discretize_A": (E * N, E),  # A, Δ
        "discretize_B_x": (0, N + E),  # B, x
        "scan_state": (0, 2 * E * N),  # h read and written
        "scan_output": (0, N + E),  # C read, y written
        "D_skip": (E, E + E),
        "gate": (0, 2 * E + E),
        "out_proj": (E * d, E + d),
        "residual": (0, 2 * d + d),
    }
    sram = sum((weights + values) * w for weights, values in ops.values())
    dram = sum(weights * w for weights, _ in ops.values()) / batch
    return float(sram), float(dram)


def head_bytes_by_hand(batch: int) -> tuple[float, float]:
    sram = (d + 2 * d) * 4 + (d * VOCAB + d + VOCAB) * 4  # norm_f; the LM head
    dram = (d + d * VOCAB) * 4 / batch + d * 4  # + one embedding row per token, never shared
    return float(sram), float(dram)


@pytest.mark.parametrize("batch", [1, 4])
def test_dense_model_under_each_cost_model_by_hand(batch):
    from spiking.energy import HOROWITZ_45NM_INT8, memory_model

    teacher = MambaForCausalLM(MambaConfig(**TINY))
    ids = torch.randint(0, VOCAB, (1, 5))
    compute = dense_block_by_hand() + dense_block_by_hand() + head_by_hand()
    # INT8 (Horowitz's 8-bit add 0.03 pJ, mult 0.2 pJ): the same counts at other prices, compute only
    int8 = estimate_energy(teacher, ids, cost=HOROWITZ_45NM_INT8)
    assert int8.total == compute
    assert int8.pj_per_token == pytest.approx(compute.mac * 0.23 + compute.ac * 0.03 + compute.mul * 0.2)
    # memory-inclusive: the compute of 45nm-horowitz plus SRAM 2.5 pJ/B and DRAM 162.5 pJ/B
    cost = memory_model(batch)
    report = estimate_energy(teacher, ids, cost=cost)
    sram_block, dram_block = dense_block_bytes_by_hand(batch)
    sram_head, dram_head = head_bytes_by_hand(batch)
    for layer in report.layers[:2]:
        assert (layer.total.sram_bytes, layer.total.dram_bytes) == pytest.approx((sram_block, dram_block))
    assert (report.layers[2].total.sram_bytes, report.layers[2].total.dram_bytes) == pytest.approx((sram_head, dram_head))
    by_hand = compute.energy_pj(HOROWITZ_45NM) + 2.5 * (2 * sram_block + sram_head) + 162.5 * (2 * dram_block + dram_head)
    print(f"batch {batch}: {report.pj_per_token:.1f} pJ/token, by hand {by_hand:.1f}")
    assert report.pj_per_token == pytest.approx(by_hand)
    assert "SRAM 2.5 pJ/B, DRAM 162.5 pJ/B (Horowitz 2014)" in report.summary()
    assert not any("memory access is not counted" in note for note in report.notes)


def test_spiking_layer_memory_by_hand():
    from spiking.energy import MemoryCosts

    # 4 inputs, 3 outputs; per token: Σ|s| = 5, 3 nonzero events, each input active in half the tokens
    one = spiking_linear_ops(5, 3, memory=MemoryCosts(batch=1), n_in=4, events=3, active=0.5)
    assert one.ac == 15
    assert one.sram_bytes == 15 * 4 + 3 * 2 + 3 * 4  # a weight per AC, the events, the outputs
    assert one.dram_bytes == 4 * 0.5 * 3 * 4  # the rows of the inputs that spiked
    # batch 4: a row is fetched if any of the 4 tokens needs it (1 - 0.5^4), shared by the 4
    four = spiking_linear_ops(5, 3, memory=MemoryCosts(batch=4), n_in=4, events=3, active=0.5)
    assert four.dram_bytes == pytest.approx(4 * (1 - 0.5**4) * 3 * 4 / 4)
    assert four.sram_bytes == one.sram_bytes


def test_new_placements_dt_proj_and_head_by_hand():
    from spiking.energy import memory_model

    neurons = {"dt_proj": {"kind": "si_lif", "D": 2}, "head": {"kind": "atmn", "T": 2}}
    model = spiking_student(neurons)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    calibrate_on(model, ids)
    cost = memory_model(1)
    report = estimate_energy(model, ids, cost=cost)
    inputs, handles = capture_neuron_inputs(model)
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    tokens = 12
    for i in range(2):
        name = f"backbone.layers.{i}.mixer.neurons.dt_proj_input"
        s = modules[name].spike_counts(inputs[name]).abs()  # [B, L, R]
        abs_sum, events, active = int(s.sum()), int((s > 0).sum()), float((s > 0).float().mean())
        assert abs_sum > 0
        op = report.layers[i].ops["dt_proj"]
        assert op.mac == 0 and op.ac == pytest.approx(abs_sum / tokens * E + E)  # + bias
        assert op.dram_bytes == pytest.approx(R * active * E * 4 + E * 4)  # active rows + the bias
        assert report.layers[i].ops["dt_proj.neuron"].ac == R * 2  # D = 2 micro-steps per element
    name = "backbone.neurons.head_input"
    train = modules[name].spike_counts(inputs[name]).abs()  # ATMN [T, B, L, d]
    abs_sum, events = int(train.sum()), int((train > 0).sum())
    active = float((train.sum(0) > 0).float().mean())
    head = report.layers[-1]
    assert head.ops["lm_head"].mac == 0 and head.ops["lm_head"].ac == pytest.approx(abs_sum / tokens * VOCAB)
    assert head.ops["lm_head"].sram_bytes == pytest.approx((abs_sum * VOCAB * 4 + events * 2) / tokens + VOCAB * 4)
    assert head.ops["lm_head"].dram_bytes == pytest.approx(d * active * VOCAB * 4)
    assert head.ops["head.neuron"].ac == d * 2 and head.spikes_per_token["head"] == pytest.approx(abs_sum / tokens)


def test_projection_at_the_measured_shape_equals_the_measurement():
    from spiking.energy import memory_model, placement_rates, project

    neurons = {"in_proj": {"kind": "si_lif", "D": 4}, "out_proj": {"kind": "atmn", "T": 3}, "head": {"kind": "si_lif", "D": 2}}
    model = spiking_student(neurons)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    calibrate_on(model, ids)
    from spiking.energy import measure

    for cost in (HOROWITZ_45NM, memory_model(1)):
        measured, stats = measure(model, ids, cost)
        projected = project(model.config, placement_rates(stats, model), cost)
        assert projected.pj_per_token == pytest.approx(measured.pj_per_token, rel=1e-9)
        assert projected.firing_rate == pytest.approx(measured.firing_rate)
        assert any("projected" in note for note in projected.notes)
    # at another shape the same rates give other counts: 4 layers cost more than 2
    base = project(model.config, placement_rates(stats, model))
    bigger = project(SpikingMambaConfig(**{**TINY, "num_hidden_layers": 4}, neurons=neurons), placement_rates(stats, model))
    assert bigger.pj_per_token > base.pj_per_token * 1.5


def test_break_even_firing_rate_is_where_the_student_costs_what_the_teacher_does():
    from spiking.energy import break_even, energy_report, memory_model, measure

    torch.manual_seed(0)
    teacher = MambaForCausalLM(MambaConfig(**TINY))
    neurons = {"in_proj": {"kind": "si_lif", "D": 4}, "out_proj": {"kind": "si_lif", "D": 4}, "head": {"kind": "si_lif", "D": 4}}
    model = spiking_student(neurons)
    model.load_state_dict(teacher.state_dict(), strict=False)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    calibrate_on(model, ids)
    searched = []
    for cost in (HOROWITZ_45NM, memory_model(1), memory_model(8)):
        teacher_pj = estimate_energy(teacher, ids, cost=cost).pj_per_token
        _, stats = measure(model, ids, cost)
        rate = break_even(teacher_pj, model, stats, cost)
        print(cost.name, "break-even firing rate", rate, "measured", stats.firing_rate)
        assert rate is not None and 0 < rate <= 1.0
        k = rate / stats.firing_rate
        at_rate = energy_report(model, stats, 1, cost, scale=k).pj_per_token
        if rate == 1.0:  # cheaper than the teacher even with every element spiking
            assert at_rate < teacher_pj
            continue
        searched.append(cost.name)
        assert at_rate == pytest.approx(teacher_pj, rel=1e-3)
        assert energy_report(model, stats, 1, cost, scale=0.5 * k).pj_per_token < teacher_pj
    assert searched  # the bisection itself was checked


def test_spike_costs_are_the_fan_out_of_each_neuron_at_the_ac_energy():
    from spiking.energy import spike_costs

    neurons = {p: {"kind": "si_lif", "D": 2} for p in ("in_proj", "x_proj", "dt_proj", "out_proj", "mlp.up", "mlp.down", "head")}
    F = 24
    model = spiking_student(neurons, mlp=F)
    costs = spike_costs(model)
    by_placement = {neuron_placement(name): pj for name, pj in costs.items() if ".layers.0." in name or "layers" not in name}
    assert by_placement == pytest.approx({
        "in_proj": 2 * E * 0.9, "x_proj": (R + 2 * N) * 0.9, "dt_proj": E * 0.9, "out_proj": d * 0.9,
        "mlp.up": 2 * F * 0.9, "mlp.down": d * 0.9, "head": VOCAB * 0.9,
    })
    assert len(costs) == 6 * 2 + 1  # every neuron of both blocks, and the head's
