"""The C++ CPU kernels vs their PyTorch twins: the fused scan (forward and backward), the one-token
state update, and the fused backbone step vs the per-layer path (logits, cache states, generate).

The extension is built once per machine on first use (~10 s, cached); where it cannot be built the
comparisons skip and the fallback test checks that the dispatch runs the reference and says why.
Every comparison prints its max difference before asserting.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_cpu_kernels.py -q
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import spiking
from spiking import SpikingMambaConfig, SpikingMambaForCausalLM, calibrate, count_spikes, default_neurons
from spiking import fused_step as fused_step_module
from spiking import modeling as modeling_module
from spiking import cpu_kernels
from spiking.kernels import selective_scan, selective_scan_ref, selective_state_update_ref
from spiking import scan as scan_module

EXTENSION_ERROR = cpu_kernels.load_extension()
needs_extension = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"C++ extension unavailable: {EXTENSION_ERROR}")

# (atol, rtol) of outputs and of gradients per input dtype; fp32 maths inside both
TOLERANCES = {torch.float32: ((2e-5, 2e-5), (1e-4, 1e-4)), torch.bfloat16: ((2e-2, 2e-2), (5e-2, 5e-2))}


def assert_close(name, actual, expected, tolerance):
    atol, rtol = tolerance
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{name}: max |cpu - ref| = {diff:.3g} (max |ref| {expected.float().abs().max().item():.3g})")
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=name)


def scan_inputs(batch, dim, state, length, groups, extras, initial_state, softplus=True, dtype=torch.float32, seed=0):
    """Leaf tensors of one scan; without softplus Δ is drawn positive, as a time step is."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    x = {
        "u": r(batch, dim, length).to(dtype),
        "delta": (0.5 * (r(batch, dim, length) if softplus else torch.rand(batch, dim, length, generator=gen))).to(dtype),
        "A": -torch.rand(dim, state, generator=gen) - 0.2,
        "B": r(*bc).to(dtype),
        "C": r(*bc).to(dtype),
    }
    if extras:
        x |= {"D": r(dim), "z": r(batch, dim, length).to(dtype), "delta_bias": 0.1 * r(dim)}
    if initial_state:
        x["initial_state"] = r(batch, dim, state)
    return {k: v.requires_grad_(True) for k, v in x.items()}


# (batch, dim, state, length, groups, extras, softplus, initial_state, chunk): D not a multiple of the
# 16 lanes, N = 16 (the unrolled path) and others, lengths not a multiple of the chunk and shorter
# than one, grouped B/C (groups narrower than a vector), every optional input on and off
SCAN_CASES = [
    pytest.param(2, 37, 16, 45, None, True, True, True, 8, id="D37-N16-all-extras-h0"),
    pytest.param(2, 16, 4, 13, None, False, False, False, 4, id="bare-no-softplus"),
    pytest.param(1, 20, 5, 3, None, True, True, False, 8, id="L3-shorter-than-chunk"),
    pytest.param(2, 6, 3, 24, 2, True, True, True, 8, id="grouped-G2-N3"),
    pytest.param(3, 32, 16, 40, 2, True, False, False, 16, id="grouped-G2-N16-no-softplus"),
    pytest.param(1, 17, 18, 33, None, False, True, True, 32, id="N18-softplus-h0-no-extras"),
]


@needs_extension
@pytest.mark.parametrize("batch, dim, state, length, groups, extras, softplus, initial_state, chunk", SCAN_CASES)
def test_scan_matches_ref_forward_and_backward(batch, dim, state, length, groups, extras, softplus, initial_state, chunk):
    x = scan_inputs(batch, dim, state, length, groups, extras, initial_state, softplus)
    kwargs = dict(delta_softplus=softplus, return_last_state=True)
    out, last = cpu_kernels.selective_scan_cpu(**x, **kwargs, chunk=chunk)
    out_ref, last_ref = selective_scan_ref(**x, **kwargs)
    assert out.dtype == out_ref.dtype and last.dtype == torch.float32 and out.shape == out_ref.shape
    out_tol, grad_tol = TOLERANCES[torch.float32]
    assert_close("out", out, out_ref, out_tol)
    assert_close("last_state", last, last_ref, out_tol)

    gen = torch.Generator().manual_seed(1)
    w_out, w_last = torch.randn(out.shape, generator=gen), torch.randn(last.shape, generator=gen)
    grads = torch.autograd.grad((out * w_out).sum() + (last * w_last).sum(), list(x.values()))
    grads_ref = torch.autograd.grad((out_ref * w_out).sum() + (last_ref * w_last).sum(), list(x.values()))
    for name, g, g_ref in zip(x, grads, grads_ref):
        assert g.shape == x[name].shape and g.dtype == x[name].dtype, name
        assert_close(f"grad {name}", g, g_ref, grad_tol)


