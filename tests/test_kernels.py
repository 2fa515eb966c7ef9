"""Triton kernels vs their `_ref` twins: forward and backward, on CPU (interpreter) and CUDA.

On CPU the kernels run through `TRITON_INTERPRET=1` (set by tests/conftest.py before anything
imports a kernel module; ~1000x slower than eager, so the shapes are tiny) in fp32 only, since the
interpreter gets bf16 wrong. On CUDA the same tests run in fp32 and bf16; without CUDA those skip.
Every comparison prints its max difference before asserting.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_kernels.py -q
"""

import copy
import logging
import os

import pytest
import torch

pytest.importorskip("triton")

from spiking import SpikingMambaConfig, SpikingMambaForCausalLM, calibrate, set_sgc_lambda  # noqa: E402
from spiking.kernels import (  # noqa: E402
    gate_neuron,
    gate_neuron_ref,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)
from spiking import scan as scan_module  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CPU = pytest.param(
    "cpu", marks=pytest.mark.skipif(not INTERPRETER, reason="CPU kernels need TRITON_INTERPRET=1 before import")
)
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="needs CUDA (and no interpreter)"),
    ],
)
DEVICE_DTYPES = [
    pytest.param(*p.values, torch.float32, marks=p.marks, id=f"{p.values[0]}-fp32") for p in (CPU, CUDA)
] + [pytest.param("cuda", torch.bfloat16, marks=CUDA.marks, id="cuda-bf16")]  # the interpreter gets bf16 wrong

# (atol, rtol) of outputs and of gradients per dtype; bf16 inputs, fp32 math inside both
TOLERANCES = {torch.float32: ((1e-4, 1e-4), (2e-4, 2e-4)), torch.bfloat16: ((5e-2, 3e-2), (1e-1, 5e-2))}


def assert_close(name, actual, expected, tolerance):
    atol, rtol = tolerance
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{name}: max |triton - ref| = {diff:.3g} (max |ref| {expected.float().abs().max().item():.3g})")
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=name)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------


def scan_inputs(device, dtype, batch, dim, state, length, groups, extras, initial_state, softplus=True, seed=0):
    """Leaf tensors for one scan; B, C input-dependent [B, N, L], or [B, G, N, L] with groups.

    Without softplus Δ is drawn positive, as a time step is: a negative one grows the state.
    """
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    x = {
        "u": r(batch, dim, length).to(dtype),
        "delta": (0.5 * (r(batch, dim, length) if softplus else torch.rand(batch, dim, length, generator=gen))).to(dtype),
        "A": -torch.rand(dim, state, generator=gen) - 0.2,  # fp32 like the model's A
        "B": r(*bc).to(dtype),
        "C": r(*bc).to(dtype),
    }
    if extras:
        x |= {"D": r(dim), "z": r(batch, dim, length).to(dtype), "delta_bias": 0.1 * r(dim)}
    if initial_state:
        x["initial_state"] = r(batch, dim, state)
    return {k: v.to(device).requires_grad_(True) for k, v in x.items()}


# (length, chunk, state, groups, extras, delta_softplus, initial_state): lengths not a multiple of the
# chunk, one shorter than a chunk, N not a power of two, grouped B/C, every optional input on and off
SCAN_CASES = [
    pytest.param(37, 16, 4, None, True, True, True, id="L37-chunk16-all-extras-h0"),
    pytest.param(37, 8, 4, None, False, False, False, id="L37-chunk8-bare"),
    pytest.param(5, 16, 2, None, True, False, False, id="L5-shorter-than-chunk"),
    pytest.param(24, 8, 3, 2, True, True, False, id="L24-grouped-N3"),
    pytest.param(20, 8, 4, None, False, True, True, id="L20-softplus-h0-no-extras"),
]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("length, chunk, state, groups, extras, softplus, initial_state", SCAN_CASES)
def test_selective_scan_matches_ref(device, dtype, length, chunk, state, groups, extras, softplus, initial_state):
    """Output, last state and the gradient of every input vs the PyTorch reference's autograd."""
    from spiking.triton_scan import selective_scan_triton

    x = scan_inputs(device, dtype, batch=2, dim=8, state=state, length=length, groups=groups, extras=extras,
                    initial_state=initial_state, softplus=softplus)
    kwargs = dict(delta_softplus=softplus, return_last_state=True)
    out, last = selective_scan_triton(**x, **kwargs, chunk=chunk)
    out_ref, last_ref = selective_scan_ref(**x, **kwargs)
    assert out.dtype == out_ref.dtype == dtype and last.dtype == torch.float32
    out_tol, grad_tol = TOLERANCES[dtype]
    assert_close("out", out, out_ref, out_tol)
    assert_close("last_state", last, last_ref, out_tol)

    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=gen).to(device)
    w_last = torch.randn(last.shape, generator=gen).to(device)
    grads = grads_of((out.float() * w_out).sum() + (last * w_last).sum(), x)
    grads_ref = grads_of((out_ref.float() * w_out).sum() + (last_ref * w_last).sum(), x)
    for name, g, g_ref in zip(x, grads, grads_ref):
        assert g.dtype == x[name].dtype and g.shape == x[name].shape, name
        assert_close(f"grad {name}", g, g_ref, grad_tol)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES[:2])
