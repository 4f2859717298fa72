"""FP8 quantisation: fused amax + scale + saturating cast in Triton, a fused cast-transpose, and the reference.

Math (every granularity, every backend)::

    amax = max |x| over the scaling group          (a group holding inf/NaN has amax = NaN)
    s    = max(amax, AMAX_EPS) / fp8_max            (fp32, IEEE division; the dequantisation scale)
    r    = 1 / s                                    (fp32, IEEE division, ONCE per group)
    q    = fp8_rne(clamp(x * r, -fp8_max, fp8_max)) (one multiply per element, round to nearest even, saturating)
    q    = NaN where x is inf/NaN or s is NaN      (non-finite input is reported, never made finite)

Why ``x * (1/s)`` and not ``x / s``: it is torchao's convention (its float8 casts multiply by the scale
``fp8_max / amax``) and the cheap one on a GPU -- one correctly rounded divide per group (``div.rn.f32``, a
~20-instruction sequence) instead of one per element, and no division in the hot loop, which is what made
the cast-transpose kernel run out of registers. Both divides are IEEE (``tl.div_rn`` lowers to ``div.rn.f32`` on
Triton 3.6 and 3.9, unlike ``tl.fdiv(ieee_rounding=True)`` which 3.6 lowers to the approximate ``div.full.f32``),
and the reference below does the very same two fp32 operations, so codes and scales are bit-equal to it on every
backend. Why not power-of-two scales (exact multiplies): rounding ``s`` up to a power of two maps amax anywhere in
``(fp8_max/2, fp8_max]``, wasting up to one binade of E4M3's small range (and changing the documented
``s = amax / fp8_max`` the delayed-scaling history and checkpoints rely on). The price of the two-step multiplier:
``x * r`` carries two fp32 roundings (of ``r`` and of the product), so it can fall on the other side of an fp8
rounding boundary than the exact ``x / s``. Codes then differ from ``round_fp8(x / s)`` by exactly one fp8 step,
for inputs whose exact quotient lies within ~1 fp32 ulp of a tie between two fp8 values -- not "at most half an
fp32 ulp, far below the fp8 step" as this note used to say. Measured (E4M3, N(0, 1) bf16 inputs, 4M values,
exact quotient in float64): 0.08-0.12 % of codes with row and 1x128 scales (6 seeds); with a tensor scale 0 % for
5 seeds and 0.59 % for one (it depends on the single amax). The error is one fp8 step at a near-tie, i.e. within
the fp8 rounding error itself, and Triton and the reference agree bit for bit (both compute ``x * r``).

so ``x ≈ q * s``; the GEMM multiplies its accumulator by ``s`` directly. Groups (``formats.scale_shape``):
``tensor`` (one scale), ``row`` (one per row), ``block_1x128`` (per row, per 128 columns), ``block_128x128``.

Passes over ``x``: block granularities and a given scale (delayed scaling) quantise in ONE pass, the amax (and,
for delayed scaling, the amax reported back to the history) computed in the same kernel. A tensor or row scale
needs the whole tensor/row before the first element can be cast, so ``tensor``/``row`` current scaling runs an
amax kernel first (one extra read of ``x``) and then the cast kernel.

The cast-transpose (:func:`cast_transpose`) emits ``q`` and the quantised ``xᵀ`` (row-major, for the
weight-gradient GEMM) from the same tile loads: for ``tensor`` and ``block_128x128`` the codes of ``xᵀ`` are the
codes of ``x`` transposed; for ``row`` and ``block_1x128`` ``xᵀ`` is quantised along its own rows (columns of
``x``), whose scales come from the amax pre-pass (``row``) or from the 128-row tile itself (``block_1x128``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from xkernels._checks import check_float, check_nonempty, check_same_device, check_tensor
from xkernels.dispatch import interpreting, use_triton
from xkernels.fp8._device import on_device
from xkernels.fp8.formats import (
    AMAX_EPS,
    BLOCK,
    E4M3,
    E5M2,
    cdiv,
    check_granularity,
    fp8_format,
    scale_shape,
)

# --- reference ----------------------------------------------------------------------------------------------------


def _pad_to(x: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]), value=value)


def amax_ref(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """fp32 ``max |x|`` per scaling group of the 2-D ``x`` (shape ``scale_shape``); NaN for a group with inf/NaN."""
    m, k = x.shape
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.full_like(a, float("inf")))
    if granularity == "tensor":
        out = a.amax() if a.numel() else a.new_zeros(())
    elif granularity == "row":
        out = a.amax(dim=1, keepdim=True)
    elif granularity == "block_1x128":
        kb = cdiv(k, BLOCK)
        out = _pad_to(a, m, kb * BLOCK).view(m, kb, BLOCK).amax(dim=2)
    else:
        mb, kb = cdiv(m, BLOCK), cdiv(k, BLOCK)
        out = _pad_to(a, mb * BLOCK, kb * BLOCK).view(mb, BLOCK, kb, BLOCK).amax(dim=(1, 3))
    return torch.where(out == float("inf"), torch.full_like(out, float("nan")), out)


def scale_from_amax(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Dequantisation scale ``max(amax, AMAX_EPS) / fp8_max`` (fp32; NaN stays NaN)."""
    return amax.float().clamp(min=AMAX_EPS) / fp8_format(fp8_dtype).max