@needs_extension
def test_scan_on_the_models_strided_views_and_bf16():
    """The model passes transposed / sliced views (no copy is made for them); bf16 in, bf16 out."""
    gen = torch.Generator().manual_seed(3)
    batch, length, dim, rank, state = 2, 19, 24, 3, 16
    projected = torch.randn(batch, length, 2 * dim, generator=gen, requires_grad=True)  # in_proj's output
    x_dbl = torch.randn(batch, length, rank + 2 * state, generator=gen, requires_grad=True)  # x_proj's output
    dt = (0.3 * torch.randn(batch, length, dim, generator=gen)).requires_grad_(True)
    A = -torch.rand(dim, state, generator=gen) - 0.2
    Dskip, bias = torch.randn(dim, generator=gen), 0.1 * torch.randn(dim, generator=gen)
    u, z = projected.transpose(1, 2).chunk(2, dim=1)  # [B, D, L] views of a [B, L, 2D] tensor
    B, C = x_dbl[..., rank : rank + state].transpose(1, 2), x_dbl[..., rank + state :].transpose(1, 2)
    args = (u, dt.transpose(1, 2), A, B, C)
    kw = dict(D=Dskip, z=z, delta_bias=bias, delta_softplus=True)
    out = cpu_kernels.selective_scan_cpu(*args, **kw)
    out_ref = selective_scan_ref(*args, **kw)
    assert_close("out (views)", out, out_ref, TOLERANCES[torch.float32][0])
    leaves = [projected, x_dbl, dt]
    for name, g, g_ref in zip(["projected", "x_dbl", "dt"], torch.autograd.grad(out.sum(), leaves),
                              torch.autograd.grad(out_ref.sum(), leaves)):
        assert_close(f"grad {name} (views)", g, g_ref, TOLERANCES[torch.float32][1])

    x = scan_inputs(2, 20, 16, 11, None, True, False, dtype=torch.bfloat16)
    out16 = cpu_kernels.selective_scan_cpu(**x, delta_softplus=True)
    ref16 = selective_scan_ref(**x, delta_softplus=True)
    assert out16.dtype == torch.bfloat16
    assert_close("out bf16", out16, ref16, TOLERANCES[torch.bfloat16][0])
    for name, g, g_ref in zip(x, torch.autograd.grad(out16.float().sum(), list(x.values())),
                              torch.autograd.grad(ref16.float().sum(), list(x.values()))):
        assert g.dtype == x[name].dtype, name
        assert_close(f"grad {name} bf16", g, g_ref, TOLERANCES[torch.bfloat16][1])


@needs_extension
@pytest.mark.parametrize("dim, state, extras", [(37, 16, True), (8, 5, False), (20, 18, True)])
def test_state_update_matches_ref_and_the_scan(dim, state, extras):
    x = {k: v.detach() for k, v in scan_inputs(3, dim, state, 4, None, extras, True).items()}
    state_cpu, state_ref = x["initial_state"].clone(), x["initial_state"].clone()
    steps = []
    for t in range(4):
        args = dict(x=x["u"][..., t], dt=x["delta"][..., t], A=x["A"], B=x["B"][..., t], C=x["C"][..., t],
                    D=x.get("D"), z=x["z"][..., t] if extras else None, dt_bias=x.get("delta_bias"), dt_softplus=True)
        out = cpu_kernels.selective_state_update_cpu(state_cpu, **args)
        out_ref = selective_state_update_ref(state_ref, **args)
        assert_close(f"step {t} out", out, out_ref, TOLERANCES[torch.float32][0])
        assert_close(f"step {t} state", state_cpu, state_ref, TOLERANCES[torch.float32][0])
        steps.append(out)
    scan = selective_scan_ref(**x, delta_softplus=True)
    assert_close("steps vs scan", torch.stack(steps, -1), scan, TOLERANCES[torch.float32][0])