def test_selective_scan_without_last_state_gradient(device, dtype):
    """The training path: only `out` is used, so backward gets no last-state gradient."""
    x = scan_inputs(device, dtype, batch=1, dim=4, state=2, length=13, groups=None, extras=True, initial_state=False)
    out = selective_scan(**x, delta_softplus=True, backend="triton")
    out_ref = selective_scan_ref(**x, delta_softplus=True)
    assert_close("out", out, out_ref, TOLERANCES[dtype][0])
    for name, g, g_ref in zip(x, grads_of(out.sum(), x), grads_of(out_ref.sum(), x)):
        assert_close(f"grad {name}", g, g_ref, TOLERANCES[dtype][1])


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("extras", [True, False], ids=["z-D-bias", "bare"])
def test_state_update_matches_ref_and_scan(device, dtype, extras):
    """The one-token kernel: same output and updated state as the ref; three steps equal the scan."""
    x = scan_inputs(device, dtype, batch=2, dim=8, state=4, length=3, groups=None, extras=extras, initial_state=True)
    x = {k: v.detach() for k, v in x.items()}
    state, state_ref = x["initial_state"].clone(), x["initial_state"].clone()
    steps = []
    for t in range(3):
        args = dict(x=x["u"][..., t], dt=x["delta"][..., t], A=x["A"], B=x["B"][..., t], C=x["C"][..., t],
                    D=x.get("D"), z=x["z"][..., t] if extras else None, dt_bias=x.get("delta_bias"), dt_softplus=True)
        out = selective_state_update(state, **args, backend="triton")
        out_ref = selective_state_update_ref(state_ref, **args)
        assert out.dtype == dtype
        assert_close(f"step {t} out", out, out_ref, TOLERANCES[dtype][0])
        assert_close(f"step {t} state", state, state_ref, TOLERANCES[dtype][0])
        steps.append(out)
    scan_out = selective_scan_ref(**x, delta_softplus=True)
    assert_close("steps vs scan", torch.stack(steps, -1), scan_out, TOLERANCES[dtype][0])