def expand_scale(scale: torch.Tensor, rows: int, cols: int, granularity: str) -> torch.Tensor:
    """Broadcast a scale tensor of ``granularity`` to the ``(rows, cols)`` elements it scales."""
    if granularity == "tensor":
        return scale.reshape(1, 1)
    if granularity == "row":
        return scale.reshape(rows, 1)
    if granularity == "block_1x128":
        return scale.repeat_interleave(BLOCK, dim=1)[:, :cols]
    return scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:rows, :cols]


def infer_granularity(rows: int, cols: int, scale: torch.Tensor) -> str | None:
    """The granularity whose scale shape ``scale`` has for a ``(rows, cols)`` matrix, or None.

    Where two granularities share a shape (e.g. ``row`` and ``block_1x128`` when ``cols <= 128``) they scale
    exactly the same elements, so either answer is right.
    """
    if scale.numel() == 1 and scale.dim() <= 2:
        return "tensor"
    shape = tuple(scale.shape)
    for g in ("row", "block_1x128", "block_128x128"):
        if shape == scale_shape(rows, cols, g):
            return g
    return None


def mn_major(s: torch.Tensor) -> torch.Tensor:
    """The same ``(M, Kb)`` scale values laid out M-major (strides ``(1, M)``: each K block's M scales contiguous).

    1x128 scales are written this way (as DeepGEMM and torchao keep them): the GEMM reads, per K-step, the scales
    of BM consecutive rows of one K block -- contiguous words instead of a ``4 * Kb``-byte-stride gather."""
    return _empty_mn_major(*s.shape, s.device).copy_(s)


def _empty_mn_major(rows: int, cols: int, device) -> torch.Tensor:
    """``(rows, cols)`` fp32 with strides ``(1, rows)`` (also when ``cols == 1``, where ``.contiguous()`` keeps
    whichever strides it finds)."""
    return torch.empty(cols, rows, device=device, dtype=torch.float32).t()


def reciprocal_scale(s: torch.Tensor) -> torch.Tensor:
    """``1 / s`` in fp32 with IEEE division: the per-group multiplier the kernels compute with ``tl.div_rn``."""
    s = s.float()
    return torch.div(torch.ones_like(s), s)