# ---------------------------------------------------------------------------------------------
# The fused backbone step (generation) vs the per-layer path
# ---------------------------------------------------------------------------------------------

VOCAB = 40
TINY = dict(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, pad_token_id=0, eos_token_id=1)
MODELS = {
    "teacher": {},
    "si_lif": {"neurons": default_neurons(D=4)},
    # the LM head's neuron is the backbone's, run as a module after the fused step's norm_f
    "si_lif-head": {"neurons": {**default_neurons(D=4), "head": {"kind": "si_lif", "D": 4}}},
    "mlp-atmn-x_proj": {
        "neurons": {**default_neurons(D=3), "x_proj": {"kind": "atmn", "T": 3},
                    "mlp.up": {"kind": "si_lif", "D": 2}, "mlp.down": {"kind": "atmn", "T": 2}},
        "mlp_intermediate_size": 24,
    },
    # recipes/small.yaml's sparsified student: ATMN on every linear layer's input, dt_proj's too
    "atmn-every-linear": {
        "neurons": {p: {"kind": "atmn", "T": 4} for p in ("in_proj", "x_proj", "dt_proj", "out_proj", "head")},
    },
}


def tiny_model(fields: dict, state_size: int = 16) -> SpikingMambaForCausalLM:
    torch.manual_seed(0)
    model = SpikingMambaForCausalLM(SpikingMambaConfig(**(TINY | {"state_size": state_size} | fields))).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            if block.mlp is not None:  # a fresh MLP is a no-op (down_proj = 0): give it weights
                block.mlp.down_proj.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    if fields.get("neurons"):
        calibrate(model, [{"input_ids": torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))}])
        # calibration puts the percentile's own inputs exactly on a level (|x / V| = top level): an
        # ATMN count (trunc) there flips on one ulp of the norm's rounding. Trained thresholds sit
        # anywhere; move these off the calibration's grid so the paths are compared, not the knife-edge.
        for _, neuron in spiking.neurons.iter_neurons(model):
            neuron.set_threshold_(neuron.threshold().detach() * 1.0137)
    return model


def test_the_step_plan_and_the_cpp_step_agree_on_the_slots():
    """fused_step.SLOTS (Python) and `enum Slot` (C++) list one block's tensors in the same order."""
    import re

    source = cpu_kernels.SOURCE.read_text()
    names = re.search(r"enum Slot \{([^}]*)\}", source).group(1).replace("\n", " ").split(",")
    names = [n.strip() for n in names if n.strip()]
    assert names[-1] == "kSlots" and len(names) - 1 == len(fused_step_module.SLOTS)
    assert [n[1:].lower() for n in names[:-1]] == [n.replace("_", "").lower() for n in fused_step_module.SLOTS]


def per_layer_path(monkeypatch):
    """Switch the fused step off (the model then runs its modules for each token)."""
    monkeypatch.setattr(modeling_module, "decode_step", lambda *args, **kwargs: None)


