"""Tests of spiking/neurons.py: SI-LIF, ATMN, SGC, calibration, spike counting, specs.

Equations are checked against hand-worked numbers and against the micro-step / step-loop
simulation (methods.md §2, §3, §5, §7).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_neurons.py -q
"""

import math

import pytest
import torch
from torch import nn

from spiking.neurons import (
    ATMN,
    NEURON_KINDS,
    SILIF,
    abs_percentile,
    count_spikes,
    make_neuron,
    neuron_placement,
    set_sgc_lambda,
    si_lif,
)


def wide_range_input(shape, seed=0):
    """Values from 1e-4 to 1e4 in magnitude, both signs, plus exact zeros."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(shape, generator=g) * 8 - 4)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x = mag * sign
    x.view(-1)[::17] = 0.0
    return x


def set_threshold(neuron, values):
    with torch.no_grad():
        neuron.set_threshold_(torch.as_tensor(values, dtype=torch.float32))


# ------------------------------------------------------------------------------------------
# SI-LIF
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 2, 4, 7])
def test_si_lif_micro_step_equals_closed_form_on_wide_random_inputs(D):
    neuron = SILIF(8, D=D)
    set_threshold(neuron, torch.tensor([1e-3, 0.01, 0.1, 0.3, 1.0, 3.7, 10.0, 123.0]))
    x = wide_range_input((64, 33, 8))
    y_closed = neuron(x)
    y_micro = neuron.simulate(x)
    s_closed = neuron.spike_counts(x)
    s_micro = neuron.simulate_spike_counts(x)
    print("max |y_closed - y_micro| =", (y_closed - y_micro).abs().max().item())
    assert torch.equal(y_closed, y_micro)
    assert torch.equal(s_closed, s_micro)
    # out-of-range values exist and saturate at ±D
    assert (s_closed.abs() == D).any() and (s_closed == 0).any()
    assert s_closed.abs().max().item() == D


def test_si_lif_exact_ties_agree_and_round_half_away_from_zero():
    D = 4
    V = torch.tensor([0.5, 0.25, 1.0, 0.3, 2.0 / 3.0])
    neuron = SILIF(len(V), D=D)
    set_threshold(neuron, V)
    V_used = neuron.V.detach()
    k = torch.arange(-(D + 2), D + 2, dtype=torch.float32)
    x = ((k + 0.5)[:, None] * V_used[None, :])  # [2D+4, C]: |x|/V = |k| + 0.5 (exact for 2^-n)
    y_closed, y_micro = neuron(x), neuron.simulate(x)
    assert torch.equal(y_closed, y_micro)
    s = neuron.spike_counts(x)
    u = x / V_used
    exact_tie = (u.abs() - u.abs().floor()) == 0.5
    assert exact_tie[:, :3].all()  # power-of-two thresholds give exact ties in every row
    expected = (torch.sign(u) * (u.abs() + 0.5).floor()).clamp(-D, D)
    assert torch.equal(s[exact_tie].float(), expected[exact_tie])
    # half away from zero, not torch.round's half to even: 0.5 -> 1, 2.5 -> 3, -2.5 -> -3
    n1 = SILIF(1, D=D)
    s1 = n1.spike_counts(torch.tensor([[0.5], [2.5], [-2.5], [-0.5], [1.5]])).flatten().tolist()
    assert s1 == [1, 3, -3, -1, 2]
    assert torch.round(torch.tensor(2.5)).item() == 2.0  # the rule we must not use


def test_si_lif_near_half_float_edge_cases_agree():
    # largest float below 0.5, and values one ulp around k + 0.5: both forms see fl(|u| + 0.5)
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))
    vals = [below_half]
    for k in range(5):
        t = torch.tensor(k + 0.5)
        vals += [torch.nextafter(t, torch.tensor(-1.0)), t, torch.nextafter(t, torch.tensor(10.0))]
    x = torch.stack(vals).unsqueeze(-1)
    x = torch.cat([x, -x])
    neuron = SILIF(1, D=4)
    assert torch.equal(neuron(x), neuron.simulate(x))
    assert torch.equal(neuron.spike_counts(x), neuron.simulate_spike_counts(x))


def test_si_lif_straight_through_gradient_for_x():
    D = 2
    V = torch.tensor([0.5])
    x = torch.tensor([[0.1], [0.6], [-0.99], [1.0], [-1.0], [1.1], [-1.3], [5.0]], requires_grad=True)
    y, _ = si_lif(x, V, D)
    y.sum().backward()
    # x/V = 0.2, 1.2, -1.98, 2.0, -2.0, 2.2, -2.6, 10: gradient 1 iff |x/V| <= D
    assert x.grad.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_si_lif_lsq_gradient_of_V_on_two_elements_by_hand():
    # D = 2, V = 0.5, x = [0.6, 1.7]: u = [1.2, 3.4], s = [1, 2], y = [0.5, 1.0]
    # dy/dV: inside (|1.2| <= 2): s - u = 1 - 1.2 = -0.2; outside (3.4 > 2): s = 2 -> sum 1.8
    V = torch.tensor([0.5], requires_grad=True)
    x = torch.tensor([[0.6], [1.7]], requires_grad=True)
    y, s = si_lif(x, V, 2)
    assert y.flatten().tolist() == [0.5, 1.0] and s.flatten().tolist() == [1.0, 2.0]
    y.sum().backward()
    assert V.grad.item() == pytest.approx(1.8, abs=1e-6)
    assert x.grad.flatten().tolist() == [1.0, 0.0]

    # the module: V = exp(log_V) and LSQ scale g = 1/sqrt(n·D), n = 2 elements per channel
    # -> d loss / d log_V = V · g · 1.8 = 0.5 · (1/sqrt(4)) · 1.8 = 0.45
    neuron = SILIF(1, D=2)
    set_threshold(neuron, [0.5])
    neuron(torch.tensor([[0.6], [1.7]])).sum().backward()
    assert neuron.log_V.grad.item() == pytest.approx(0.45, abs=1e-6)


def test_si_lif_micro_step_surrogate_gradients_equal_closed_form_gradients():
    # unrolling the D micro-steps with rectangular surrogates reproduces the STE and the LSQ rule
    torch.manual_seed(0)
    grads = []
    for form in ("forward", "simulate"):
        neuron = SILIF(6, D=4)
        set_threshold(neuron, [0.2, 0.5, 1.0, 1.5, 2.0, 3.0])
        x = (torch.randn(40, 6) * 4).requires_grad_(True)
        w = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
        (getattr(neuron, form)(x) * w).sum().backward()
        grads.append((x.grad.clone(), neuron.log_V.grad.clone()))
        torch.manual_seed(0)
    # equal up to rounding: the loop's chain rule computes V · (1/V) instead of 1
    print("max |dx closed - micro| =", (grads[0][0] - grads[1][0]).abs().max().item())
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(grads[0][0] != 0, grads[1][0] != 0)
    print("max |dlogV closed - micro| =", (grads[0][1] - grads[1][1]).abs().max().item())
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_threshold_stays_positive_after_huge_optimizer_step():
    for neuron in (SILIF(4, D=4), ATMN(4, T=4)):
        opt = torch.optim.SGD(neuron.parameters(), lr=1e6)
        x = torch.randn(32, 4) * 3
        # pushing everything to zero output drives the threshold in one direction, hard
        (neuron(x) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
        (-(neuron(x) ** 2).sum()).backward()
        opt.step()
        V = neuron.threshold()
        assert torch.isfinite(V).all() and (V > 0).all(), V
        assert torch.isfinite(neuron(x)).all()


# ------------------------------------------------------------------------------------------
# ATMN
# ------------------------------------------------------------------------------------------


def test_atmn_hand_example_tau1():
    # V_th = 1, T = 4, no leak: fires while the residual is >= 1
    #  2.7: h = 2.7 -> +1 (u 1.7), 1.7 -> +1 (u 0.7), 0.7 -> 0, 0.7 -> 0     = [1, 1, 0, 0], y 2
    # -1.2: -1.2 -> -1 (u -0.2), then 0                                       = [-1, 0, 0, 0], y -1
    #  0.4: never                                                             = 0
    #  5.5: fires all 4 steps (5.5, 4.5, 3.5, 2.5 >= 1), clipped at T          = y 4
    # -4.0: -4, -3, -2, -1 all <= -1                                          = y -4
    #  1.0: h = 1 >= 1 fires once (threshold included)                        = y 1
    # -0.99: never                                                            = 0
    neuron = ATMN(1, T=4, tau=1.0)
    x = torch.tensor([2.7, -1.2, 0.4, 5.5, -4.0, 1.0, -0.99]).unsqueeze(-1)
    trains = [[1, 1, 0, 0], [-1, 0, 0, 0], [0] * 4, [1] * 4, [-1] * 4, [1, 0, 0, 0], [0] * 4]
    expected_trains = torch.tensor(trains, dtype=torch.int32).T.unsqueeze(-1)  # [T, 7, 1]
    assert torch.equal(neuron.spike_counts(x), expected_trains)
    assert torch.equal(neuron.simulate_spike_counts(x), expected_trains)
    expected_y = torch.tensor([2.0, -1.0, 0.0, 4.0, -4.0, 1.0, 0.0]).unsqueeze(-1)
    assert torch.equal(neuron(x), expected_y)
    assert torch.equal(neuron.simulate(x), expected_y)

    # V_th = 0.5: x truncated toward zero to a multiple of 0.5, clipped to ±T·V_th = ±2
    set_threshold(neuron, [0.5])
    x = torch.tensor([1.3, -0.7, 0.2, 3.0, -1.76]).unsqueeze(-1)
    torch.testing.assert_close(neuron(x), torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5]).unsqueeze(-1))


def test_atmn_hand_example_tau2():
    # V_th = 1, T = 4, tau = 2: h_{t+1} = (h_t - s_t) / 2
    #  2.7: 2.7 -> +1 (u 1.7); h 0.85 -> 0; 0.425 -> 0; 0.2125 -> 0          = [1, 0, 0, 0], y 1
    #  3.5: 3.5 -> +1 (u 2.5); 1.25 -> +1 (u 0.25); 0.125; 0.0625            = [1, 1, 0, 0], y 2
    #  7.0: 7 -> +1 (u 6); 3 -> +1 (u 2); 1 -> +1 (u 0); 0 -> 0              = [1, 1, 1, 0], y 3
    # -6.5: -6.5 -> -1 (u -5.5); -2.75 -> -1 (u -1.75); -0.875; -0.4375      = [-1, -1, 0, 0], y -2
    # 100 : 100, 49.5, 24.25, 11.625 all >= 1                                 = [1, 1, 1, 1], y 4
    #  0.9: never                                                             = 0
    neuron = ATMN(1, T=4, tau=2.0)
    x = torch.tensor([2.7, 3.5, 7.0, -6.5, 100.0, 0.9]).unsqueeze(-1)
    trains = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [-1, -1, 0, 0], [1, 1, 1, 1], [0] * 4]
    expected_trains = torch.tensor(trains, dtype=torch.int32).T.unsqueeze(-1)
    assert torch.equal(neuron.spike_counts(x), expected_trains)
    expected_y = torch.tensor([1.0, 2.0, 3.0, -2.0, 4.0, 0.0]).unsqueeze(-1)
    assert torch.equal(neuron(x), expected_y)
    assert torch.equal(neuron.simulate(x), expected_y)
    partial = neuron.step_outputs(x)[:, :, 0]  # [T, 6]: outputs after 1..T steps
    assert partial[0].tolist() == [1.0, 1.0, 1.0, -1.0, 1.0, 0.0]
    assert partial[1].tolist() == [1.0, 2.0, 2.0, -2.0, 2.0, 0.0]


@pytest.mark.parametrize("T", [1, 2, 4])
def test_atmn_closed_form_equals_step_loop_tau1(T):
    neuron = ATMN(6, T=T, tau=1.0)
    set_threshold(neuron, [1e-3, 0.1, 0.37, 1.0, 2.5, 100.0])
    x = wide_range_input((50, 20, 6), seed=3)
    # exact multiples of the threshold (ties of the truncation) in a slice
    x[0] = torch.arange(-T - 1, T + 1).repeat(1, 6)[:, :20].T.float() * neuron.V_th.detach()
    assert torch.equal(neuron(x), neuron.simulate(x))
    assert torch.equal(neuron.spike_counts(x), neuron.simulate_spike_counts(x))
    counts = neuron.spike_counts(x).sum(0)
    assert counts.abs().max().item() == T


def test_atmn_closed_form_gradients_equal_step_loop_gradients_tau1():
    grads = []
    for form in ("forward", "simulate"):
        neuron = ATMN(5, T=4, tau=1.0)
        set_threshold(neuron, [0.3, 0.5, 1.0, 2.0, 4.0])
        x = (torch.randn(64, 5, generator=torch.Generator().manual_seed(2)) * 6).requires_grad_(True)
        w = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
        (getattr(neuron, form)(x) * w).sum().backward()
        grads.append((x.grad.clone(), neuron.a.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(grads[0][0] != 0, grads[1][0] != 0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    assert grads[0][1].abs().sum() > 0  # the gradient reaches a = log V_th


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_atmn_rectangular_surrogate_and_gradient_to_a(tau):
    neuron = ATMN(1, T=4, tau=tau)
    x = torch.tensor([[0.3], [0.7], [1.2], [4.4], [4.6], [-0.7], [-9.0]], requires_grad=True)
    y = neuron(x)
    y.sum().backward()
    if tau == 1.0:
        # rectangles of width V_th around 1..T tile 0.5 <= |x|/V_th <= T + 0.5
        assert x.grad.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert neuron.a.grad is not None and neuron.a.grad.abs().item() > 0


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_atmn_step_outputs_are_partial_sums_of_the_spike_train(tau):
    neuron = ATMN(3, T=4, tau=tau)
    set_threshold(neuron, [0.2, 0.7, 1.3])
    x = torch.randn(2, 5, 3) * 3
    partial = neuron.step_outputs(x)
    assert partial.shape == (4, 2, 5, 3)
    trains = neuron.simulate_spike_counts(x).float()
    torch.testing.assert_close(partial, trains.cumsum(0) * neuron.V_th.detach(), rtol=0, atol=1e-6)
    assert torch.equal(partial[-1], neuron(x))


# ------------------------------------------------------------------------------------------
# SGC
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["si_lif", "atmn"])
def test_sgc_lambda_zero_is_bit_identical_to_plain_neuron(kind):
    spec = {"kind": kind}
    torch.manual_seed(0)
    plain = make_neuron(spec, 4)
    mixed = make_neuron(spec, 4)
    mixed.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 4) * 2
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    mixed.sgc_lambda = 0.3
    mixed(x2)  # use the mixed path once, then switch it off
    mixed.sgc_lambda = 0.0
    y1, y2 = plain(x1), mixed(x2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    # and the plain path is exactly the functional closed form
    if kind == "si_lif":
        assert torch.equal(plain(x), si_lif(x, plain.V.detach(), plain.D)[0])


def test_sgc_mixes_spiking_output_and_input():
    neuron = SILIF(4, D=2)
    x = torch.randn(10, 4) * 3
    y_spiking = neuron(x)
    neuron.sgc_lambda = 0.25
    torch.testing.assert_close(neuron(x), 0.75 * y_spiking + 0.25 * x)
    # the simulation is always the deployed neuron
    assert torch.equal(neuron.simulate(x), y_spiking)


def test_set_sgc_lambda_sets_every_neuron_and_rejects_bad_values():
    model = nn.ModuleDict({"a": SILIF(3), "b": nn.Linear(3, 3), "c": ATMN(3)})
    assert set_sgc_lambda(model, 0.5) == 2
    assert model["a"].sgc_lambda == 0.5 and model["c"].sgc_lambda == 0.5
    with pytest.raises(ValueError, match="sgc_lambda"):
        set_sgc_lambda(model, 1.5)


# ------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------


def test_abs_percentile_matches_torch_quantile():
    x = torch.randn(1001, 5) * torch.tensor([0.1, 1.0, 10.0, 3.0, 0.5])
    torch.testing.assert_close(abs_percentile(x, 0.999), torch.quantile(x.abs(), 0.999, dim=0))
    torch.testing.assert_close(abs_percentile(x[:7], 0.5), torch.quantile(x[:7].abs(), 0.5, dim=0))


def test_calibration_maps_the_999th_percentile_to_the_top_level_and_is_saved():
    scales = torch.tensor([0.01, 1.0, 5.0, 0.0])  # last channel all zero
    x = torch.randn(4000, 4) * scales
    p = torch.quantile(x.abs(), 0.999, dim=0)
    for neuron, top in ((SILIF(4, D=4), 4), (ATMN(4, T=3), 3)):
        assert not bool(neuron.calibrated)
        neuron.calibrate_(x)
        V = neuron.threshold().detach()
        torch.testing.assert_close(V[:3] * top, p[:3], rtol=1e-5, atol=0)
        # the dead channel gets the median of the live channels' thresholds, not ~0
        torch.testing.assert_close(V[3], (p[:3] / top).median(), rtol=1e-5, atol=0)
        assert bool(neuron.calibrated)
        state = neuron.state_dict()
        assert "calibrated" in state and bool(state["calibrated"])
        fresh = type(neuron)(4)
        fresh.load_state_dict(state)
        assert bool(fresh.calibrated)
        # a value at (just above, for ATMN's truncation) the percentile fires the top level
        at_p = torch.cat([p[:3] * 1.001, torch.zeros(1)])[None]  # [1, C]
        counts = neuron.spike_counts(at_p)
        total = counts.sum(0) if isinstance(neuron, ATMN) else counts  # ATMN: [T, 1, C]
        assert total[0, :3].tolist() == [top] * 3


def test_ata_momentum_moves_threshold_only_in_training():
    neuron = SILIF(2, D=4, ata_momentum=0.5)
    x = torch.randn(512, 2) * torch.tensor([4.0, 0.25])
    target = abs_percentile(x, 0.999) / 4
    neuron.eval()
    neuron(x)
    assert torch.equal(neuron.V.detach(), torch.ones(2))
    neuron.train()
    y1 = neuron(x)
    torch.testing.assert_close(neuron.V.detach(), 0.5 * torch.ones(2) + 0.5 * target)
    y2 = neuron(x)  # two forwards, one backward (gradient accumulation) must work
    (y1.sum() + y2.sum()).backward()
    assert neuron.log_V.grad is not None


# ------------------------------------------------------------------------------------------
# Spike counting
# ------------------------------------------------------------------------------------------


class TinyBlockStack(nn.Module):
    """Two blocks with neurons named like the spiking Mamba's (layers.N.mixer.neurons.X)."""

    def __init__(self, C=6):
        super().__init__()
        blocks = []
        for _ in range(2):
            block = nn.Module()
            block.mixer = nn.Module()
            block.mixer.neurons = nn.ModuleDict({"in_proj": SILIF(C, D=3), "out_proj": ATMN(C, T=2)})
            blocks.append(block)
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.layers:
            x = block.mixer.neurons["out_proj"](block.mixer.neurons["in_proj"](x) * 0.9)
        return x


