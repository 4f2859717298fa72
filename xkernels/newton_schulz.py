"""Batched Newton–Schulz orthogonalisation (Muon's inner loop): Triton kernels + PyTorch reference.

For a matrix ``G`` (or a batch of them) Newton–Schulz approximates the orthogonal polar factor
``U Vᵀ`` of ``G = U S Vᵀ`` with odd matrix polynomials, using only matrix products.  With ``X`` the
``k × N`` matrix (``k = min(m, n)``; the kernels transpose tall inputs first, the reference runs the same
iteration in the ``XᵀX`` form, so the Gram matrix is always the small ``k × k`` one), normalised
``X₀ = G / (s·‖G‖_F + eps)`` so every singular value is ≤ 1, each step is

    A = X Xᵀ                  (k × k, symmetric)
    B = b·A + c·A A           (symmetric: A A = A Aᵀ because A is)
    X ← a·X + B X             (= a·X + b·(X Xᵀ)X + c·(X Xᵀ)²X, the quintic p(σ) = aσ + bσ³ + cσ⁵ on each σ)

and the result is transposed back.  Coefficient sets:

* ``"muon"`` -- the quintic (3.4445, −4.7750, 2.0315) used at every step, from Keller Jordan's Muon
  (https://kellerjordan.github.io/posts/muon/, also ``torch.optim.Muon`` and Moonlight).  It maximises the
  slope at zero rather than converging to 1: after 5 steps singular values land in about [0.7, 1.2].
* ``"polar_express"`` -- the 5-step schedule of the Polar Express paper (Amsel, Persson, Musco, Gower,
  arXiv 2505.16932), numbers as used by KellerJordan/modded-nanogpt's ``train_gpt.py`` (the paper's
  generator for 5 iterations, cushion 2 and a 2% safety factor, which also divides the normaliser:
  ``s = 1.02``).  Steps beyond the schedule repeat its last polynomial.
* a sequence of ``(a, b, c)`` triples: one triple (used at every step, like ``torch.optim.Muon``'s
  ``ns_coefficients``) or exactly one per step.

Kernels (one program per output tile, the batch on grid axis 1, 64-bit batch offsets):

* :func:`_ns_gram_kernel` computes ``OUT = α·Y Yᵀ + β·C`` on the lower triangle of tiles only (a lookup
  table maps program id → tile (i, j), i ≥ j) and stores the lower triangle of what it computed twice, at
  (r, c) and mirrored at (c, r): ``t(t+1)/2`` of ``t²`` tiles, about half the FLOPs of a plain bmm, and
  the result is exactly symmetric (the diagonal tiles' upper halves are mirrored too).  It serves both ``A = X Xᵀ`` (α = 1, β = 0) and the
  polynomial ``B = c·A A + b·A`` (Y = C = A, valid because A is symmetric).
* :func:`_ns_update_kernel` computes ``OUT = a·X + B X``, a tiled GEMM with the axpy fused in the epilogue.

Operands are loaded in the compute dtype (bf16 by default: tensor cores on GPU) and accumulated in fp32;
A, B and X are rounded to the compute dtype between the three products exactly like the reference, so
kernel and reference agree to accumulation order.  Under the Triton interpreter bf16 ``tl.dot`` is broken,
so operands are upcast to fp32 there (a constexpr flag); fp32 compute uses IEEE (not TF32) dots.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from xkernels._checks import check_float, check_nonempty
from xkernels.dispatch import interpreting, launch_on, triton_available, use_triton

Coefficients = str | Sequence[Sequence[float]]

MUON_COEFFICIENTS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),)
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
COEFFICIENT_SETS = {"muon": MUON_COEFFICIENTS, "polar_express": POLAR_EXPRESS_COEFFICIENTS}
# Normaliser safety factor s in X0 = G / (s ||G||_F + eps): Polar Express's schedule assumes sigma_max <= 1/1.02.
_NORM_SAFETY = {"muon": 1.0, "polar_express": 1.02}
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def resolve_coefficients(
    coefficients: Coefficients, steps: int
) -> tuple[tuple[tuple[float, float, float], ...], float]:
    """``(per-step (a, b, c) list of length steps, normaliser safety factor)`` for a named set or a list.

    Raises ``ValueError`` for ``steps < 1``, an unknown name, a triple that is not three numbers or a
    user list whose length differs from ``steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(
                f"coefficients must be one of {sorted(COEFFICIENT_SETS)} or a list of (a, b, c), got {coefficients!r}"
            )
        table = COEFFICIENT_SETS[coefficients]
        return tuple(table[min(i, len(table) - 1)] for i in range(steps)), _NORM_SAFETY[coefficients]
    try:
        triples = tuple(tuple(float(v) for v in t) for t in coefficients)
    except TypeError as e:
        raise ValueError(f"coefficients must be a name or a sequence of (a, b, c) triples, got {coefficients!r}") from e
    if any(len(t) != 3 for t in triples):
        raise ValueError(f"every coefficient entry must be an (a, b, c) triple, got {coefficients!r}")
    if len(triples) == 1:  # one triple: used at every step (torch.optim.Muon's ns_coefficients)
        return triples * steps, 1.0
    if len(triples) != steps:
        raise ValueError(
            f"got {len(triples)} coefficient triples for steps={steps}; give one triple or exactly one per step"
        )
    return triples, 1.0