def decode(model, ids, prefill=4):
    """Logits of a prefill then one-token steps, and the cache's states at the end."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.cache
        for i in range(prefill, ids.shape[1]):
            out = model(ids[:, i : i + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    states = [(cache.get_conv_state(i).clone(), cache.get_recurrent_state(i).clone()) for i in range(len(cache.layers))]
    return torch.cat(logits, 1), states


@needs_extension
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sgc_lambda", [0.0, 0.3], ids=["spikes", "sgc"])
def test_fused_step_equals_the_per_layer_path_and_the_full_forward(name, sgc_lambda, monkeypatch, caplog):
    model = tiny_model(MODELS[name])
    spiking.set_sgc_lambda(model, sgc_lambda)
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.INFO, logger=fused_step_module.__name__):
        fused_step_module._logged.clear()
        logits, states = decode(model, ids)
    assert "one-token step: fused C++ backbone step" in caplog.messages
    with monkeypatch.context() as patch:
        per_layer_path(patch)
        logits_ref, states_ref = decode(model, ids)
    with torch.no_grad():
        full = model(ids).logits
    assert_close("logits fused vs per-layer", logits, logits_ref, (2e-5, 2e-5))
    assert_close("logits fused vs full forward", logits, full, (1e-4, 1e-4))
    for i, ((conv, ssm), (conv_ref, ssm_ref)) in enumerate(zip(states, states_ref)):
        assert_close(f"layer {i} conv state", conv, conv_ref, (2e-5, 2e-5))
        assert_close(f"layer {i} ssm state", ssm, ssm_ref, (2e-5, 2e-5))


@needs_extension
def test_fused_step_with_another_state_size_and_generate(monkeypatch):
    """N = 5 (the kernel's generic path); greedy, sampled and beam-search generate give the per-layer
    path's tokens."""
    model = tiny_model(MODELS["si_lif"], state_size=5)
    prompt = torch.randint(2, VOCAB, (4, 5), generator=torch.Generator().manual_seed(7))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, eos_token_id=None, pad_token_id=0)

    def both():
        torch.manual_seed(11)
        sampled = model.generate(prompt, do_sample=True, top_k=0, **kw)
        return model.generate(prompt, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw), sampled

    greedy, sampled = both()
    beam_kw = dict(do_sample=False, num_beams=3, output_scores=True, return_dict_in_generate=True)
    beams = model.generate(prompt, **beam_kw, **kw)  # beam search replaces the cache's tensors every step
    with monkeypatch.context() as patch:
        per_layer_path(patch)
        greedy_ref, sampled_ref = both()
        beams_ref = model.generate(prompt, **beam_kw, **kw)
    assert torch.equal(greedy.sequences, greedy_ref.sequences)
    assert torch.equal(beams.sequences, beams_ref.sequences)
    assert_close("beam scores", torch.stack(beams.scores), torch.stack(beams_ref.scores), (2e-5, 2e-5))
    assert_close("greedy step scores", torch.stack(greedy.scores), torch.stack(greedy_ref.scores), (2e-5, 2e-5))
    assert torch.equal(sampled, sampled_ref) and sampled.shape == (4, 13)


@needs_extension
def test_fused_step_steps_aside_when_it_cannot_do_what_the_modules_do(caplog):
    """Counting spikes, autograd, a ref backend: the per-layer path runs (counting: logged once)."""
    model = tiny_model(MODELS["si_lif"])
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
    hidden = model.backbone.embeddings(ids[:, 5:])
    fused_step_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=fused_step_module.__name__), torch.no_grad(), count_spikes(model) as stats:
        assert fused_step_module.decode_step(model.backbone, hidden, cache) is None
        model(ids[:, 5:], cache=cache, use_cache=True)
    assert "one-token step: per-layer path (spikes are being counted)" in caplog.messages
    assert stats.names()  # the per-layer path counted the step's spikes
    assert fused_step_module.decode_step(model.backbone, hidden, cache) is None  # grad enabled here
    model.config.scan_backend = "ref"
    with torch.no_grad():
        assert fused_step_module.decode_step(model.backbone, hidden, cache) is None
    # a neuron under a name the step does not know: it stands aside rather than run without it
    model.config.scan_backend = "auto"
    mixer = model.backbone.layers[0].mixer
    mixer.neurons["renamed"] = mixer.neurons.pop("in_proj_input")
    fused_step_module._logged.clear()
    with caplog.at_level(logging.INFO, logger=fused_step_module.__name__), torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
        assert fused_step_module.decode_step(model.backbone, hidden, cache) is None
    assert any("do not match the placements" in m for m in caplog.messages)