def test_count_spikes_counts_the_actual_integer_spikes_and_nothing_outside():
    torch.manual_seed(0)
    model = TinyBlockStack()
    x = torch.randn(2, 5, 6) * 3
    model(x)  # before the context: nothing to record into
    with count_spikes(model) as stats:
        model(x)
    model(x)  # after the context: must not change stats
    assert all(not n._spike_recorders for n in model.modules() if hasattr(n, "_spike_recorders"))

    # recompute the expected counts neuron by neuron
    expected, h = {}, x
    for i, block in enumerate(model.layers):
        n_in, n_out = block.mixer.neurons["in_proj"], block.mixer.neurons["out_proj"]
        s_in = n_in.spike_counts(h)
        assert s_in.abs().max() <= 3 and s_in.dtype == torch.int32
        mid = n_in(h) * 0.9
        s_out = n_out.spike_counts(mid)  # [T, 2, 5, 6] ternary
        assert set(s_out.unique().tolist()) <= {-1, 0, 1}
        expected[f"layers.{i}.mixer.neurons.in_proj"] = (s_in.abs().sum(), (s_in != 0).sum(), 60)
        expected[f"layers.{i}.mixer.neurons.out_proj"] = (s_out.abs().sum(), (s_out != 0).sum(), 120)
        h = n_out(mid)
    by_name = stats.by_name()
    assert set(by_name) == set(expected)
    for name, (abs_sum, nonzero, elements) in expected.items():
        rec = by_name[name]
        assert rec["abs_sum"] == int(abs_sum) and rec["nonzero"] == int(nonzero)
        assert rec["elements"] == elements and rec["tokens"] == 10
        assert rec["firing_rate"] == pytest.approx(int(nonzero) / elements)
        assert isinstance(rec["abs_sum"], int)
    totals = stats.spike_totals()
    assert totals["layers.0.mixer.neurons.in_proj"] == (int(expected["layers.0.mixer.neurons.in_proj"][0]), 10)
    placements = stats.by_placement()
    assert set(placements) == {"in_proj", "out_proj"}
    assert placements["in_proj"]["abs_sum"] == sum(int(v[0]) for k, v in expected.items() if "in_proj" in k)
    all_abs = sum(int(v[0]) for v in expected.values())
    assert stats.spikes_per_token == pytest.approx(all_abs / 10)
    assert 0 <= stats.firing_rate <= 1
    assert stats.mean_abs == pytest.approx(all_abs / sum(v[2] for v in expected.values()))