# ---------------------------------------------------------------------------------------------
# Fused gate + neuron
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind, levels", [("si_lif", 4), ("atmn", 3)])
@pytest.mark.parametrize("sgc_lambda, gated", [(0.0, True), (0.3, True), (0.0, False)], ids=["gate", "gate-sgc", "no-gate"])
def test_gate_neuron_matches_ref(device, dtype, kind, levels, sgc_lambda, gated):
    """y·SiLU(z) -> neuron -> [B, L, D]: values exactly the reference's levels, grads of y, z and V."""
    gen = torch.Generator().manual_seed(2)
    batch, dim, length = 2, 8, 21
    y = (2 * torch.randn(batch, dim, length, generator=gen)).to(device, dtype).requires_grad_(True)
    z = torch.randn(batch, dim, length, generator=gen).to(device, dtype).requires_grad_(True) if gated else None
    V = (0.2 + torch.rand(dim, generator=gen)).to(device).requires_grad_(True)  # fp32 like the neurons'
    out = gate_neuron(y, z, V, kind, levels, sgc_lambda, backend="triton")
    out_ref = gate_neuron_ref(y, z, V, kind, levels, sgc_lambda)
    assert out.shape == (batch, length, dim) and out.dtype == dtype
    out_tol, grad_tol = TOLERANCES[dtype]
    assert_close("out", out, out_ref, out_tol)
    if sgc_lambda == 0:  # spike levels: integers times V
        counts = (out.float() / V.detach()).round()
        assert counts.abs().max() <= levels and counts.abs().sum() > 0

    leaves = {"y": y, "V": V} | ({"z": z} if gated else {})
    w = torch.randn(out.shape, generator=gen).to(device)
    grads = grads_of((out.float() * w).sum(), leaves)
    grads_ref = grads_of((out_ref.float() * w).sum(), leaves)
    for name, g, g_ref in zip(leaves, grads, grads_ref):
        # dV sums over B·L elements: absolute tolerance scaled by that count in bf16
        tol = grad_tol if name != "V" or dtype == torch.float32 else (grad_tol[0] * batch * length, grad_tol[1])
        assert_close(f"grad {name}", g, g_ref, tol)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_auto_never_picks_a_triton_kernel_on_cpu_and_triton_needs_the_interpreter(monkeypatch, caplog):
    cpu = torch.device("cpu")
    scan_module._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger=scan_module.__name__):
        chosen = resolve_backend("auto", cpu)  # even with TRITON_INTERPRET=1 set: the C++ kernel or the ref
        assert chosen in ("cpu", "ref") and resolve_backend("auto", cpu) == chosen
    assert [r.getMessage() for r in caplog.records if "backend:" in r.getMessage()] == [
        f"selective scan backend: {chosen} (requested 'auto')"
    ]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    monkeypatch.setattr(scan_module, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        resolve_backend("triton", cpu)


@pytest.mark.skipif(not INTERPRETER, reason="CPU kernels need TRITON_INTERPRET=1")
def test_constant_B_C_run_the_reference_and_say_so(caplog):
    x = scan_inputs("cpu", torch.float32, 1, 4, 2, 6, None, False, False)
    B, C = torch.randn(4, 2), torch.randn(4, 2)
    scan_module._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger=scan_module.__name__), torch.no_grad():
        out = selective_scan(x["u"], x["delta"], x["A"], B, C, backend="triton")
    torch.testing.assert_close(out, selective_scan_ref(x["u"], x["delta"], x["A"], B, C), atol=0, rtol=0)
    assert "selective scan backend: ref (constant B/C) (requested 'triton')" in [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------
# The model: backend="triton" equals backend="ref"
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=20, hidden_size=16, state_size=4, num_hidden_layers=1, pad_token_id=0, eos_token_id=1)


def tiny_pair(device, out_neuron: dict, sgc_lambda: float):
    """The same calibrated student twice: scan_backend 'ref' and 'triton'."""
    torch.manual_seed(0)
    neurons = {"in_proj": {"kind": "si_lif", "D": 4}, "out_proj": out_neuron}
    ref = SpikingMambaForCausalLM(SpikingMambaConfig(**TINY, neurons=neurons, scan_backend="ref")).to(device)
    calibrate(ref, [{"input_ids": torch.randint(2, 20, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)}])
    set_sgc_lambda(ref, sgc_lambda)
    fast = copy.deepcopy(ref)
    fast.config.scan_backend = "triton"
    return ref, fast


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize(
    "out_neuron, sgc_lambda",
    [({"kind": "si_lif", "D": 4}, 0.0), ({"kind": "si_lif", "D": 2}, 0.4), ({"kind": "atmn", "T": 3}, 0.0)],
    ids=["si_lif", "si_lif-sgc", "atmn"],
)
def test_student_logits_and_gradients_triton_equal_ref(device, out_neuron, sgc_lambda):
    ref, fast = tiny_pair(device, out_neuron, sgc_lambda)
    assert fast.backbone.layers[0].mixer.fused_out_neuron(torch.device(device)) is not None  # the fused path runs
    ids = torch.randint(2, 20, (2, 11), generator=torch.Generator().manual_seed(4)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    out_ref = ref(ids, attention_mask=mask, labels=ids)
    out_fast = fast(ids, attention_mask=mask, labels=ids)
    assert_close("logits", out_fast.logits, out_ref.logits, (1e-4, 1e-4))
    out_ref.loss.backward()
    out_fast.loss.backward()
    params_fast = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        assert params_fast[name].grad is not None, name
        assert_close(f"grad {name}", params_fast[name].grad, p.grad, (2e-4, 2e-4))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_cached_generation_triton_equals_ref(device):
    """Prefill (scan with last state) then one-token steps (state-update kernel + fused neuron)."""
    ref, fast = tiny_pair(device, {"kind": "si_lif", "D": 4}, 0.0)
    prompt = torch.randint(2, 20, (2, 6), generator=torch.Generator().manual_seed(5)).to(device)
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, use_cache=True)
    with torch.no_grad():
        gen_ref = ref.eval().generate(prompt, **kwargs)
        gen_fast = fast.eval().generate(prompt, **kwargs)
    assert torch.equal(gen_fast.sequences, gen_ref.sequences)
    assert_close("step scores", torch.stack(gen_fast.scores), torch.stack(gen_ref.scores), (1e-4, 1e-4))