def test_generating_in_training_mode_with_checkpointing_keeps_the_cache(monkeypatch):
    """TRL generates rollouts with the policy in training mode, under no_grad: the cache (and the
    one-token step) must stay on even with gradient checkpointing enabled."""
    model = tiny_model(MODELS["si_lif"]).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    steps = []
    original = modeling_module.decode_step
    monkeypatch.setattr(modeling_module, "decode_step", lambda *a, **k: steps.append(1) or original(*a, **k))
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 9) and len(steps) == 3  # every token after the first came from the cached step
    model.activation_checkpointing_disable()


def test_without_the_extension_auto_runs_the_ref_and_says_why(monkeypatch, caplog):
    monkeypatch.setitem(cpu_kernels._state, "error", "no compiler (test)")
    scan_module._logged_choices.clear()
    x = scan_inputs(1, 8, 4, 6, None, True, False)
    with caplog.at_level(logging.INFO, logger=scan_module.__name__), torch.no_grad():
        assert scan_module.resolve_backend("auto", torch.device("cpu")) == "ref"
        assert scan_module.resolve_backend("cpu", torch.device("cpu")) == "ref"
        out = selective_scan(**x, delta_softplus=True, backend="auto")
    torch.testing.assert_close(out, selective_scan_ref(**x, delta_softplus=True), atol=0, rtol=0)
    assert "selective scan backend: ref (requested 'auto')" in caplog.messages
    assert any("'cpu' unavailable" in m and "no compiler (test)" in m for m in caplog.messages)
    model = tiny_model(MODELS["si_lif"])
    with torch.no_grad():
        assert model.generate(torch.tensor([[3, 4]]), max_new_tokens=3, do_sample=False).shape == (1, 5)
    scan_module._logged_choices.clear()


@needs_extension
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("O", [70, 530])
def test_spike_linear_equals_the_dense_projection(bias, O):
    """The spike-driven projection (only the W^T rows of nonzero inputs) against F.linear: O = 70 runs
    the 4-vector blocks and the tail, O = 530 the 8-vector ones and a tail; rows all zero, sparse
    and dense; a strided input view."""
    g = torch.Generator().manual_seed(12)
    K = 40
    weight = torch.randn(O, K, generator=g)
    b = torch.randn(O, generator=g) if bias else None
    x = torch.randint(-4, 5, (5, K), generator=g).float() * (torch.rand(5, K, generator=g) < 0.1) * 0.37
    x[0] = 0.0
    x[1] = torch.randn(K, generator=g)  # every entry nonzero
    wide = torch.zeros(5, 2 * K)
    wide[:, :K] = x
    for inp in (x, wide[:, :K]):
        out = torch.ops.spikerl_cpu.spike_linear(inp, weight.t().contiguous(), b)
        assert_close("spike_linear", out, F.linear(inp, weight, b), (1e-5, 1e-5))
    # project: spike-driven below the density bound, the dense matmul above it; the same sums either way
    dense = torch.randn(5, K, generator=g)
    for inp in (x[2:], dense):
        out = torch.ops.spikerl_cpu.project(inp, weight, weight.t().contiguous(), b)
        assert_close("project", out, F.linear(inp, weight, b), (1e-5, 1e-5))


@needs_extension
def test_fused_step_with_sparse_out_proj_spikes(monkeypatch, caplog):
    """out_proj's spikes below the step's density bound: it projects them spike-driven, and the
    logits and states still equal the per-layer path's."""
    model = tiny_model({"neurons": {"in_proj": {"kind": "atmn", "T": 4}, "out_proj": {"kind": "atmn", "T": 4}}})
    neurons = [block.mixer.neurons["out_proj_input"] for block in model.backbone.layers]
    for neuron in neurons:
        neuron.set_threshold_(neuron.threshold().detach() * 3.1)  # fewer spikes, as after sparsify
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.INFO, logger=fused_step_module.__name__):
        fused_step_module._logged.clear()
        logits, states = decode(model, ids)
    assert "one-token step: fused C++ backbone step" in caplog.messages
    densities = []  # measured on the per-layer path (a hook makes the fused step stand aside)
    for neuron in neurons:
        neuron.register_forward_hook(lambda m, i, out: densities.append((out != 0).float().mean().item()))
    with monkeypatch.context() as patch:
        per_layer_path(patch)
        logits_ref, states_ref = decode(model, ids)
    step_densities = densities[len(model.backbone.layers):]  # the one-token steps, not the prefill
    assert 0 < max(step_densities) <= 0.3  # under the C++ step's max_density at any batch: the sparse path ran
    assert_close("logits fused vs per-layer", logits, logits_ref, (2e-5, 2e-5))
    for i, ((conv, ssm), (conv_ref, ssm_ref)) in enumerate(zip(states, states_ref)):
        assert_close(f"layer {i} ssm state", ssm, ssm_ref, (2e-5, 2e-5))