def test_count_spikes_honours_attention_mask():
    model = TinyBlockStack()
    x = torch.randn(2, 5, 6) * 3
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with count_spikes(model, attention_mask=mask) as stats:
        model(x)
    s_in = model.layers[0].mixer.neurons["in_proj"].spike_counts(x)
    rec = stats.by_name()["layers.0.mixer.neurons.in_proj"]
    assert rec["tokens"] == 8
    assert rec["abs_sum"] == int((s_in.abs() * mask[..., None]).sum())
    with pytest.raises(ValueError, match="attention_mask"):
        with count_spikes(model, attention_mask=torch.ones(2, 4)):
            model(x)


def test_neuron_placement_names():
    # the model's names (spiking.NEURON_MODULE_NAMES)
    assert neuron_placement("backbone.layers.3.mixer.neurons.in_proj_input") == "in_proj"
    assert neuron_placement("backbone.layers.3.mixer.neurons.x_proj_input") == "x_proj"
    assert neuron_placement("backbone.layers.3.mixer.neurons.out_proj_input") == "out_proj"
    assert neuron_placement("backbone.layers.0.mlp.neurons.up_input") == "mlp.up"
    assert neuron_placement("backbone.layers.0.mlp.neurons.down_input") == "mlp.down"
    # hand-built modules named by placement
    assert neuron_placement("backbone.layers.3.mixer.neurons.in_proj") == "in_proj"
    assert neuron_placement("backbone.layers.3.mixer.neurons.x_proj") == "x_proj"
    assert neuron_placement("backbone.layers.0.mlp.neurons.up") == "mlp.up"
    assert neuron_placement("backbone.layers.0.neurons.mlp_down") == "mlp.down"


