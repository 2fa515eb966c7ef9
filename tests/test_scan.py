"""Selective scan: the fast reference vs a naive per-step loop (forward and backward), dispatch errors.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_scan.py -q
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from spiking import scan as scan_module
from spiking.kernels import selective_scan, selective_scan_ref, selective_state_update_ref


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """The textbook recurrence, one step at a time (mamba-ssm's selective_scan_ref, written plainly)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    if B.dim() == 4:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    h = torch.zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        if B.dim() == 2:
            Bt, Ct = B[None], C[None]  # [1, D, N]
        elif B.dim() == 3:
            Bt, Ct = B[:, None, :, t], C[:, None, :, t]  # [B, 1, N]
        else:
            Bt, Ct = B[..., t], C[..., t]  # [B, D, N]
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bt * u[:, :, t, None]
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(bc_shape: str, batch=2, dim=6, length=9, state=4, groups=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = {"const": (dim, state), "variable": (batch, state, length), "grouped": (batch, groups, state, length)}[bc_shape]
    tensors = {
        "u": r(batch, dim, length),
        "delta": 0.5 * r(batch, dim, length),
        "A": -torch.rand(dim, state, generator=gen) - 0.2,
        "B": r(*bc),
        "C": r(*bc),
        "D": r(dim),
        "z": r(batch, dim, length),
        "delta_bias": 0.1 * r(dim),
    }
    for t in tensors.values():
        t.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("bc_shape", ["variable", "const", "grouped"])
@pytest.mark.parametrize("with_extras", [True, False])
def test_ref_matches_naive_loop_forward_backward(bc_shape, with_extras):
    x = make_inputs(bc_shape)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True) if with_extras else {}
    out, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True, **kw)
    out_naive, last_naive = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw)
    print("max |out - naive|", (out - out_naive).abs().max().item())
    torch.testing.assert_close(out, out_naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_naive, atol=1e-5, rtol=1e-5)

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    names = [n for n in x if with_extras or n in ("u", "delta", "A", "B", "C")]
    grads = torch.autograd.grad((out * weights).sum() + last.sum(), [x[n] for n in names])
    grads_naive = torch.autograd.grad((out_naive * weights).sum() + last_naive.sum(), [x[n] for n in names])
    for name, g, g_naive in zip(names, grads, grads_naive):
        print(name, "max |grad - naive|", (g - g_naive).abs().max().item())
        torch.testing.assert_close(g, g_naive, atol=1e-4, rtol=1e-4, msg=f"grad of {name}")


def test_initial_state_continues_the_scan():
    """Scanning [0, t) then [t, L) from the cached state equals one scan over [0, L), grads included."""
    x = make_inputs("variable", length=10)
    args = lambda s: [x["u"][..., s], x["delta"][..., s], x["A"], x["B"][..., s], x["C"][..., s]]  # noqa: E731
    kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
    full, last = selective_scan_ref(*args(slice(None)), z=x["z"], return_last_state=True, **kw)
    first, state = selective_scan_ref(*args(slice(0, 4)), z=x["z"][..., :4], return_last_state=True, **kw)
    second, last2 = selective_scan_ref(
        *args(slice(4, None)), z=x["z"][..., 4:], return_last_state=True, initial_state=state, **kw
    )
    torch.testing.assert_close(torch.cat([first, second], -1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last2, last, atol=1e-5, rtol=1e-5)
    g_full = torch.autograd.grad(full.sum() + last.sum(), x["delta"])[0]
    g_split = torch.autograd.grad(first.sum() + second.sum() + last2.sum(), x["delta"])[0]
    torch.testing.assert_close(g_split, g_full, atol=1e-4, rtol=1e-4)


def test_state_update_equals_scan_step_by_step():
    x = make_inputs("variable", length=5)
    with torch.no_grad():
        out = selective_scan_ref(
            x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
            delta_softplus=True,
        )
        state = torch.zeros(2, 6, 4)
        steps = [
            selective_state_update_ref(
                state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
                z=x["z"][..., t], dt_bias=x["delta_bias"], dt_softplus=True,
            )
            for t in range(5)
        ]
    torch.testing.assert_close(torch.stack(steps, -1), out, atol=1e-5, rtol=1e-5)


def test_bf16_input_returns_bf16_computed_in_fp32():
    x = make_inputs("variable")
    with torch.no_grad():
        out16 = selective_scan_ref(x["u"].bfloat16(), x["delta"], x["A"], x["B"], x["C"], D=x["D"])
        out32 = selective_scan_ref(x["u"].bfloat16().float(), x["delta"], x["A"], x["B"], x["C"], D=x["D"])
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=2e-2, rtol=2e-2)


def test_dispatch_ref_on_cpu_logs_once(caplog):
    x = make_inputs("variable")
    scan_module._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger=scan_module.__name__), torch.no_grad():
        a = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="ref")
        b = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="ref")
        ref = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"])
    torch.testing.assert_close(a, ref, atol=0, rtol=0)
    torch.testing.assert_close(b, ref, atol=0, rtol=0)
    messages = [r.getMessage() for r in caplog.records if "selective scan backend" in r.getMessage()]
    assert messages == ["selective scan backend: ref (requested 'ref')"]


def test_dispatch_auto_on_cpu_is_the_cpu_kernel_or_a_logged_ref(caplog):
    """auto on CPU: the C++ scan when it builds; when it cannot, the ref, and the reason is logged."""
    from spiking import cpu_kernels

    scan_module._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger=scan_module.__name__):
        chosen = scan_module.resolve_backend("auto", torch.device("cpu"))
    error = cpu_kernels.load_extension()
    assert chosen == ("cpu" if error is None else "ref")
    messages = [r.getMessage() for r in caplog.records]
    assert f"selective scan backend: {chosen} (requested 'auto')" in messages
    if error is not None:
        assert any(error in m for m in messages)


def test_dispatch_errors():
    x = make_inputs("variable")
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        selective_scan(*args, backend="mamba_ssm")  # CPU tensors (and no mamba-ssm here)
    with pytest.raises(ValueError, match="scan_backend"):
        selective_scan(*args, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        scan_module.resolve_backend("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="complex"):
        selective_scan_ref(x["u"], x["delta"], torch.complex(x["A"], x["A"]), x["B"], x["C"])


def test_half_installed_mamba_ssm_is_absent_here():
    """This machine has no CUDA build of mamba-ssm: the guard must report it absent, never pick it."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert not scan_module.MAMBA_SSM_AVAILABLE
    assert scan_module.resolve_backend("auto", torch.device("cpu")) in ("cpu", "ref")