@needs_extension
def test_fused_step_with_sparse_mlp_spikes(monkeypatch, caplog):
    """The MLP's projections take the spike-driven path too (gate and up share the up neuron's
    spikes, down has its own): with few spikes the logits still equal the per-layer path's."""
    torch.manual_seed(0)
    fields = {"neurons": {"mlp.up": {"kind": "atmn", "T": 4}, "mlp.down": {"kind": "atmn", "T": 4}},
              "mlp_intermediate_size": 80}  # gate / up 80 wide and down 64: at least one 64-wide block each
    model = SpikingMambaForCausalLM(SpikingMambaConfig(**(TINY | {"hidden_size": 64}), **fields)).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mlp.down_proj.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    calibrate(model, [{"input_ids": torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))}])
    neurons = [n for block in model.backbone.layers for n in block.mlp.neurons.values()]
    for neuron in neurons:
        neuron.set_threshold_(neuron.threshold().detach() * 2.7)  # fewer spikes, off the calibration grid
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.INFO, logger=fused_step_module.__name__):
        fused_step_module._logged.clear()
        logits, _ = decode(model, ids)
    assert "one-token step: fused C++ backbone step" in caplog.messages
    densities = []
    for neuron in neurons:
        neuron.register_forward_hook(lambda m, i, out: densities.append((out != 0).float().mean().item()))
    with monkeypatch.context() as patch:
        per_layer_path(patch)
        logits_ref, _ = decode(model, ids)
    steps = densities[len(neurons):]  # after the prefill
    assert 0 < max(steps) <= 0.3  # under max_density at any batch: every MLP projection ran spike-driven
    assert_close("logits fused vs per-layer", logits, logits_ref, (2e-5, 2e-5))


@needs_extension
def test_the_head_neuron_and_a_spike_driven_lm_head_after_the_fused_step(monkeypatch, caplog):
    """The step applies the LM head's neuron to norm_f's output, and the head projects those spikes
    spike-driven (vocabulary 200: three 64-wide blocks and a tail) when few fired: the logits equal
    the per-layer path's, where the neuron and the head run as modules."""
    model = tiny_model({"neurons": {"in_proj": {"kind": "atmn", "T": 4}, "head": {"kind": "atmn", "T": 4}},
                        "vocab_size": 200})
    head = model.backbone.neurons["head_input"]
    head.set_threshold_(head.threshold().detach() * 2.3)  # fewer spikes, as after sparsify
    projected = []
    original = modeling_module.head_logits
    monkeypatch.setattr(modeling_module, "head_logits", lambda *a: projected.append(original(*a)) or projected[-1])
    ids = torch.randint(2, 200, (3, 11), generator=torch.Generator().manual_seed(6))
    logits, _ = decode(model, ids)
    assert len(projected) == 8 and all(p is not None for p in projected[1:])  # every one-token step's head
    densities = []
    head.register_forward_hook(lambda m, i, out: densities.append((out != 0).float().mean().item()))
    with monkeypatch.context() as patch:
        per_layer_path(patch)
        logits_ref, _ = decode(model, ids)
    assert 0 < max(densities[1:]) <= 0.45  # under max_density at any batch: the head ran spike-driven
    assert_close("logits fused vs per-layer", logits, logits_ref, (2e-5, 2e-5))