def _codes_ref(x: torch.Tensor, r: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """fp8 codes of ``x * r`` (``r`` the reciprocal scale, broadcast to x): saturating, NaN for inf/NaN."""
    fmax = fp8_format(fp8_dtype).max
    q = x.float() * r
    y = q.clamp(-fmax, fmax)
    bad = torch.isnan(q) | torch.isinf(x)
    return torch.where(bad, torch.full_like(y, float("nan")), y).to(fp8_dtype)


def quantize_ref(
    x: torch.Tensor, fp8_dtype: torch.dtype = E4M3, granularity: str = "tensor", scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantisation of a 2-D ``x`` (see the module docstring); returns ``(q, scale)``."""
    m, k = x.shape
    if scale is None:
        scale = scale_from_amax(amax_ref(x, granularity), fp8_dtype)
        if granularity == "block_1x128":
            scale = mn_major(scale)
    # The reciprocal is taken per group, then broadcast: exactly what the kernels compute.
    q = _codes_ref(x, expand_scale(reciprocal_scale(scale), m, k, granularity), fp8_dtype)
    return q, scale


def _pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    cols = cdiv(t.shape[1], multiple) * multiple
    if cols == t.shape[1]:
        return t.contiguous()
    out = torch.zeros(t.shape[0], cols, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def cast_transpose_ref(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = E4M3,
    granularity: str = "tensor",
    scale: torch.Tensor | None = None,
    pad_to: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference cast-transpose: ``(q, s, qt, st)`` with ``(q, s) = quantize(x)`` and ``(qt, st)`` quantised ``xᵀ``.

    ``qt`` is row-major ``(K, M)`` with its columns zero-padded to a multiple of ``pad_to`` (the contraction dim
    of the weight-gradient GEMM must be a multiple of 16). For ``tensor``/``block_128x128`` the codes of ``xᵀ``
    are those of ``x`` (``st = s``, resp. ``s.T``); for ``row``/``block_1x128`` ``xᵀ`` is quantised along its
    own rows (current scaling; a given ``scale`` applies to ``x`` only).
    """
    q, s = quantize_ref(x, fp8_dtype, granularity, scale)
    if granularity == "tensor":
        qt, st = q.t(), s
    elif granularity == "block_128x128":
        qt, st = q.t(), s.t().contiguous()
    else:
        qt, st = quantize_ref(x.t(), fp8_dtype, granularity)
    # Padded in fp8 directly (zeros are the fp8 zero code). Not through a uint8 view: torch 2.11's AOTAutograd
    # mis-handles the dtype view in a compiled backward (all-zero gradients in the FP8Linear compile test).
    qt = _pad_cols(qt, pad_to)
    return q, s, qt, st


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` for a 2-D fp8 ``q`` and a scale of any granularity (inferred from its shape)."""
    m, k = q.shape
    g = infer_granularity(m, k, scale)
    if g is None:
        raise ValueError(f"scale of shape {tuple(scale.shape)} matches no granularity of a {m}x{k} tensor")
    return (q.float() * expand_scale(scale.float(), m, k, g)).to(dtype)


# --- Triton kernels -------------------------------------------------------------------------------------------------


@triton.jit
def _finite_abs(x):
    """|x| with inf/NaN mapped to +inf, so that max() is well defined and flags the group."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, float("inf"))


@triton.jit
def _scale_of(amax, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """s = max(amax, EPS) / FP8_MAX with IEEE division (bit-equal to torch); NaN when amax flags inf/NaN.

    ``tl.div_rn``, not ``tl.fdiv(ieee_rounding=True)``: Triton 3.6 lowers the latter to div.full.f32.
    """
    s = tl.div_rn(tl.maximum(amax, EPS), tl.full(amax.shape, FP8_MAX, tl.float32))
    return tl.where(amax < float("inf"), s, float("nan"))


@triton.jit
def _recip(s):
    """1 / s with IEEE division (``div.rn.f32``), computed once per scaling group."""
    return tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def _round_to_grid(y, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Round |y| <= fp8_max to the nearest fp8 value (ties to even) in fp32 arithmetic.

    Only used under the interpreter, whose fp32->fp8 cast rounds 2-4% of values the wrong way: after this the
    cast sees exactly representable values. Adding and subtracting 1.5 * 2**23 * ulp rounds to a multiple of
    ``ulp = 2**(max(e, EMIN) - MBITS)`` with the FPU's round-to-nearest-even. On GPUs the hardware cvt rounds
    correctly and this is skipped.
    """
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)
    magic = ((e - MBITS + 150) << 23).to(tl.float32, bitcast=True) * 1.5
    r = (a + magic) - magic
    # Copy y's sign bit onto r with integer ops: `-r` is `0 - r` in Triton, which turns -0.0 into +0.0.
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _codes(x, r, FP8_MAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """fp32 values of the fp8 codes of x * r (r = 1/s, per group, broadcast): saturated at ±FP8_MAX, NaN where x
    is inf/NaN or s is NaN."""
    q = x * r
    y = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    if EXACT_ROUND:
        y = _round_to_grid(y, MBITS, EMIN)
    bad = (q != q) | (tl.abs(x) == float("inf"))
    return tl.where(bad, float("nan"), y)


@triton.jit
def _to_fp8(y, dtype: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """Cast fp32 code values to fp8; under the interpreter as raw bytes with NaN fixed up.

    The interpreter turns NaN into a finite fp8 code, so there (EXACT_ROUND) NaN is written as the byte 0x7F,
    a NaN in both E4M3FN and E5M2, and callers store through a uint8 view of the output. Triton 3.6's
    interpreter also drops the sign of -0.0 (a tiny negative value rounds to the code 0x00, torch gives 0x80),
    so the sign bit is copied from the fp32 value (idempotent for every other negative code).
    """
    if EXACT_ROUND:
        bits = y.to(dtype).to(tl.uint8, bitcast=True)
        bits = tl.where(y.to(tl.int32, bitcast=True) < 0, bits | 0x80, bits)
        return tl.where(y != y, 0x7F, bits).to(tl.uint8)
    else:
        return y.to(dtype)


@triton.jit
def _amax_kernel(
    x_ptr,  # (M, K), any strides
    row_ptr,  # (M, n_kb) fp32: max |x| of each row within each BK-column tile
    col_ptr,  # (K, n_mb) fp32: max |x| of each column within each BM-row tile
    M,
    K,
    stride_xm,
    stride_xk,
    n_kb,
    n_mb,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    """Partial amaxes of one (BM, BK) tile; the host reduces them (deterministic, no atomics).

    inf/NaN elements count as +inf, which the host turns into a NaN amax.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
    rmask = rows < M
    cmask = cols < K
    x = tl.load(
        x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
        mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    a = _finite_abs(x)
    if ROWS:
        tl.store(row_ptr + rows * n_kb + pid_k, tl.max(a, axis=1), mask=rmask)
    if COLS:
        tl.store(col_ptr + cols * n_mb + pid_m, tl.max(a, axis=0), mask=cmask)


@triton.jit
def _cast_kernel(
    x_ptr,  # (M, K) input, any strides
    y_ptr,  # (M, K) fp8 output, row stride stride_ym, unit column stride
    yt_ptr,  # (K, Mp) fp8 output of xᵀ (T_MODE != 0), row stride stride_ytk
    s_ptr,  # scales of y: read (MODE 0) or written (MODE 1, 2)
    st_ptr,  # scales of yt: read (T_MODE 2) or written (T_MODE 3)
    amax_ptr,  # (grid_m * grid_k,) fp32 per-program amax (WRITE_AMAX)
    M,
    K,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_ytk,
    s_sr,  # y's scale for element (r, c) is at (r // S_ROWS) * s_sr + (c // BK) * s_sc
    s_sc,
    st_sr,  # yt's scale for xᵀ element (c, r) is at (c // ST_ROWS) * st_sr + (r // BM) * st_sc
    st_sc,
    FP8_DTYPE: tl.constexpr,  # tl.float8e4nv or tl.float8e5
    FP8_MAX: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    EPS: tl.constexpr,
    MODE: tl.constexpr,  # 0 scale given, 1 scale per row of the tile (1x128), 2 one scale per tile (128x128)
    T_MODE: tl.constexpr,  # 0 no xᵀ, 1 xᵀ = codes of x, 2 xᵀ with given row scales, 3 xᵀ per tile column (1x128)
    S_ROWS: tl.constexpr,
    ST_ROWS: tl.constexpr,
    WRITE_AMAX: tl.constexpr,
    EXACT_ROUND: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    SUB: tl.constexpr,  # rows per slice: the tile is walked SUB rows at a time
    OFF64: tl.constexpr,  # 64-bit offsets inside the tile (a stride >= 2**31 / 128)
):
    """One (BM, BK) tile: amax (if computed here) -> scale -> saturating cast, for x and optionally xᵀ.

    With BM = BK = 128 a tile is exactly one 128x128 block, 128 1x128 row groups and 128 1x128 column
    groups, so every computed scale is complete inside the program. The tile is processed in (SUB, BK) slices
    so that a thread holds SUB*BK/threads elements at a time instead of the whole tile (a whole 128x128 fp32
    tile plus its codes took 209-255 registers on sm_90a: one program per SM). Scales that need every row of the
    tile first (the 128x128 block scale, the per-column scales of xᵀ) take a first pass over the slices that only
    reduces; the second pass re-reads the tile (32 KiB in bf16, an L2 hit) and casts.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # 64-bit arithmetic only for the program's base pointers (scalars); per-element offsets inside the tile are
    # 32-bit unless a stride is so large that 128 * stride overflows (OFF64): per-element 64-bit pointers for
    # x, y and yt cost ~2 registers per element each.
    row0 = pid_m.to(tl.int64) * BM
    col0 = pid_k.to(tl.int64) * BK
    x_base = x_ptr + row0 * stride_xm + col0 * stride_xk
    y_base = y_ptr + row0 * stride_ym + col0
    yt_base = yt_ptr + col0 * stride_ytk + row0
    lr = tl.arange(0, SUB)
    lc = tl.arange(0, BK)
    if OFF64:
        lr = lr.to(tl.int64)
        lc = lc.to(tl.int64)
    rows_left = M - row0
    cmask = lc < K - col0
    cols = col0 + lc

    if MODE == 2 or T_MODE == 3:  # pass 1: column maxima of the whole tile
        col_amax = tl.zeros((BK,), dtype=tl.float32)
        for i in range(0, BM // SUB):
            r = i * SUB + lr
            mask = (r < rows_left)[:, None] & cmask[None, :]
            x = tl.load(x_base + r[:, None] * stride_xm + lc[None, :] * stride_xk, mask=mask, other=0.0)
            col_amax = tl.maximum(col_amax, tl.max(_finite_abs(x.to(tl.float32)), axis=0))
        if MODE == 2:
            s_tile = _scale_of(tl.max(col_amax, axis=0), FP8_MAX, EPS)
            tl.store(s_ptr + pid_m * s_sr + pid_k * s_sc, s_tile)
            r_tile = tl.div_rn(1.0, s_tile)
        if T_MODE == 3:
            st_col = _scale_of(col_amax, FP8_MAX, EPS)
            tl.store(st_ptr + cols * st_sr + pid_m * st_sc, st_col, mask=cmask)
            rt_col = _recip(st_col)
    if T_MODE == 2:
        st_given = tl.load(st_ptr + (cols // ST_ROWS) * st_sr + pid_m * st_sc, mask=cmask, other=1.0)
        rt_col = _recip(st_given)

    row_amax = tl.zeros((SUB,), dtype=tl.float32)
    for i in range(0, BM // SUB):  # pass 2: cast
        r = i * SUB + lr
        rmask = r < rows_left
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_base + r[:, None] * stride_xm + lc[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if WRITE_AMAX:
            row_amax = tl.maximum(row_amax, tl.max(_finite_abs(x), axis=1))
        if MODE == 0:
            s = tl.load(s_ptr + ((row0 + r) // S_ROWS) * s_sr + pid_k * s_sc, mask=rmask, other=1.0)
            y = _codes(x, _recip(s)[:, None], FP8_MAX, MBITS, EMIN, EXACT_ROUND)
        elif MODE == 1:
            s_row = _scale_of(tl.max(_finite_abs(x), axis=1), FP8_MAX, EPS)
            tl.store(s_ptr + (row0 + r) * s_sr + pid_k * s_sc, s_row, mask=rmask)
            y = _codes(x, _recip(s_row)[:, None], FP8_MAX, MBITS, EMIN, EXACT_ROUND)
        else:
            y = _codes(x, r_tile, FP8_MAX, MBITS, EMIN, EXACT_ROUND)
        tl.store(y_base + r[:, None] * stride_ym + lc[None, :], _to_fp8(y, FP8_DTYPE, EXACT_ROUND), mask=mask)
        if T_MODE != 0:
            if T_MODE == 1:
                yt = y
            else:
                yt = _codes(x, rt_col[None, :], FP8_MAX, MBITS, EMIN, EXACT_ROUND)
            yt = tl.trans(_to_fp8(yt, FP8_DTYPE, EXACT_ROUND))  # (BK, SUB)
            tl.store(yt_base + lc[:, None] * stride_ytk + r[None, :], yt, mask=cmask[:, None] & rmask[None, :])

    if WRITE_AMAX:
        tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_k, tl.max(row_amax, axis=0))


# --- launchers ------------------------------------------------------------------------------------------------------

_TL_FP8 = {E4M3: tl.float8e4nv, E5M2: tl.float8e5}


@dataclass(frozen=True)
class CastLaunch:
    """Launch parameters of the cast kernel. BM = BK = BLOCK (a tile is one scaling block). Slices of SUB = 16
    rows with 4 warps (16 elements per thread at a time) keep every variant at <= 128 registers with no spills on
    sm_90a under Triton 3.6 and 3.9 (checked by tests/test_fp8_gemm.py::test_cast_kernel_registers), i.e. >= 4
    programs per SM; the whole-tile version took 209-255 (one program per SM). SUB = 32 measured 150-163
    registers for the transposing variants. num_stages = 2 lets the slice loop prefetch the next slice."""

    BM: int = BLOCK
    BK: int = BLOCK
    SUB: int = 16
    num_warps: int = 4
    num_stages: int = 2

    @property
    def constexprs(self) -> dict:
        return dict(BM=self.BM, BK=self.BK, SUB=self.SUB)


CAST_LAUNCH = CastLaunch()
_MODE = {"tensor": 0, "row": 0, "block_1x128": 1, "block_128x128": 2}


def _nan_for_inf(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a == float("inf"), torch.full_like(a, float("nan")), a)


def _amax_partials(x: torch.Tensor, rows: bool, cols: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    m, k = x.shape
    n_mb, n_kb = cdiv(m, BLOCK), cdiv(k, BLOCK)
    row_part = torch.empty(m, n_kb, device=x.device, dtype=torch.float32) if rows else None
    col_part = torch.empty(k, n_mb, device=x.device, dtype=torch.float32) if cols else None
    dummy = row_part if row_part is not None else col_part
    _amax_kernel[(n_mb, n_kb)](
        x,
        row_part if rows else dummy,
        col_part if cols else dummy,
        m,
        k,
        x.stride(0),
        x.stride(1),
        n_kb,
        n_mb,
        ROWS=rows,
        COLS=cols,
        BM=BLOCK,
        BK=BLOCK,
        num_warps=8,
    )
    return row_part, col_part


def _scale_strides(scale: torch.Tensor, granularity: str) -> tuple[int, int, int]:
    """(stride per row group, stride per 128-column block, rows per group) to address a scale in the kernel."""
    if granularity == "tensor":
        return 0, 0, 1
    if granularity == "row":
        return scale.stride(0), 0, 1
    if granularity == "block_1x128":
        return scale.stride(0), scale.stride(1), 1
    return scale.stride(0), scale.stride(1), BLOCK


def _cast_transpose_triton(x: torch.Tensor, *args):
    """:func:`_cast_transpose_launch` on ``x``'s device (see :func:`xkernels.fp8._device.on_device`)."""
    with on_device(x):
        return _cast_transpose_launch(x, *args)


def _cast_transpose_launch(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    granularity: str,
    scale: torch.Tensor | None,
    transpose: bool,
    pad_to: int,
    want_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the cast (and transpose) kernel; returns ``(q, s, qt, st, amax)`` (``qt``/``st``/``amax`` maybe None)."""
    fmt = fp8_format(fp8_dtype)
    m, k = x.shape
    dev = x.device
    n_mb, n_kb = cdiv(m, BLOCK), cdiv(k, BLOCK)
    amax = None

    # Scales that need the whole tensor/row/column come from the amax pre-pass.
    need_rows = scale is None and granularity in ("tensor", "row")
    need_cols = transpose and granularity == "row"
    row_part = col_part = None
    if need_rows or need_cols:
        row_part, col_part = _amax_partials(x, need_rows, need_cols)
    if need_rows:
        amax = _nan_for_inf(row_part.amax() if granularity == "tensor" else row_part.amax(dim=1, keepdim=True))
        scale = scale_from_amax(amax, fp8_dtype)

    mode = 0 if scale is not None else _MODE[granularity]
    if scale is None and granularity == "block_1x128":
        scale = _empty_mn_major(m, n_kb, dev)  # M-major (see mn_major)
    elif scale is None:
        scale = torch.empty(scale_shape(m, k, granularity), device=dev, dtype=torch.float32)
    s_sr, s_sc, s_rows = _scale_strides(scale, granularity)

    t_mode, st, qt = 0, None, None
    if transpose:
        mp = cdiv(m, pad_to) * pad_to
        qt = (torch.zeros if mp != m else torch.empty)(k, mp, device=dev, dtype=fp8_dtype)
        if granularity in ("tensor", "block_128x128"):
            t_mode = 1
            st = scale if granularity == "tensor" else None  # 128x128: scale.T once the kernel has written it
        elif granularity == "row":
            t_mode = 2
            st = scale_from_amax(_nan_for_inf(col_part.amax(dim=1, keepdim=True)), fp8_dtype)
        else:
            t_mode = 3
            st = _empty_mn_major(k, n_mb, dev)  # (K, ceil(M/128)), K-major: xᵀ's rows are the GEMM's M
    st_sr, st_sc, st_rows = _scale_strides(st, granularity) if st is not None else (0, 0, 1)

    want_kernel_amax = want_amax and amax is None
    partial = torch.empty(n_mb * n_kb, device=dev, dtype=torch.float32) if want_kernel_amax else None
    q = torch.empty(m, k, device=dev, dtype=fp8_dtype)
    exact = interpreting()
    # Under the interpreter the kernel writes raw bytes (see _to_fp8); the views share storage.
    q_arg = q.view(torch.uint8) if exact else q
    qt_arg = qt.view(torch.uint8) if exact and qt is not None else qt
    _cast_kernel[(n_mb, n_kb)](
        x,
        q_arg,
        qt_arg if qt_arg is not None else q_arg,
        scale,
        st if st is not None else scale,
        partial if partial is not None else scale,
        m,
        k,
        x.stride(0),
        x.stride(1),
        q.stride(0),
        qt.stride(0) if qt is not None else 0,
        s_sr,
        s_sc,
        st_sr,
        st_sc,
        FP8_DTYPE=_TL_FP8[fp8_dtype],
        FP8_MAX=fmt.max,
        MBITS=fmt.mantissa_bits,
        EMIN=fmt.min_exponent,
        EPS=AMAX_EPS,
        MODE=mode,
        T_MODE=t_mode,
        S_ROWS=s_rows,
        ST_ROWS=st_rows,
        WRITE_AMAX=want_kernel_amax,
        EXACT_ROUND=exact,
        OFF64=max(x.stride(0), x.stride(1), q.stride(0), qt.stride(0) if qt is not None else 0) * BLOCK >= 2**31,
        **CAST_LAUNCH.constexprs,
        num_warps=CAST_LAUNCH.num_warps,
        num_stages=CAST_LAUNCH.num_stages,
    )
    if transpose and granularity == "block_128x128":
        st = scale.t().contiguous()
    if want_amax:
        # NaN propagates through amax(), so one bad group makes the reported tensor amax NaN.
        amax = amax.amax() if amax is not None else _nan_for_inf(partial.amax())
    return q, scale, qt, st, amax


# --- custom op (torch.compile traces through it; the launch itself stays opaque) ------------------------------------


def _fresh(t: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """``t``, cloned if it shares storage with any of ``others`` (custom-op outputs may not alias inputs/outputs)."""
    for o in others:
        if o is not None and t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr():
            return t.clone()
    return t


@torch.library.custom_op("xkernels::fp8_cast_transpose", mutates_args=())
def _cast_transpose_op(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    granularity: str,
    scale: torch.Tensor | None,
    transpose: bool,
    pad_to: int,
    want_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton cast(-transpose) as one op: ``(q, s, qt, st, amax)``; what was not asked for is an empty tensor."""
    q, s, qt, st, amax = _cast_transpose_triton(x, fp8_dtype, granularity, scale, transpose, pad_to, want_amax)
    s = _fresh(s, scale)
    qt = qt if qt is not None else x.new_empty(0, dtype=fp8_dtype)
    st = _fresh(st, scale, s) if st is not None else x.new_empty(0, dtype=torch.float32)
    # (the launcher may hand back the amax pre-pass's result even when it was not asked for)
    amax = amax if want_amax else x.new_empty(0, dtype=torch.float32)
    return q, s, qt, st, amax


@_cast_transpose_op.register_fake
def _cast_transpose_fake(x, fp8_dtype, granularity, scale, transpose, pad_to, want_amax):
    m, k = x.shape
    q = x.new_empty(m, k, dtype=fp8_dtype)
    if scale is not None:
        s = x.new_empty(scale.shape, dtype=torch.float32)
    elif granularity == "block_1x128":
        s = x.new_empty(cdiv(k, BLOCK), m, dtype=torch.float32).t()  # M-major, as the launcher writes it
    else:
        s = x.new_empty(scale_shape(m, k, granularity), dtype=torch.float32)
    if transpose:
        qt = x.new_empty(k, cdiv(m, pad_to) * pad_to, dtype=fp8_dtype)
        if granularity == "tensor":
            st_shape = s.shape
        elif granularity == "block_128x128":
            st_shape = (s.shape[1], s.shape[0])
        else:
            st_shape = scale_shape(k, m, granularity)
        st = x.new_empty(st_shape, dtype=torch.float32)
        if granularity == "block_1x128":
            st = x.new_empty(st_shape[::-1], dtype=torch.float32).t()
    else:
        qt, st = x.new_empty(0, dtype=fp8_dtype), x.new_empty(0, dtype=torch.float32)
    amax = x.new_empty(() if want_amax else (0,), dtype=torch.float32)
    return q, s, qt, st, amax


# --- public API -----------------------------------------------------------------------------------------------------


def _validate(x: object, fp8_dtype: object, granularity: object, scale: object) -> None:
    check_float("x", x)
    if not isinstance(fp8_dtype, torch.dtype):
        raise TypeError(f"fp8_dtype must be a torch.dtype, got {type(fp8_dtype).__name__}")
    fp8_format(fp8_dtype)
    if not isinstance(granularity, str):
        raise TypeError(f"granularity must be a str, got {type(granularity).__name__}")
    check_granularity(granularity)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}; flatten leading dims first")
    check_nonempty("x", x)
    if scale is not None:
        check_tensor("scale", scale)
        if scale.dtype != torch.float32:
            raise TypeError(f"scale must be float32, got {str(scale.dtype).removeprefix('torch.')}")
        check_same_device("scale", scale, "x", x)
        expected = scale_shape(*x.shape, granularity)
        ok = scale.numel() == 1 and scale.dim() <= 1 if granularity == "tensor" else tuple(scale.shape) == expected
        if not ok:
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}, but granularity {granularity!r} on x of shape "
                f"{tuple(x.shape)} needs shape {expected}"
            )


def quantize(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = E4M3,
    granularity: str = "tensor",
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the 2-D ``x`` to ``fp8_dtype``; returns ``(x_fp8, scale)`` with ``x ≈ x_fp8 * scale``.

    ``granularity``: ``"tensor" | "row" | "block_1x128" | "block_128x128"``; scale shapes ``()``, ``(M, 1)``,
    ``(M, ceil(K/128))``, ``(ceil(M/128), ceil(K/128))``. ``scale`` given: cast with it (delayed scaling) instead of
    computing it. Saturates at the format's max; a group holding inf/NaN gets a NaN scale and NaN codes.

    Layout: a computed ``block_1x128`` scale has shape ``(M, ceil(K/128))`` as before but is stored M-major
    (strides ``(1, M)``, :func:`mn_major`; a transposed view of a contiguous ``(ceil(K/128), M)`` tensor), the
    layout the block-scaled GEMM reads coalesced; every backend returns that layout. Consumers index it by shape
    (``fp8_gemm``, :func:`dequantize`); code that needs row-major memory calls ``.contiguous()``. A given
    ``scale`` is used and returned as passed.
    """
    _validate(x, fp8_dtype, granularity, scale)
    if scale is not None and granularity == "tensor":
        scale = scale.reshape(())
    if not use_triton(x):
        return quantize_ref(x, fp8_dtype, granularity, scale)
    q, s, _, _, _ = _cast_transpose_op(x, fp8_dtype, granularity, scale, False, 1, False)
    return q, s


def cast_transpose(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = E4M3,
    granularity: str = "tensor",
    scale: torch.Tensor | None = None,
    pad_to: int = 1,
    return_amax: bool = False,
):
    """Quantise ``x`` and ``xᵀ`` in one pass: ``(q, s, qt, st)`` (plus the tensor amax of ``x`` if asked).

    ``qt`` is the row-major ``(K, M')`` quantised ``xᵀ`` with ``M'`` = ``M`` rounded up to ``pad_to`` (zero
    columns), ready as an operand of the weight-gradient GEMM; see :func:`cast_transpose_ref` for which scales
    ``xᵀ`` uses. ``return_amax`` adds ``max |x|`` (fp32 scalar, NaN with inf/NaN input) for delayed scaling.
    """
    _validate(x, fp8_dtype, granularity, scale)
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
    if scale is not None and granularity == "tensor":
        scale = scale.reshape(())
    if not use_triton(x):
        out = cast_transpose_ref(x, fp8_dtype, granularity, scale, pad_to)
        return (*out, amax_ref(x, "tensor")) if return_amax else out
    q, s, qt, st, amax = _cast_transpose_op(x, fp8_dtype, granularity, scale, True, pad_to, return_amax)
    return (q, s, qt, st, amax) if return_amax else (q, s, qt, st)


def quantize_for_gemm(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    granularity: str,
    scale: torch.Tensor | None = None,
    transpose: bool = False,
    pad_to: int = 16,
    want_amax: bool = False,
):
    """Internal one-call form for FP8Linear (no validation): ``(q, s, qt | None, st | None, amax | None)``."""
    if scale is not None and granularity == "tensor":
        scale = scale.reshape(())
    if use_triton(x):
        q, s, qt, st, amax = _cast_transpose_op(x, fp8_dtype, granularity, scale, transpose, pad_to, want_amax)
        return q, s, qt if transpose else None, st if transpose else None, amax if want_amax else None
    if transpose:
        q, s, qt, st = cast_transpose_ref(x, fp8_dtype, granularity, scale, pad_to)
    else:
        (q, s), qt, st = quantize_ref(x, fp8_dtype, granularity, scale), None, None
    return q, s, qt, st, amax_ref(x, "tensor") if want_amax else None
