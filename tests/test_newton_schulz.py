"""Newton–Schulz: Triton kernels (the interpreter on CPU) vs the batched reference, quality vs a float64 SVD,
coefficient sets and bad input."""

from __future__ import annotations

import pytest
import torch

from xkernels import force_backend, newton_schulz, newton_schulz_ref
from xkernels.dispatch import interpreting, triton_available
from xkernels.newton_schulz import (
    MUON_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    _normalise,
    newton_schulz_ref_batched,
    resolve_coefficients,
)

needs_kernels = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or interpreting()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)

# Kernel vs reference, same compute dtype.  fp32: same products, only the accumulation order differs.
# bf16: A, B and X are rounded to bf16 between products, as in the reference; with the interpreter's casts rounded
# to nearest even as on a GPU (tests/conftest.py), kernel and reference round the same values: measured <= 4.9e-5
# relative (Frobenius) over these shapes x 3 seeds (it was 3.3e-2 while the interpreter truncated).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _kernel(G: torch.Tensor, dtype: torch.dtype, coefficients="muon", steps=5) -> torch.Tensor:
    with force_backend("triton"):
        return newton_schulz(G, steps, coefficients, dtype=dtype)


# square, wide, tall; batch of 1 and many; odd sizes.  Interpreter cost grows with tiles: keep these few.
SHAPES = [(3, 5), (100, 37), (24, 24), (1, 20, 52), (6, 17, 33), (3, 40, 19)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(device, shape, dtype):
    if device == "cpu" and not interpreting():
        pytest.skip("CPU kernels need TRITON_INTERPRET=1")
    G = torch.randn(*shape, device=device)
    out = _kernel(G, dtype)
    ref = newton_schulz_ref(G, dtype=dtype)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert _rel(out, ref) < TOL[dtype]


@needs_kernels
def test_kernel_matches_reference_multi_tile_257x129(device):
    """Three 64-row tiles under the interpreter (six lower-triangle programs, three of them mirrored)."""
    G = torch.randn(257, 129, device=device)
    assert (
        _rel(_kernel(G, torch.float32, steps=2), newton_schulz_ref(G, steps=2, dtype=torch.float32))
        < TOL[torch.float32]
    )


@needs_kernels
def test_gram_kernel_is_symmetric_product(device):
    from xkernels.newton_schulz import _gram

    Y = torch.randn(2, 70, 30, device=device)  # 70 rows: two row tiles -> one mirrored off-diagonal tile
    out = torch.empty(2, 70, 70, device=device)
    _gram(Y, out, 1.0)
    torch.testing.assert_close(out, Y @ Y.mT, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, out.mT, atol=1e-6, rtol=0)
    B = torch.empty_like(out)
    _gram(out, B, 2.0, C=out, beta=-0.5)  # the polynomial: 2·A·A − 0.5·A
    torch.testing.assert_close(B, 2.0 * out @ out - 0.5 * out, atol=1e-3, rtol=1e-5)


@needs_kernels
def test_kernel_reads_strided_input(device):
    base = torch.randn(4, 30, 2 * 21, device=device)
    G = base[:, :, ::2]  # non-contiguous last dim
    with force_backend("triton"):
        torch.testing.assert_close(
            newton_schulz(G, dtype=torch.float32), newton_schulz(G.contiguous(), dtype=torch.float32)
        )
        # a transposed view takes the tall path
        torch.testing.assert_close(newton_schulz(G.mT, dtype=torch.float32), newton_schulz(G, dtype=torch.float32).mT)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_equals_per_matrix(backend):
    if backend == "triton" and not interpreting():
        pytest.skip("CPU kernels need TRITON_INTERPRET=1")
    G = torch.randn(5, 12, 28)
    with force_backend(backend):
        batched = newton_schulz(G, dtype=torch.float32)
        single = torch.stack([newton_schulz(g, dtype=torch.float32) for g in G])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)


def test_reference_uses_batched_products_in_compute_dtype():
    """The reference is the loop of the module docstring (float64 = exact arithmetic check)."""
    G = torch.randn(3, 9, 14, dtype=torch.float64)
    X = G / G.norm(dim=(-2, -1), keepdim=True)
    a, b, c = MUON_COEFFICIENTS[0]
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(newton_schulz_ref(G, dtype=torch.float64, eps=0.0), X)