def _probe_cpu_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: where oneDNN runs bf16 GEMMs natively (and faster than fp32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# Probed once, at import, so the answer is a plain constant inside a ``torch.compile`` region: Dynamo ignores
# ``functools.cache`` and would trace the probe itself, and on CPUs where the first probe answers False the second
# one (not traceable on every build) split the graph of ``newton_schulz`` and ``Muon.step``.
_CPU_HAS_FAST_BF16: bool = _probe_cpu_fast_bf16()


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 (the recipe's, and ``torch.optim.Muon``'s) except on CPUs without native bf16 GEMMs.

    Measured on the 2-core Xeon (AMX + AVX512-BF16) with torch 2.13, NS step (bmm + 2 baddbmm):
    16×512×1536 batch 70 ms bf16 vs 253 ms fp32, 4×1536×1536 132 ms vs 556 ms.  Without those ISA
    extensions bf16 GEMMs are emulated and several times slower than fp32, so fp32 is used there.
    """
    if torch.device(device).type == "cpu" and not _CPU_HAS_FAST_BF16:
        return torch.float32
    return torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (CPU path, tests, benchmarks)
# ----------------------------------------------------------------------------------------------------


def _normalise(
    G: torch.Tensor, eps: float, safety: float, dtype: torch.dtype, orient: bool = True
) -> tuple[torch.Tensor, bool]:
    """``(X0, transposed)``: ``G / (safety·‖G‖_F + eps)`` per matrix as a contiguous batch in ``dtype`` (the norm
    in fp32 or better), and whether the matrices were transposed.  ``orient``: transpose tall matrices so the
    batch is ``(b, k, N)`` with ``k ≤ N`` (the kernels' layout); the reference takes either orientation, and
    on CPU a transposing copy costs more than the GEMMs gain (strided reads: ~4 ns per element, measured)."""
    acc = torch.float64 if dtype == torch.float64 or G.dtype == torch.float64 else torch.float32
    g = G if G.ndim == 3 else G.unsqueeze(0)
    transposed = orient and g.shape[-2] > g.shape[-1]
    if transposed:
        g = g.mT
    norm = torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True, dtype=acc)
    # one pass: divide in acc precision (the norm is acc, so type promotion lifts g) and round into X
    X = torch.empty(g.shape, dtype=dtype, device=g.device)
    torch.div(g, norm * safety + eps, out=X)
    return X, transposed


def _finish(X: torch.Tensor, transposed: bool, G: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    X = X.mT if transposed else X
    X = X if G.ndim == 3 else X.squeeze(0)
    return X.to(out_dtype).contiguous()


def newton_schulz_ref_batched(X: torch.Tensor, coeffs: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """The iteration on a normalised ``(b, m, n)`` batch, one bmm + two baddbmm per step, every product
    rounded to ``X.dtype``: ``A = X Xᵀ``, ``B = b·A + c·A A``, ``X ← a·X + B X`` when ``m ≤ n``; for tall
    batches the same iteration on ``Xᵀ`` without transposing: ``A = XᵀX``, ``X ← a·X + X B``."""
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in coeffs:
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X


def newton_schulz_ref(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "muon",
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`newton_schulz` (same arguments; float64 allowed for ``dtype`` and ``G``)."""
    coeffs, safety = resolve_coefficients(coefficients, steps)
    dtype = dtype or default_compute_dtype(G.device)
    with torch.no_grad():
        X, transposed = _normalise(G, eps, safety, dtype, orient=False)
        X = newton_schulz_ref_batched(X, coeffs)
    return _finish(X, transposed, G, G.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_step(acc, a_ptrs, a_mask, b_ptrs, b_mask, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """``acc + A·B`` for one K step of both kernels' tiled products: masked loads (0 outside the matrix),
        upcast to fp32 when ``UPCAST`` (the interpreter, whose bf16 ``tl.dot`` is broken)."""
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _ns_gram_kernel(
        Y,  # (batch, K, N) input rows, any strides
        C,  # (batch, K, K) added term (read only when HAS_C), any strides
        OUT,  # (batch, K, K) output, any strides; must not alias Y or C
        TILE_I,  # (n_tiles,) int32 row-tile index of each program, TILE_I >= TILE_J
        TILE_J,  # (n_tiles,) int32 column-tile index
        K,
        N,
        stride_yb,  # Y strides in elements: batch, row, column
        stride_yr,
        stride_yc,
        stride_cb,  # C strides in elements: batch, row, column
        stride_cr,
        stride_cc,
        stride_ob,  # OUT strides in elements: batch, row, column
        stride_or,
        stride_oc,
        alpha,
        beta,
        HAS_C: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,  # interpreter: bf16 tl.dot is broken there, compute in fp32
        PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no TF32), else "tf32" (ignored for 16-bit)
    ):
        """``OUT = α·Y Yᵀ + β·C`` for a symmetric ``C``; only tiles (i, j) with i ≥ j are computed, and each
        off-diagonal tile is also stored transposed at (j, i).  fp32 accumulation, one rounding at the store."""
        t = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        ti = tl.load(TILE_I + t)
        tj = tl.load(TILE_J + t)
        ri = ti * BLOCK + tl.arange(0, BLOCK)
        rj = tj * BLOCK + tl.arange(0, BLOCK)
        mi = ri < K
        mj = rj < K
        y = Y + batch * stride_yb
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mc = cols < N
            # Y_jᵀ is addressed directly as a (BLOCK_K, BLOCK) tile through the strides
            acc = _dot_step(
                acc,
                y + ri[:, None] * stride_yr + cols[None, :] * stride_yc, mi[:, None] & mc[None, :],
                y + rj[None, :] * stride_yr + cols[:, None] * stride_yc, mc[:, None] & mj[None, :],
                UPCAST, PRECISION,
            )  # fmt: skip
        out = acc * alpha
        mask = mi[:, None] & mj[None, :]
        if HAS_C:
            c = tl.load(C + batch * stride_cb + ri[:, None] * stride_cr + rj[None, :] * stride_cc, mask=mask, other=0.0)
            out += beta * c.to(tl.float32)
        out = out.to(OUT.dtype.element_ty)
        o = OUT + batch * stride_ob
        # Exact symmetry: only the lower triangle (row >= column) of what was computed is kept, stored at
        # (r, c) and mirrored at (c, r).  On an off-diagonal tile (i > j) that is the whole tile; on a
        # diagonal tile the strict upper half is the transpose of the lower half rather than its own
        # dot products (whose accumulation order may differ on tensor cores), so OUT == OUTᵀ bit for bit
        # -- the next product (A A = A Aᵀ) relies on it.  Two masked stores, no shuffle.
        keep = mask & (ri[:, None] >= rj[None, :])
        tl.store(o + ri[:, None] * stride_or + rj[None, :] * stride_oc, out, mask=keep)
        tl.store(o + rj[None, :] * stride_or + ri[:, None] * stride_oc, out, mask=keep)

    @triton.jit
    def _ns_update_kernel(
        B,  # (batch, K, K) polynomial matrix, any strides
        X,  # (batch, K, N) current iterate, any strides
        OUT,  # (batch, K, N) next iterate; must not alias X
        K,
        N,
        stride_bb,  # B strides in elements: batch, row, column
        stride_br,
        stride_bc,
        stride_xb,  # X strides in elements: batch, row, column
        stride_xr,
        stride_xc,
        stride_ob,  # OUT strides in elements: batch, row, column
        stride_or,
        stride_oc,
        a,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """``OUT = a·X + B X``: a tiled GEMM over the K (small) side with the axpy fused in the epilogue."""
        pid = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        n_col_tiles = tl.cdiv(N, BLOCK_N)
        rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < K
        mc = cols < N
        b_ptr = B + batch * stride_bb
        x_ptr = X + batch * stride_xb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mk = ks < K
            acc = _dot_step(
                acc,
                b_ptr + rows[:, None] * stride_br + ks[None, :] * stride_bc, mr[:, None] & mk[None, :],
                x_ptr + ks[:, None] * stride_xr + cols[None, :] * stride_xc, mk[:, None] & mc[None, :],
                UPCAST, PRECISION,
            )  # fmt: skip
        mask = mr[:, None] & mc[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
        out = acc + a * x.to(tl.float32)
        tl.store(
            OUT + batch * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
            out.to(OUT.dtype.element_ty),
            mask=mask,
        )


_MAX_GRID_Y = 65535


@functools.cache
def _tile_table(n_tiles: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column tile indices of the lower triangle (i ≥ j), row-major: the gram kernel's program map.
    A table instead of an in-kernel sqrt keeps the map exact for any size (it is n(n+1)/2 int32 pairs)."""
    # built on the device (no host-to-device copy: fine inside CUDA-graph capture)
    ii, jj = torch.tril_indices(n_tiles, n_tiles, dtype=torch.int32, device=device)
    return ii, jj


def _launch_config(k: int, n: int, dtype: torch.dtype) -> dict:
    """Tile sizes.  GPU: 128² Gram tiles / 128×128 update tiles with 64-deep K steps, 8 warps for 16-bit
    (the H100/A100 sweet spot of Triton's matmul tutorial); fp32 halves BLOCK_K to stay in shared memory.
    Interpreter: the smallest power of two ≥ 16 covering the matrix (fewer, larger numpy programs are faster)."""
    if interpreting():
        block = max(16, min(64, triton.next_power_of_2(k)))
        return dict(BLOCK=block, BLOCK_K=max(16, min(64, triton.next_power_of_2(n))), BLOCK_N=64, num_warps=4)
    wide = dtype != torch.float32
    block = 64 if k <= 64 else 128
    return dict(BLOCK=block, BLOCK_K=64 if wide else 32, BLOCK_N=128, num_warps=8 if block == 128 else 4)


def _gram(Y: torch.Tensor, out: torch.Tensor, alpha: float, C: torch.Tensor | None = None, beta: float = 0.0) -> None:
    """``out = alpha·Y Yᵀ + beta·C`` on the batch through :func:`_ns_gram_kernel`."""
    nb, k, n = Y.shape
    cfg = _launch_config(k, n, Y.dtype)
    n_tiles = triton.cdiv(k, cfg["BLOCK"])
    ti, tj = _tile_table(n_tiles, str(Y.device))
    c = C if C is not None else out  # never read when HAS_C is False
    precision = "ieee" if Y.dtype == torch.float32 else "tf32"
    with launch_on(Y):  # the launch goes to Y's GPU, not the current one
        _ns_gram_kernel[(ti.numel(), nb)](
            Y, c, out, ti, tj, k, n,
            *Y.stride(), *c.stride(), *out.stride(),
            float(alpha), float(beta),
            HAS_C=C is not None, BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], UPCAST=interpreting(),
            PRECISION=precision, num_warps=cfg["num_warps"],
        )  # fmt: skip


def _update(B: torch.Tensor, X: torch.Tensor, out: torch.Tensor, a: float) -> None:
    """``out = a·X + B X`` through :func:`_ns_update_kernel`."""
    nb, k, n = X.shape
    cfg = _launch_config(k, n, X.dtype)
    block_m, block_n = cfg["BLOCK"], cfg["BLOCK_N"]
    block_k = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(k)))
    grid = (triton.cdiv(k, block_m) * triton.cdiv(n, block_n), nb)
    precision = "ieee" if X.dtype == torch.float32 else "tf32"
    with launch_on(X):  # the launch goes to X's GPU, not the current one
        _ns_update_kernel[grid](
            B, X, out, k, n,
            *B.stride(), *X.stride(), *out.stride(),
            float(a),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=interpreting(), PRECISION=precision,
            num_warps=cfg["num_warps"],
        )  # fmt: skip


def newton_schulz_triton_batched(X: torch.Tensor, coeffs: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """Kernel version of :func:`newton_schulz_ref_batched` on a normalised ``(b, k, N)`` batch, ``k ≤ N``.
    Two ``(b, k, k)`` scratch matrices and one ping-pong copy of X; X itself is not modified."""
    nb, k, n = X.shape
    if k * n >= 2**31:
        raise ValueError(f"each matrix must have fewer than 2**31 elements, got {k}×{n}")
    if nb > _MAX_GRID_Y:  # the batch is grid axis 1, limited to 65535 programs on CUDA
        return torch.cat(
            [newton_schulz_triton_batched(X[s : s + _MAX_GRID_Y], coeffs) for s in range(0, nb, _MAX_GRID_Y)]
        )
    A = torch.empty((nb, k, k), dtype=X.dtype, device=X.device)
    B = torch.empty_like(A)
    cur, nxt = X, torch.empty_like(X)
    for i, (a, b, c) in enumerate(coeffs):
        _gram(cur, A, 1.0)
        _gram(A, B, c, C=A, beta=b)  # A A = A Aᵀ: A is symmetric
        _update(B, cur, nxt, a)
        cur, nxt = nxt, (torch.empty_like(X) if i == 0 else cur)  # never overwrite the caller's X
    return cur


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


# torch.compile: the kernel loop as one opaque custom op with a shape-only fake impl, so a compiled caller
# (newton_schulz, a Muon step) traces it without graph breaks; eager calls go through it too (the op's
# dispatch costs microseconds next to 3·steps GEMM launches).  The coefficients travel as three float lists.
_CUSTOM_OP = triton_available() and hasattr(torch.library, "custom_op")
if _CUSTOM_OP:

    @torch.library.custom_op(
        "xkernels::newton_schulz_batched",
        mutates_args=(),
        schema="(Tensor X, float[] a, float[] b, float[] c) -> Tensor",
    )
    def _ns_batched_op(X, a, b, c):
        """The iteration (kernels) on a normalised ``(b, k, N)`` batch, ``k ≤ N``; X is not modified."""
        out = newton_schulz_triton_batched(X, list(zip(a, b, c)))
        return out.clone() if out is X else out  # steps >= 1 never returns X itself; outputs may not alias

    @_ns_batched_op.register_fake
    def _(X, a, b, c):
        return torch.empty_like(X, memory_format=torch.contiguous_format)


def orthogonalize_batched(
    X: torch.Tensor, coeffs: Sequence[tuple[float, float, float]], *, use_kernel: bool | None = None
) -> torch.Tensor:
    """Run the iteration on an already normalised ``(b, m, n)`` batch (no validation): the Triton kernels
    (which need ``m ≤ n``: normalise with ``orient=True``) when ``use_kernel`` (default: what
    :func:`~xkernels.dispatch.use_triton` says), else the reference (either orientation).
    Used by :mod:`xkernels.optim.muon`, which stacks and normalises the matrices itself."""
    if use_kernel is None:
        use_kernel = use_triton(X) and X.dtype != torch.float64
    if use_kernel and X.shape[-2] > X.shape[-1]:
        raise ValueError(f"the kernels take (b, k, N) batches with k <= N, got {tuple(X.shape)}")
    with torch.no_grad():
        if not use_kernel:
            return newton_schulz_ref_batched(X, coeffs)
        if _CUSTOM_OP:
            a, b, c = ([float(t[i]) for t in coeffs] for i in range(3))
            return _ns_batched_op(X, a, b, c)
        return newton_schulz_triton_batched(X, coeffs)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "muon",
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate orthogonal polar factor of a matrix ``(m, n)`` or a batch ``(b, m, n)``.

    Args:
        G: fp32/fp16/bf16 (or float64: reference only) real tensor, 2-D or 3-D, non-empty; any strides.
        steps: Newton–Schulz iterations (≥ 1).
        coefficients: ``"muon"``, ``"polar_express"`` or a list of ``(a, b, c)`` (one triple for every
            step, or exactly ``steps`` triples); see the module docstring for the sources.
        eps: added to the Frobenius norm (times the set's safety factor) in the normaliser.
        dtype: compute dtype of the matrix products (fp32 accumulation inside the kernels).  ``None``:
            bf16, except fp32 on CPUs without native bf16 GEMMs (:func:`default_compute_dtype`).

    Returns:
        A tensor of G's shape and dtype.  Not differentiable (an optimizer primitive; runs under no_grad).
    """
    check_float("G", G, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if G.ndim not in (2, 3):
        raise ValueError(f"G must be a matrix (m, n) or a batch (b, m, n), got shape {tuple(G.shape)}")
    check_nonempty("G", G)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if dtype is not None and dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"dtype must be one of {_COMPUTE_DTYPES} or None, got {dtype}")
    coeffs, safety = resolve_coefficients(coefficients, steps)
    dtype = dtype or default_compute_dtype(G.device)
    use_kernel = use_triton(G) and dtype != torch.float64
    with torch.no_grad():
        X, transposed = _normalise(G, eps, safety, dtype, orient=use_kernel)
        X = orthogonalize_batched(X, coeffs, use_kernel=use_kernel)
    return _finish(X, transposed, G, G.dtype)