# ------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------


def test_make_neuron_builds_the_registered_kinds():
    assert NEURON_KINDS == {"si_lif": SILIF, "atmn": ATMN}
    n = make_neuron({"kind": "si_lif", "D": 4, "learnable": True}, 8)
    assert isinstance(n, SILIF) and n.D == 4 and n.log_V.shape == (8,) and n.log_V.requires_grad
    n = make_neuron({"kind": "atmn", "T": 4, "tau": 1.0, "learnable": False}, 8)
    assert isinstance(n, ATMN) and n.T == 4 and n.tau == 1.0 and not n.a.requires_grad


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"kind": "lif"}, "kind"),
        ({"D": 4}, "kind"),
        ({"kind": "si_lif", "D": 0}, "D"),
        ({"kind": "si_lif", "D": 2.5}, "D"),
        ({"kind": "si_lif", "D": True}, "D"),
        ({"kind": "atmn", "T": 0}, "T"),
        ({"kind": "atmn", "tau": 0.0}, "tau"),
        ({"kind": "atmn", "tau": -1.0}, "tau"),
        ({"kind": "si_lif", "Dd": 4}, "'Dd'"),
        ({"kind": "atmn", "D": 4}, "'D'"),
        ({"kind": "si_lif", "ata_momentum": 1.0}, "ata_momentum"),
        ({"kind": "si_lif", "learnable": "yes"}, "learnable"),
    ],
)
def test_make_neuron_rejects_bad_specs_naming_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        make_neuron(spec, 4)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        SILIF(4)(torch.randn(2, 5))
    assert math.isfinite(SILIF(4)(torch.randn(2, 4)).sum().item())


@pytest.mark.parametrize("spec", [{"kind": "si_lif", "D": 3}, {"kind": "atmn", "T": 4, "tau": 1.5}])
def test_simulate_steps_are_the_events_that_sum_to_the_output(spec):
    neuron = make_neuron(spec, 5)
    x = torch.randn(4, 5) * 3
    events = neuron.simulate_steps(x)  # [S, 4, 5]
    steps = spec.get("D", spec.get("T"))
    assert events.shape == (steps, 4, 5)
    V = neuron.threshold().detach()
    levels = events.abs() / V
    torch.testing.assert_close(levels, levels.round().clamp(max=1))  # each step: 0 or one threshold
    torch.testing.assert_close(events.sum(0), neuron.simulate(x), rtol=0, atol=1e-6)