def test_reference_tall_form_equals_transposed_wide_form():
    """Tall batches run ``A = XᵀX``, ``X ← aX + XB`` without a transposing copy: the same iteration on Xᵀ."""
    G = torch.randn(4, 30, 11, dtype=torch.float64)
    tall = newton_schulz_ref(G, dtype=torch.float64)
    wide = newton_schulz_ref(G.mT.contiguous(), dtype=torch.float64)
    torch.testing.assert_close(tall, wide.mT, atol=1e-12, rtol=0)


def _with_spectrum(m: int, n: int, low: float, high: float, dtype=torch.float64) -> torch.Tensor:
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=dtype))
    s = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), k, dtype=dtype)
    return U @ torch.diag(s) @ V.T


# (coefficients, singular-value band, bound on ||NS(G) - U Vᵀ||_F / ||U Vᵀ||_F), measured with float64 and
# bf16 compute on Gaussian 64x48 / 48x64 / 32x128: muon 0.210-0.228, polar_express 0.089-0.100.
# The "muon" quintic oscillates instead of converging: its iterates stay in about [0.68, 1.203] (measured).
QUALITY = {"muon": ((0.6, 1.21), 0.25), "polar_express": ((0.8, 1.2), 0.12)}


@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (32, 128)], ids=lambda s: "x".join(map(str, s)))
def test_quality_against_svd_polar_factor(shape, dtype, coefficients):
    G = torch.randn(*shape, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    with force_backend("torch"):
        out = newton_schulz(G if dtype == torch.float64 else G.float(), coefficients=coefficients, dtype=dtype).double()
    (low, high), bound = QUALITY[coefficients]
    sv = torch.linalg.svdvals(out)
    assert low <= sv.min().item() and sv.max().item() <= high, sv
    assert _rel(out, polar) < bound


def test_quality_spread_spectrum():
    """Singular values over two decades all land in the band after 5 "muon" steps.  (The band needs
    σ/‖G‖_F ≳ 1e-3: five steps amplify a small singular value by at most 3.4445⁵ ≈ 485.)"""
    G = _with_spectrum(80, 50, 1e-1, 10.0)
    with force_backend("torch"):
        sv = torch.linalg.svdvals(newton_schulz(G, dtype=torch.float64))
    (low, high), _ = QUALITY["muon"]
    assert low <= sv.min().item() and sv.max().item() <= high, sv


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_input_gives_zero_and_no_nan(backend):
    if backend == "triton" and not interpreting():
        pytest.skip("CPU kernels need TRITON_INTERPRET=1")
    with force_backend(backend):
        out = newton_schulz(torch.zeros(2, 6, 10), dtype=torch.float32)
    assert torch.equal(out, torch.zeros(2, 6, 10))


def test_cpu_reference_without_interpreter_is_taken():
    G = torch.randn(10, 7)
    with force_backend("torch"):
        torch.testing.assert_close(newton_schulz(G), newton_schulz_ref(G))


def test_coefficient_sets():
    coeffs, safety = resolve_coefficients("muon", 5)
    assert coeffs == MUON_COEFFICIENTS * 5 and safety == 1.0
    coeffs, safety = resolve_coefficients("polar_express", 7)
    assert coeffs[:5] == POLAR_EXPRESS_COEFFICIENTS and coeffs[5:] == (POLAR_EXPRESS_COEFFICIENTS[-1],) * 2
    assert safety == 1.02
    assert resolve_coefficients([(1.5, -0.5, 0.0)], 3)[0] == ((1.5, -0.5, 0.0),) * 3
    user = [(3.0, -3.0, 1.0), (2.0, -1.0, 0.0)]
    assert resolve_coefficients(user, 2)[0] == ((3.0, -3.0, 1.0), (2.0, -1.0, 0.0))


def test_user_coefficients_match_named_set():
    G = torch.randn(20, 30)
    with force_backend("torch"):
        named = newton_schulz(G, 3, "muon", dtype=torch.float32)
        listed = newton_schulz(G, 3, [MUON_COEFFICIENTS[0]] * 3, dtype=torch.float32)
    torch.testing.assert_close(named, listed, atol=0, rtol=0)


def test_normalise_transposes_tall_and_scales_to_unit_frobenius():
    X, transposed = _normalise(torch.randn(2, 9, 4) * 30, eps=0.0, safety=1.0, dtype=torch.float32)
    assert transposed and X.shape == (2, 4, 9)
    torch.testing.assert_close(X.norm(dim=(-2, -1)), torch.ones(2))
    assert newton_schulz_ref_batched(X, MUON_COEFFICIENTS).shape == (2, 4, 9)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(G=torch.randn(5)), ValueError, "matrix"),
        (dict(G=torch.randn(2, 2, 3, 3)), ValueError, "matrix"),
        (dict(G=torch.ones(3, 4, dtype=torch.int32)), TypeError, "G must have dtype"),
        (dict(G=torch.randn(3, 4, dtype=torch.complex64)), TypeError, "G must have dtype"),
        (dict(G=torch.randn(0, 4)), ValueError, "empty"),
        (dict(G=torch.randn(3, 4), steps=0), ValueError, "steps must be >= 1"),
        (dict(G=torch.randn(3, 4), coefficients="cubic"), ValueError, "coefficients must be one of"),
        (dict(G=torch.randn(3, 4), steps=3, coefficients=[(1, 2, 3), (1, 2, 3)]), ValueError, "2 coefficient triples"),
        (dict(G=torch.randn(3, 4), coefficients=[(1, 2)]), ValueError, r"\(a, b, c\) triple"),
        (dict(G=torch.randn(3, 4), eps=-1.0), ValueError, "eps"),
        (dict(G=torch.randn(3, 4), dtype=torch.int8), TypeError, "dtype"),
        (dict(G=[[1.0, 2.0]]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        newton_schulz(**kwargs)


@needs_kernels
@pytest.mark.parametrize("k", [70, 33, 129])
def test_gram_is_exactly_symmetric(device, k):
    """A = Y Yᵀ and B = c·A A + b·A come out bit-symmetric (the diagonal tiles mirror their lower half)."""
    from xkernels.newton_schulz import _gram

    Y = torch.randn(2, k, 45, device=device)
    A = torch.empty(2, k, k, device=device)
    _gram(Y, A, 1.0)
    assert torch.equal(A, A.mT)
    B = torch.empty_like(A)
    _gram(A, B, 2.0315, C=A, beta=-4.775)
    assert torch.equal(B, B.mT)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_newton_schulz_compiles_fullgraph(backend):
    """newton_schulz traces with torch.compile(fullgraph=True) on both paths (the kernel loop is the
    ``xkernels::newton_schulz_batched`` custom op with a fake impl) and matches eager."""
    if backend == "triton" and not interpreting():
        pytest.skip("CPU kernels need TRITON_INTERPRET=1")
    from xkernels.testing import count_launches

    def f(g):
        return newton_schulz(g, 3, dtype=torch.float32).float().sum()

    G = torch.randn(2, 20, 30)
    torch._dynamo.reset()
    with force_backend(backend):
        explained = torch._dynamo.explain(f)(G)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        with count_launches() as launches:
            out = torch.compile(f, fullgraph=True, backend="aot_eager")(G)
        eager = f(G)
    assert (launches["_ns_gram_kernel"] > 0) == (backend == "triton")
    torch.testing.assert_close(out, eager)


@needs_kernels
def test_newton_schulz_custom_op_opcheck():
    from xkernels.newton_schulz import _ns_batched_op

    X = torch.randn(2, 12, 20) / 20
    a, b, c = (list(v) for v in zip(*MUON_COEFFICIENTS * 2))
    torch.library.opcheck(_ns_batched_op, (X, a, b, c))


def test_cpu_bf16_probe_runs_outside_compiled_regions(monkeypatch):
    """The default compute dtype's CPU probe (AVX512-BF16 / AMX) is answered once, at import: with ``dtype`` left to
    the default, ``newton_schulz`` and ``Muon.step`` trace as one graph even where running the probe would split it.
    Here the probes are replaced by functions that break any graph they run in (as an untraceable probe does on some
    CPUs); the import-time constant keeps them out of the trace."""
    from xkernels.optim import Muon

    def splitting_probe():
        torch._dynamo.graph_break()
        return False

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, splitting_probe, raising=False)
    G = torch.randn(24, 40)
    torch._dynamo.reset()
    with force_backend("torch"):
        explained = torch._dynamo.explain(lambda g: newton_schulz(g, 2))(G)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        w = torch.nn.Parameter(torch.randn(24, 40))
        w.grad = torch.randn_like(w)
        opt = Muon([w], lr=0.02)
        opt.step()  # state created eagerly, then the traced step
        torch._dynamo.reset()
        explained = torch._dynamo.explain(opt.step)()
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
