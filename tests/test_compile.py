"""Every public op (tests/op_cases.py) under torch.compile: torch._dynamo.explain finds 0 graph breaks on the
torch path and on the Triton path (the interpreter on CPU), the compiled forward+backward runs the kernels
and matches eager; and torch.library.opcheck passes for every custom op of rmsnorm / rotary / swiglu /
cross_entropy / newton_schulz."""

from __future__ import annotations

import pytest
import torch

from op_cases import CASE_IDS, CASES
from xkernels import force_backend
from xkernels.dispatch import interpreting, triton_available
from xkernels.testing import count_launches

BACKENDS = ["torch", "triton"]


def _skip_without_kernels(backend):
    if backend == "triton" and not (triton_available() and (torch.cuda.is_available() or interpreting())):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_explain_no_graph_breaks(case, backend):
    _skip_without_kernels(backend)
    torch.manual_seed(0)
    inputs = case.build("cpu", backend)
    torch._dynamo.reset()
    with force_backend(backend), count_launches() as launches:
        explained = torch._dynamo.explain(case.fn)(*inputs)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count >= 1
    ran = {k for k in case.kernels if launches[k] > 0}
    if backend == "triton":  # the compiled graph really launched the kernels (forward ones here)
        assert ran, f"no kernel of {case.kernels} launched: {dict(launches)}"
    else:
        assert not launches, dict(launches)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.backward], ids=[c.name for c in CASES if c.backward])
def test_compiled_forward_backward_matches_eager(case, backend):
    """fullgraph compile (aot_eager: the autograd graph is traced too) of forward + backward."""
    _skip_without_kernels(backend)
    torch.manual_seed(0)
    inputs = case.build("cpu", backend)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    torch._dynamo.reset()
    with force_backend(backend):
        expected = case.fn(*inputs)
        expected_grads = torch.autograd.grad(expected, leaves)
        with count_launches() as launches:
            out = torch.compile(case.fn, fullgraph=True, backend="aot_eager")(*inputs)
            grads = torch.autograd.grad(out, leaves)
    if backend == "triton":
        for k in case.kernels:
            assert launches[k] > 0, f"{k} did not launch under torch.compile: {dict(launches)}"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _opcheck_cases():
    """(custom op, args) for every custom op owned by the kernel modules; small inputs."""
    import importlib

    # import_module: xkernels.swiglu / xkernels.newton_schulz are also the names of public functions
    ce, ns, rn, ro, sw = (
        importlib.import_module(f"xkernels.{m}") for m in ("cross_entropy", "newton_schulz", "rmsnorm", "rotary", "swiglu")
    )

    torch.manual_seed(0)
    x = torch.randn(5, 32, requires_grad=True)
    r = torch.randn(5, 32, requires_grad=True)
    w = (torch.rand(32) + 0.5).requires_grad_()
    _, _, rstd = rn._rmsnorm_fwd(x.detach(), None, w.detach(), 1e-5)
    cos, sin = ro.rotary_cos_sin(8, 16)
    q = torch.randn(2, 4, 3, 16, requires_grad=True)
    k = torch.randn(2, 4, 1, 16, requires_grad=True)
    pos = torch.tensor([[0, 3, 5, 7], [1, 2, 6, 4]])
    g, u = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)
    gu = torch.randn(6, 80, requires_grad=True)
    h, wv = torch.randn(6, 16, requires_grad=True), (torch.randn(50, 16) / 4).requires_grad_()
    t = torch.tensor([3, 0, -100, 49, 7, 21])
    bv, logits = torch.randn(50, requires_grad=True), torch.randn(6, 50, requires_grad=True)
    cw = torch.rand(50) + 0.5  # class weights
    ce_opts = (1.0, -100, 0.0, 0.0, 0.0)  # logit scale, ignore_index, label smoothing, soft cap (0: none), z-loss
    ce_all = (0.5, -100, 0.1, 3.0, 1e-2)
    X = torch.randn(2, 12, 20) / 20
    coeffs = [[3.4445] * 2, [-4.7750] * 2, [2.0315] * 2]
    d = lambda t: t.detach()  # noqa: E731
    return [
        ("rms_norm_fwd", rn._rms_norm_fwd_op, (x, None, w, 1e-5, None)),
        ("rms_norm_fwd_residual", rn._rms_norm_fwd_op, (x, r, w, 1e-5, None)),
        ("rms_norm_fwd_scale", rn._rms_norm_fwd_op, (x, r, w, 1e-5, 0.5)),
        ("rms_norm_bwd", rn._rms_norm_bwd_op, (torch.randn(5, 32), d(x), d(w), rstd, torch.randn(5, 32), 0.5)),
        ("rotary", ro._rotary_op, (q, k, cos, sin, pos, False)),
        ("swiglu_fwd", sw._swiglu_fwd_op, (g, u)),
        ("swiglu_bwd", sw._swiglu_bwd_op, (torch.randn(6, 40), d(g), d(u))),
        ("swiglu_fused_fwd", sw._swiglu_fused_fwd_op, (gu,)),
        ("swiglu_fused_bwd", sw._swiglu_fused_bwd_op, (torch.randn(6, 40), d(gu))),
        ("lce_fwd_mean", ce._lce_fwd_op, (h, wv, None, t, None, *ce_opts, "mean", 4, True, True, False, True)),
        ("lce_fwd_none", ce._lce_fwd_op, (h, wv, None, t, None, *ce_opts, "none", 4, True, True, False, True)),
        ("lce_fwd_options", ce._lce_fwd_op, (h, wv, bv, t, cw, *ce_all, "sum", 4, True, True, True, True)),
        ("lce_bwd_none", ce._lce_bwd_none_op, (d(h), d(wv), d(bv), t, cw, torch.randn(6), *ce_all, 4, True, True, True,
                                               True)),
        ("ce_fwd", ce._ce_fwd_op, (logits, t, None, *ce_opts, "mean", True, True)),
        ("ce_fwd_options", ce._ce_fwd_op, (logits, t, cw, *ce_all, "mean", True, True)),
        ("ce_bwd_none", ce._ce_bwd_none_op, (d(logits), t, cw, torch.randn(6), *ce_all, True)),
        ("newton_schulz_batched", ns._ns_batched_op, (X, *coeffs)),
    ]


_OPCHECK_IDS = ["rms_norm_fwd", "rms_norm_fwd_residual", "rms_norm_fwd_scale", "rms_norm_bwd", "rotary",
                "swiglu_fwd", "swiglu_bwd", "swiglu_fused_fwd", "swiglu_fused_bwd", "lce_fwd_mean",
                "lce_fwd_none", "lce_fwd_options", "lce_bwd_none", "ce_fwd", "ce_fwd_options", "ce_bwd_none",
                "newton_schulz_batched"]  # fmt: skip


@pytest.mark.parametrize("name", _OPCHECK_IDS)
def test_opcheck_custom_ops(name):
    if not (triton_available() and (torch.cuda.is_available() or interpreting())):
        pytest.skip("the custom ops launch Triton kernels: CUDA or TRITON_INTERPRET=1")
    cases = {n: (op, args) for n, op, args in _opcheck_cases()}
    op, args = cases[name]
    torch.library.opcheck(op, args)
