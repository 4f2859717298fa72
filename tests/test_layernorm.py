"""LayerNorm: Triton kernels (interpreter on CPU, CUDA when present) and the PyTorch path against
``torch.nn.functional.layer_norm`` in float64, forward and backward (x, weight, bias)."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import xkernels
from xkernels import LayerNorm, force_backend, layer_norm, layer_norm_bwd_ref, layer_norm_ref
from xkernels.testing import count_launches

ln_mod = importlib.import_module("xkernels.layernorm")

# max|actual - float64 F.layer_norm| / max|reference| (gradients: relative to the size of the cancelling terms).
# fp32 ~1e-5; fp16/bf16 ~1 ulp of the output dtype at the largest magnitude (bf16 2^-7; measured <= 3.2e-3 on both
# paths: the interpreter rounds fp32 -> bf16 to nearest even as a GPU does).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def rel_err(actual, expected, scale=0.0):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(max(scale, 1e-12))).item()


def _case(device, dtype, shape, with_weight, with_bias, backend, x=None):
    hidden = shape[-1]
    if x is None:
        x = torch.randn(shape, device=device) * 2 + 0.5  # a non-zero mean: the centring matters
    x = x.to(dtype)
    w = (torch.rand(hidden, device=device) + 0.5).to(dtype) if with_weight else None
    b = torch.randn(hidden, device=device).to(dtype) if with_bias else None
    dy = torch.randn(shape, device=device).to(dtype)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with force_backend(backend), count_launches() as launches:
        y = layer_norm(*leaves)
        y.backward(dy)
    l64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y64 = F.layer_norm(l64[0], (hidden,), l64[1], l64[2], 1e-5)
    y64.backward(dy.double())
    return y, y64, leaves, l64, dy, launches


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "dtype, shape, with_weight, with_bias",
    [
        (torch.float32, (1, 64), True, True),
        (torch.float32, (67, 33), True, False),
        (torch.bfloat16, (2, 3, 96), True, True),
        (torch.bfloat16, (5, 1000), False, False),
        (torch.float16, (3, 40), True, True),
        (torch.float32, (4, 3), True, True),
    ],
    ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, tuple) else "x".join(map(str, v)),
)  # fmt: skip
def test_parity_forward_backward(device, backend, dtype, shape, with_weight, with_bias):
    y, y64, leaves, l64, dy, launches = _case(device, dtype, shape, with_weight, with_bias, backend)
    if backend == "triton":
        assert launches["_layernorm_fwd_kernel"] == 1 and launches["_layernorm_bwd_kernel"] == 1
    else:
        assert not launches
    assert y.dtype == dtype and y.shape == y64.shape
    assert rel_err(y, y64) <= TOL[dtype], rel_err(y, y64)
    rows = math.prod(shape[:-1])
    # dx cancels (hidden=1: exactly 0): measure against rstd * |dy * w|; dw / db are sums over rows
    x64 = l64[0].detach()
    rstd = torch.rsqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    w64 = l64[1].detach() if with_weight else 1.0
    dx_scale = (rstd * (dy.double() * w64).abs()).max().item()
    xhat = (x64 - x64.mean(-1, keepdim=True)) * rstd
    scales = [dx_scale, (dy.double() * xhat).abs().reshape(-1, shape[-1]).sum(0).max().item(),
              dy.double().abs().reshape(-1, shape[-1]).sum(0).max().item()]
    for name, got, want, scale in zip(("dx", "dweight", "dbias"), leaves, l64, scales):
        if got is None:
            continue
        assert got.grad.dtype == dtype, name
        tol = TOL[dtype] * (max(1.0, math.sqrt(rows / 64)) if name != "dx" else 1.0)
        err = rel_err(got.grad, want.grad, scale)
        assert err <= tol, f"{name}: {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("with_weight, with_bias", [(True, True), (False, True)])
def test_chunked_path_ragged(device, monkeypatch, with_weight, with_bias):
    """Long rows (several chunks, a partial last one) through the three-pass forward / two-pass backward."""
    monkeypatch.setattr(ln_mod, "_launch_config", lambda n: xkernels.rmsnorm._Launch(32, False, 4))
    monkeypatch.setattr(ln_mod, "_bwd_launch_config", lambda n, schedule=None: (xkernels.rmsnorm._Launch(32, False, 4), 2))
    y, y64, leaves, l64, _, launches = _case(device, torch.float32, (5, 100), with_weight, with_bias, "triton")
    assert launches["_layernorm_bwd_kernel"] == 1
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, l64):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_hidden_16384_real_chunked_config(device):
    assert not ln_mod._launch_config(16384).one_block
    y, y64, leaves, l64, _, _ = _case(device, torch.bfloat16, (2, 16384), True, True, "triton")
    assert rel_err(y, y64) <= TOL[torch.bfloat16]
    assert rel_err(leaves[2].grad, l64[2].grad) <= TOL[torch.bfloat16]


def test_bwd_ref_matches_autograd():
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 24, dtype=torch.float64)
    layer_norm_ref(x, w, b).backward(dy)
    for got, want in zip(layer_norm_bwd_ref(dy, x.detach(), w.detach()), (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want)


def test_strided_and_non_contiguous(device):
    base = torch.randn(6, 200, device=device)
    x = base[:, 20:120]  # row stride 200: read in place
    xt = torch.randn(100, 6, device=device).t()  # last dim strided: copied
    w, b = torch.rand(100, device=device) + 0.5, torch.randn(100, device=device)
    with force_backend("triton"):
        for inp in (x, xt):
            torch.testing.assert_close(layer_norm(inp, w, b), F.layer_norm(inp, (100,), w, b), rtol=1e-5, atol=1e-5)


def test_module_matches_torch_layernorm(device):
    ours = LayerNorm(48, eps=1e-6).to(device)
    ref = torch.nn.LayerNorm(48, eps=1e-6).to(device)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 48, device=device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert LayerNorm(8, bias=False).bias is None and not list(LayerNorm(8, elementwise_affine=False).parameters())
    xb = x.to(torch.bfloat16).requires_grad_()
    yb = ours(xb)  # fp32 parameters, bf16 activations: cast, gradients reach the fp32 parameters
    yb.float().sum().backward()
    assert yb.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32 and ours.bias.grad is not None
    assert "(48,), eps=1e-06" in repr(ours)


def test_compile_fullgraph_and_opcheck(device):
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x = torch.randn(4, 32, device=device, requires_grad=True)
    w = (torch.rand(32, device=device) + 0.5).requires_grad_()
    b = torch.randn(32, device=device, requires_grad=True)
    c = torch.randn(4, 32, device=device)

    def f(x, w, b):
        return (layer_norm(x, w, b) * c).sum() + (layer_norm(x, None, None) * c).sum()

    torch._dynamo.reset()
    with force_backend("triton"):
        out = torch.compile(f, fullgraph=True, backend=recording_backend)(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b))
    with force_backend("torch"):
        expected = f(x, w, b)
        expected_grads = torch.autograd.grad(expected, (x, w, b))
    assert len(graphs) == 1 and graphs[0].count("xkernels.layer_norm_fwd") == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    xs = torch.randn(3, 16, requires_grad=True)
    ws, bs = (torch.rand(16) + 0.5).requires_grad_(), torch.randn(16, requires_grad=True)
    _, mean, rstd = ln_mod._layernorm_fwd(xs.detach(), ws.detach(), bs.detach(), 1e-5)
    torch.library.opcheck(ln_mod._layer_norm_fwd_op, (xs, ws, bs, 1e-5))
    torch.library.opcheck(ln_mod._layer_norm_fwd_op, (xs, None, None, 1e-5))
    torch.library.opcheck(ln_mod._layer_norm_bwd_op, (torch.randn(3, 16), xs.detach(), ws.detach(), mean, rstd, True))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 8), torch.ones(7), None), ValueError, r"weight must have shape \(8,\)"),
        (lambda: (torch.randn(2, 8), None, torch.ones(8, dtype=torch.float16)), TypeError, "bias dtype float16"),
        (lambda: (torch.randn(2, 8), torch.ones(8, device="meta"), None), ValueError, "weight is on meta"),
        (lambda: (torch.ones(2, 8, dtype=torch.int32), None, None), TypeError, "x must have dtype"),
        (lambda: (torch.randn(0, 8), None, None), ValueError, "x is empty"),
        (lambda: ([[1.0]], None, None), TypeError, "x must be a torch.Tensor"),
    ],
    ids=["weight_shape", "bias_dtype", "weight_device", "int_x", "empty", "not_tensor"],
)
def test_bad_input(make, exc, match):
    x, w, b = make()
    with pytest.raises(exc, match=match):
        layer_norm(x, w, b)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        layer_norm(torch.randn(2, 8), eps=0.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm((4, 8))


def test_public_names():
    for name in ("layer_norm", "LayerNorm", "layer_norm_ref", "layer_norm_bwd_ref"):
        assert name in xkernels.__all__ and hasattr(xkernels, name)
