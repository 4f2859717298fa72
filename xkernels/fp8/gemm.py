"""Scaled FP8 GEMM: ``out = (a · bᵀ) ⊙ scales (+ bias)`` with fp32 accumulation.

``a`` is ``(M, K)`` and ``b`` is ``(N, K)`` fp8 (E4M3 or E5M2, mixed allowed) with the scales of
:func:`xkernels.fp8.quantize` (dequantisation scales, ``a ≈ a_fp8 * a_scale``):

==========  =====================  ===========================================  ===================================
pairing     a_scale                b_scale                                      math
==========  =====================  ===========================================  ===================================
tensor      ``()``                 ``()``                                       ``acc · sa · sb`` once at the end
row         ``(M, 1)``             ``(N, 1)``                                   ``acc[m, n] · sa[m] · sb[n]``
block       ``(M, ceil(K/128))``   ``(ceil(N/128), ceil(K/128))`` (128x128)     per 128-wide K block ``kb``:
                                   or ``(N, ceil(K/128))`` (1x128)              ``acc += dot_kb · sa[m,kb] · sb[n',kb]``
==========  =====================  ===========================================  ===================================

The block pairing promotes every 128-wide K block into the fp32 accumulator with its own scales (DeepSeek-V3's
recipe), which is why the kernel's K tile is exactly 128.

Alignment (checked, ``ValueError``): K must be a multiple of 16 (16-byte fp8 rows: TMA descriptors and cuBLASLt
need it; pad K with zeros). M and N are free for our kernel (ragged tiles are masked); the cuBLASLt backend also
needs N to be a multiple of 16.

Backends behind the one call (``backend=``): ``"triton"`` (our kernel; the default on CUDA with fp8 tensor cores,
sm_89+), ``"scaled_mm"`` (``torch._scaled_mm``/cuBLASLt; tensor and row scales), ``"torch"`` (dequantise in fp32,
then matmul: :func:`fp8_gemm_ref`, the CPU path); ``"auto"`` asks :func:`xkernels.dispatch.use_triton`.

GPU specifics: one persistent kernel walks output tiles in grouped order (GROUP_M row-tiles share B tiles in L2).
On Hopper the grid is one program per SM and A/B tiles are fetched with TMA tensor descriptors when the installed
Triton has ``tl.make_tensor_descriptor``; elsewhere the grid is one program per tile with pointer loads. Tile
shapes are autotuned on CUDA (configs below); the interpreter uses one fixed small config.

Kernel structure (``STRUCTURES``): ``"flat"`` (default) runs the tile loop as ``tl.range(..., flatten=True)``, one
software-pipelined loop over (tile, K-step) pairs: the TMA loads of the next tile's first K-steps are issued before
this tile's epilogue, which stores C through a TMA descriptor in two (BM, BN/2) halves (where C's rows are 16-byte
aligned); a 128x128 weight scale is loaded once per (tile, K block) as a scalar, and the quantiser writes 1x128
scales M-major so the activation-scale words of a K-step are contiguous. ``"nested"`` is the first version (a
K loop nested in the tile loop: the pipeline prologue re-issued and drained per tile, pointer stores, per-column
weight scales). Pick it with ``XKERNELS_FP8_GEMM_STRUCTURE=nested`` or ``with kernel_structure("nested"):``
(benchmarks/bench_fp8.py ``*-nested`` impls and the ``fp8ab`` phase of ``python -m benchmarks.gpu_session`` time
both). What each structure compiles to on sm_90a (loop depth, per-tile prologue loads, scale loads per K-step,
TMA stores, registers, occupancy) is in ``benchmarks/results/aot-sm_90a.md``; the AOT gate fails if the flat
kernel loses any of it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from xkernels._checks import check_nonempty, check_same_device, check_tensor
from xkernels._compat import FP8_OPAQUE_TORCH_GEMM
from xkernels.dispatch import interpreting, use_triton
from xkernels.fp8._device import on_device
from xkernels.fp8.formats import BLOCK, FP8_DTYPES, cdiv
from xkernels.fp8.quant import dequantize

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "scaled_mm", "torch")
K_ALIGN = 16


# --- reference ------------------------------------------------------------------------------------------------------


def fp8_gemm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise both operands to fp32, ``a · bᵀ`` in fp32 (+ bias), cast to ``out_dtype``."""
    out = dequantize(a, a_scale) @ dequantize(b, b_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --- Triton kernel --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(tile, num_pid_m, GROUP_M: tl.constexpr, tiles_per_group):
    """Grouped order: GROUP_M consecutive row-tiles sweep the column-tiles together, so B stays in L2."""
    group = tile // tiles_per_group
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_m
    pid_n = (tile % tiles_per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,  # (M, K) fp8
    b_ptr,  # (N, K) fp8; the kernel reads bᵀ tiles (BK, BN)
    c_ptr,  # (M, N) output in out_dtype
    bias_ptr,  # (N,) fp32 (HAS_BIAS)
    sa_ptr,  # a_scale: (1,), (M, 1) or (M, Kb) fp32 (block: any strides; quantize() writes it M-major)
    sb_ptr,  # b_scale: (1,), (N, 1), (N, Kb) or (Nb, Kb) fp32
    M,
    N,
    K,
    M_BUCKET,  # autotune key only: next power of two of M (a new token count must not re-tune)
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_sam,
    stride_sak,
    stride_sbn,
    stride_sbk,
    SCALE_MODE: tl.constexpr,  # 0 tensor, 1 row, 2 block (per-K-block scales inside the main loop)
    SB_ROWS: tl.constexpr,  # block mode: rows of b sharing one scale row (1 for 1x128, 128 for 128x128)
    HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr,  # A/B tiles through TMA tensor descriptors (needs K-contiguous, 16B-aligned operands)
    FAST_ACCUM: tl.constexpr,  # tensor/row pairing: keep the whole K loop in Hopper's reduced-precision accumulator
    FLAT: tl.constexpr,  # 1: one flattened (tile, K) loop; 0: the nested loop of the first version (STRUCTURES)
    C_TMA: tl.constexpr,  # FLAT with USE_TMA: store C through a TMA descriptor in two (BM, BN/2) halves
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Persistent scaled GEMM: program p computes output tiles p, p + P, p + 2P, ... in grouped order.

    acc = Σ_k a[m, k] b[n, k] in fp32 (fp8 tensor-core dot); tensor/row scales multiply acc once in the epilogue,
    block scales multiply each 128-wide K block's partial product before it is added (exact promotion).
    Accumulation precision on sm_90: promoted to fp32 every BK = 128 of K unless FAST_ACCUM (tensor/row only;
    the block pairing always promotes per K block).

    FLAT (the default): the tile loop is ``tl.range(..., flatten=True)``, which Triton's pipeliner turns into one
    loop over (tile, K-step) pairs, so the TMA loads of the next tile's first K-steps are in flight while this
    tile's epilogue runs (no per-tile pipeline prologue/drain; with K = 1536 a tile has only 12 K-steps); the
    epilogue stores through TMA (C_TMA), and a 128x128 weight scale (one per tile and K block when 128 % BN == 0)
    is one scalar load instead of one per accumulator column. FLAT = 0 keeps the first version's code for A/B
    measurement.
    """
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BK)
    tiles_per_group = GROUP_M * num_pid_n
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BN, BK])
    if C_TMA:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BM, BN // 2])
    if SCALE_MODE == 0:
        s_ab = tl.load(sa_ptr) * tl.load(sb_ptr)
    rk = tl.arange(0, BK)
    # The epilogue's tile, counted separately from the loop's (as Triton's persistent-matmul tutorial does): the
    # flattened loop's prologue then does not need the values the epilogue uses.
    tile_c = pid - num_progs

    for tile in tl.range(pid, num_tiles, num_progs, flatten=FLAT):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, GROUP_M, tiles_per_group)
        rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
        rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
        rm32 = pid_m * BM + tl.arange(0, BM)
        rn32 = pid_n * BN + tl.arange(0, BN)
        m_mask = rm32 < M
        n_mask = rn32 < N

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kt in range(0, k_tiles):
            k0 = kt * BK
            if USE_TMA:
                a = a_desc.load([pid_m * BM, k0])
                bt = tl.trans(b_desc.load([pid_n * BN, k0]))
            else:
                k_mask = (k0 + rk) < K
                a = tl.load(
                    a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                bt = tl.load(
                    b_ptr + rn[None, :] * stride_bn + (k0 + rk)[:, None] * stride_bk,
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
            if SCALE_MODE == 2:
                # 32-bit scale offsets (scale tensors are small): 64-bit per-element pointers for the BN scales
                # of b each thread needs were what spilled the 1x128 (wgrad) variant.
                sa = tl.load(sa_ptr + kt * stride_sak + rm32 * stride_sam, mask=m_mask, other=0.0)
                if FLAT and SB_ROWS % BN == 0:
                    # 128x128 weight scales: the whole tile lies in one 128-row block of b -> one scalar per K
                    # block (a per-column vector was BN/(threads per row) loads of the same word per K-step).
                    sb1 = tl.load(sb_ptr + kt * stride_sbk + ((pid_n * BN) // SB_ROWS) * stride_sbn)
                    acc += tl.dot(a, bt) * (sa * sb1)[:, None]
                else:
                    sb = tl.load(sb_ptr + kt * stride_sbk + (rn32 // SB_ROWS) * stride_sbn, mask=n_mask, other=0.0)
                    # (dot * sa) * sb, not dot * (sa ⊗ sb): no (BM, BN) outer product of the scales is held in
                    # registers next to the accumulator and the dot's result (that extra tile is what spilled).
                    acc += (tl.dot(a, bt) * sa[:, None]) * sb[None, :]
            elif FAST_ACCUM:
                acc = tl.dot(a, bt, acc)
            else:
                # Hopper's FP8 wgmma accumulates in a reduced-precision (~22-bit mantissa) register format; by
                # default Triton keeps the whole K loop there (max_num_imprecise_acc = 2**30). Bounding it to BK
                # promotes into the fp32 accumulator after every 128 of K (DeepGEMM / DeepSeek-V3's interval);
                # ignored on sm_89 and in the interpreter, whose fp8 accumulation is already fp32.
                acc = tl.dot(a, bt, acc, max_num_imprecise_acc=BK)

        if FLAT:
            tile_c += num_progs
            pid_m, pid_n = _tile_coords(tile_c, num_pid_m, GROUP_M, tiles_per_group)
            rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
            rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
            rm32 = pid_m * BM + tl.arange(0, BM)
            rn32 = pid_n * BN + tl.arange(0, BN)
            m_mask = rm32 < M
            n_mask = rn32 < N
        if SCALE_MODE == 0:
            acc = acc * s_ab
        elif SCALE_MODE == 1:
            sa = tl.load(sa_ptr + rm32 * stride_sam, mask=m_mask, other=0.0)
            sb = tl.load(sb_ptr + rn32 * stride_sbn, mask=n_mask, other=0.0)
            acc = acc * (sa[:, None] * sb[None, :])
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn32, mask=n_mask, other=0.0)[None, :]
        if C_TMA:
            # Two (BM, BN/2) halves: half the staging buffer in shared memory; TMA clips the ragged edges.
            halves = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            c_desc.store([pid_m * BM, pid_n * BN], halves[0].to(c_ptr.dtype.element_ty))
            c_desc.store([pid_m * BM, pid_n * BN + BN // 2], halves[1].to(c_ptr.dtype.element_ty))
        else:
            tl.store(
                c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
                acc.to(c_ptr.dtype.element_ty),
                mask=m_mask[:, None] & n_mask[None, :],
            )


# --- launch configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration. BK is fixed at 128: the block pairing needs one scale column per K tile."""

    BM: int = 64
    BN: int = 64
    BK: int = BLOCK
    GROUP_M: int = 2
    num_warps: int = 4
    num_stages: int = 2


# Interpreter: small tiles keep the numpy emulation cheap; several tiles still exercise masking and grouping.
INTERPRETER_CONFIG = GemmConfig()

# CUDA autotune space, pruned per scale pairing so that every config a launch can pick compiles without register
# spills on sm_90a with Triton 3.6 and 3.9 (ptxas -v; `TRITON_INTERPRET=0 python -m xkernels.fp8._aot` prints the
# table, tests/test_fp8_gemm.py checks a pairing). A thread holds BM*BN/(32*num_warps) fp32 accumulators; fast
# accumulation holds one tile, promotion (the default) and block scales hold a second one (the wgmma result before
# it is added) plus the per-column scales of b, so the big tiles only serve the fast tensor pairing. Measured
# spills that set the lists (Triton 3.9, bytes): 256x128/w8 tensor-fast 12-48; row-fast 128x256/w8 28-116,
# 256x128/w8 60-76, 128x128/w4 36; block with 1x128 b scales 128x128/w8 12-92, 128x64/w4 8-40; Triton 3.6
# tensor-fast 128x128/w4 12. With these lists all 55 variants (x TMA on/off) are spill-free on both. Shared memory is
# stages*(BM+BN)*BK bytes: H100/H200 have 227 KiB, sm_89 ~99 KiB. Tile shapes from the Triton persistent-matmul
# tutorial / FBGEMM's fp8 Triton GEMMs; to be re-measured on the H200.
_BIG = [GemmConfig(128, 256, 128, 8, 8, 3)]
_MID = [GemmConfig(128, 128, 128, 8, 8, 4)]
_SMALL = [GemmConfig(64, 128, 128, 8, 4, 4), GemmConfig(128, 64, 128, 8, 4, 4), GemmConfig(64, 64, 128, 8, 4, 3)]
_CUDA_CONFIGS = _BIG + _MID + _SMALL
# block: b scaled per 128x128 tile (forward and input-gradient GEMMs); block_1x128: b per 1x128 group (wgrad)
SCALE_MODES = {"tensor": 0, "row": 1, "block": 2, "block_1x128": 2}
_SMEM_LIMIT = {90: 227 * 1024, 89: 99 * 1024, 80: 163 * 1024}


def gemm_configs(mode: str, *, fast_accum: bool = False, cc: int = 90) -> list[GemmConfig]:
    """The autotune configs a launch with scale pairing ``mode`` may pick on ``sm_cc``.

    ``mode``: ``tensor | row | block | block_1x128`` (``block``: 128x128 scales of b; ``block_1x128``: 1x128).
    """
    if mode not in SCALE_MODES:
        raise ValueError(f"mode must be one of {tuple(SCALE_MODES)}, got {mode!r}")
    if mode == "tensor" and fast_accum:
        configs = _CUDA_CONFIGS
    elif mode == "block_1x128":
        configs = [c for c in _SMALL if (c.BM, c.BN) != (128, 64)]
    else:
        configs = _MID + _SMALL
    smem = _SMEM_LIMIT.get(cc, 99 * 1024)
    return [c for c in configs if c.num_stages * (c.BM + c.BN) * c.BK + 1024 <= smem]


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two (16 at least), so token counts 4097..8192 share one tuning."""
    return max(16, 1 << (m - 1).bit_length())


def _mode_name(mode: int, sb_rows: int) -> str:
    return ("tensor", "row", "block" if sb_rows > 1 else "block_1x128")[mode]


@functools.cache
def _autotuned_kernel(name: str, fast_accum: bool, cc: int):
    """One autotuner per (scale pairing, accumulation, arch): each sees only the configs that are spill-free for it."""
    configs = [
        triton.Config({"BM": c.BM, "BN": c.BN, "BK": c.BK, "GROUP_M": c.GROUP_M}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in gemm_configs(name, fast_accum=fast_accum, cc=cc)
    ]
    key = ["M_BUCKET", "N", "K", "SCALE_MODE", "SB_ROWS", "HAS_BIAS", "USE_TMA", "FAST_ACCUM", "FLAT", "C_TMA"]
    return triton.autotune(configs=configs, key=key)(_fp8_gemm_kernel)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_available() -> bool:
    """Whether this Triton has device-side tensor descriptors (``tl.make_tensor_descriptor``, Triton >= 3.4)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


_tma_broken = False  # set only when the TMA variant fails to COMPILE (see _run_tma_with_fallback)


@functools.cache
def _tma_scratch_allocator(device: torch.device):
    """Scratch memory for device-side tensor descriptors, from torch's caching allocator on ``device``."""

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device=device, dtype=torch.int8)

    return alloc


def _set_tma_allocator(device: torch.device) -> None:
    """Install the descriptor scratch allocator for THIS thread/context, on every TMA launch.

    ``triton.set_allocator`` stores a ContextVar: autograd runs the CUDA backward on its own thread, which does
    not see an allocator set on the main thread (the first backward TMA GEMM would fail with "no allocator was
    set"). Setting it per launch costs one ContextVar write.
    """
    triton.set_allocator(_tma_scratch_allocator(device))


def _is_compile_error(err: BaseException) -> bool:
    """Whether ``err`` comes from building the kernel (frontend, MLIR passes, ptxas), not from running it."""
    from triton.compiler.errors import CompilationError

    try:
        from triton.runtime.errors import PTXASError
    except ImportError:  # older Triton
        PTXASError = CompilationError
    if isinstance(err, (CompilationError, PTXASError)):
        return True
    return isinstance(err, RuntimeError) and "PassManager" in str(err)


def _run_tma_with_fallback(run_tma, run_plain):
    """Run the TMA variant; if (and only if) it fails to compile, warn once and use pointer loads from then on.

    A runtime error (out of memory, a bad launch) is raised as is and does not switch TMA off: the old policy of
    disabling TMA for good on any exception turned a one-off problem into a permanent slowdown.
    """
    global _tma_broken
    try:
        return run_tma()
    except Exception as err:
        if not _is_compile_error(err):
            raise
        _tma_broken = True
        warnings.warn(
            f"fp8_gemm: the TMA kernel failed to compile ({type(err).__name__}: {str(err)[:300]}); "
            "using pointer loads from now on",
            stacklevel=3,
        )
        return run_plain()


def _tma_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Hopper+ with descriptors available, and operands TMA can address (K-contiguous, 16B-aligned rows/base)."""
    if _tma_broken or os.environ.get("XKERNELS_FP8_TMA", "1") == "0" or not tma_available() or a.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, b))


# Kernel structure (``FLAT``): "flat" (default) is the flattened persistent loop with a TMA-store epilogue and
# scalar 128x128 weight scales; "nested" is the first version (a K loop nested in the tile loop, pointer stores,
# per-column weight scales), kept so that one GPU session measures both (benchmarks/bench_fp8.py --structure,
# python -m benchmarks.gpu_session). Chosen per call by ``_run(structure=...)`` or for the process by
# XKERNELS_FP8_GEMM_STRUCTURE=nested.
STRUCTURES = ("flat", "nested")
_structure_override: str | None = None


def default_structure() -> str:
    """The structure a launch uses when none is passed: :func:`kernel_structure`'s, else
    ``XKERNELS_FP8_GEMM_STRUCTURE`` (``flat`` or ``nested``; ``flat`` when unset)."""
    if _structure_override is not None:
        return _structure_override
    value = os.environ.get("XKERNELS_FP8_GEMM_STRUCTURE", "flat")
    if value not in STRUCTURES:
        raise ValueError(f"XKERNELS_FP8_GEMM_STRUCTURE must be one of {STRUCTURES}, got {value!r}")
    return value


@contextlib.contextmanager
def kernel_structure(structure: str):
    """Run the Triton GEMMs inside the block with kernel ``structure`` (``"flat"`` or ``"nested"``): the A/B switch
    of the benchmarks (eager code; a torch.compile graph does not see it)."""
    global _structure_override
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    previous, _structure_override = _structure_override, structure
    try:
        yield
    finally:
        _structure_override = previous


def _launch(*args, **kwargs) -> torch.Tensor:
    """:func:`_run` on ``a``'s device (see :func:`xkernels.fp8._device.on_device`)."""
    with on_device(args[0]):
        return _run(*args, **kwargs)


def _run(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
    mode: int,
    sb_rows: int,
    *,
    config: GemmConfig | None = None,
    num_programs: int | None = None,
    use_tma: bool | None = None,
    fast_accum: bool = False,
    structure: str | None = None,
) -> torch.Tensor:
    """Run the Triton kernel (no validation). ``config``/``num_programs``/``use_tma`` override the heuristics;
    ``structure``: ``"flat"`` or ``"nested"`` (see :data:`STRUCTURES`; default :func:`default_structure`)."""
    structure = structure or default_structure()
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    flat = structure == "flat"
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    sa = a_scale.reshape(1) if mode == 0 else a_scale
    sb = b_scale.reshape(1) if mode == 0 else b_scale
    bias_f = bias.float().contiguous() if bias is not None else c
    if use_tma is None:
        use_tma = _tma_ok(a, b)
    if use_tma:  # (the interpreter emulates descriptors in host memory, so it needs the allocator too)
        _set_tma_allocator(a.device)

    args = (a, b, c, bias_f, sa, sb, m, n, k, m_bucket(m), a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    args += (sa.stride(0), sa.stride(1) if sa.dim() > 1 else 0, sb.stride(0), sb.stride(1) if sb.dim() > 1 else 0)
    flags = dict(SCALE_MODE=mode, SB_ROWS=sb_rows, HAS_BIAS=bias is not None, FAST_ACCUM=bool(fast_accum), FLAT=flat)
    # A TMA store needs 16-byte aligned rows of C (c is fresh and contiguous, so its base is aligned).
    c_tma = flat and n * c.element_size() % 16 == 0

    if config is not None or a.device.type != "cuda":
        cfg = config or INTERPRETER_CONFIG
        tiles = cdiv(m, cfg.BM) * cdiv(n, cfg.BN)
        grid = (min(num_programs or tiles, tiles),)
        _fp8_gemm_kernel[grid](
            *args, **flags, USE_TMA=use_tma, C_TMA=c_tma and use_tma, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
            GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return c

    major, minor = torch.cuda.get_device_capability(a.device)
    persistent = major >= 9
    tuned = _autotuned_kernel(_mode_name(mode, sb_rows), bool(fast_accum) and mode != 2, min(major * 10 + minor, 90))
    sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())

    def grid(meta):
        tiles = triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])
        return (min(sms, tiles) if persistent else tiles,)

    if use_tma:
        _run_tma_with_fallback(
            lambda: tuned[grid](*args, **flags, USE_TMA=True, C_TMA=c_tma),
            lambda: tuned[grid](*args, **flags, USE_TMA=False, C_TMA=False),
        )
    else:
        tuned[grid](*args, **flags, USE_TMA=False, C_TMA=False)
    return c


# --- cuBLASLt backend -----------------------------------------------------------------------------------------------


def _scaled_mm(a, b, a_scale, b_scale, out_dtype, bias, mode, fast_accum=False):
    with on_device(a):
        return _scaled_mm_run(a, b, a_scale, b_scale, out_dtype, bias, mode, fast_accum)


def _scaled_mm_run(a, b, a_scale, b_scale, out_dtype, bias, mode, fast_accum):
    """``torch._scaled_mm`` (cuBLASLt): a row-major, bᵀ column-major; scales () or (M,1)/(1,N)."""
    if mode == 2:
        raise ValueError("backend='scaled_mm' supports tensor and row scales only; use backend='triton' for blocks")
    if a.device.type != "cuda":
        raise ValueError(f"backend='scaled_mm' needs CUDA tensors, got {a.device}")
    if b.shape[0] % 16:
        raise ValueError(f"backend='scaled_mm' needs N (b.shape[0] = {b.shape[0]}) to be a multiple of 16")
    m, n = a.shape[0], b.shape[0]
    if mode == 0:
        sa, sb = a_scale.reshape(()), b_scale.reshape(())
    else:
        sa, sb = a_scale.reshape(m, 1).contiguous(), b_scale.reshape(1, n).contiguous()
    # cuBLASLt's row-wise scaling only writes bf16: compute in bf16 and cast for other out dtypes.
    mm_dtype = torch.bfloat16 if mode == 1 else out_dtype
    out = torch._scaled_mm(
        a.contiguous(), b.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=mm_dtype, use_fast_accum=fast_accum
    )
    if isinstance(out, tuple):  # torch < 2.5 also returned amax
        out = out[0]
    out = out.to(out_dtype)
    if bias is not None:  # added outside: cuBLASLt rejects bias with some out dtypes / row scales
        out = (out.float() + bias.float()).to(out_dtype)
    return out


# --- public API -----------------------------------------------------------------------------------------------------


def _scale_mode(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor) -> tuple[int, int]:
    """(SCALE_MODE, SB_ROWS) from the scale shapes; ValueError listing the accepted shapes otherwise."""
    m, k = a.shape
    n = b.shape[0]
    kb = cdiv(k, BLOCK)
    sa, sb = tuple(a_scale.shape), tuple(b_scale.shape)
    if a_scale.numel() == 1 and b_scale.numel() == 1 and a_scale.dim() <= 2 and b_scale.dim() <= 2:
        return 0, 1
    if sa == (m, 1) and sb == (n, 1):
        return 1, 1
    if sa == (m, kb) and sb == (n, kb):
        return 2, 1
    if sa == (m, kb) and sb == (cdiv(n, BLOCK), kb):
        return 2, BLOCK
    raise ValueError(
        f"a_scale {sa} / b_scale {sb} match no supported granularity for a ({m}, {k}) and b ({n}, {k}); expected "
        f"tensor: () and (); row: ({m}, 1) and ({n}, 1); block: ({m}, {kb}) and ({cdiv(n, BLOCK)}, {kb}) [128x128] "
        f"or ({n}, {kb}) [1x128]"
    )


def _validate(a, b, a_scale, b_scale, out_dtype, bias, backend) -> tuple[int, int]:
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t)
        if t.dtype not in FP8_DTYPES:
            raise TypeError(
                f"{name} must be an fp8 tensor (float8_e4m3fn or float8_e5m2; quantise it first), "
                f"got {str(t.dtype).removeprefix('torch.')}"
            )
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        check_nonempty(name, t)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} and b is (N, K) = {tuple(b.shape)}: their K dims differ")
    k = a.shape[1]
    if k % K_ALIGN:
        raise ValueError(
            f"K = {k} must be a multiple of {K_ALIGN} (fp8 rows must be 16-byte aligned for TMA and cuBLASLt); "
            "pad K with zeros"
        )
    check_same_device("b", b, "a", a)
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale)):
        check_tensor(name, s)
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {str(s.dtype).removeprefix('torch.')}")
        check_same_device(name, s, "a", a)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if bias is not None:
        check_tensor("bias", bias)
        if not bias.is_floating_point() or bias.dim() != 1 or bias.shape[0] != b.shape[0]:
            raise ValueError(f"bias must be a float tensor of shape ({b.shape[0]},), got {bias.dtype} {tuple(bias.shape)}")
        check_same_device("bias", bias, "a", a)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _scale_mode(a, b, a_scale, b_scale)


@torch.library.custom_op("xkernels::fp8_gemm", mutates_args=())
def _gemm_op(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
    backend: str,
    fast_accum: bool,
) -> torch.Tensor:
    """The Triton (``backend="triton"``) or cuBLASLt (``"scaled_mm"``) GEMM as one op for torch.compile."""
    if backend == "torch":
        return fp8_gemm_ref(a, b, a_scale, b_scale, out_dtype, bias)
    mode, sb_rows = _scale_mode(a, b, a_scale, b_scale)
    if backend == "scaled_mm":
        return _scaled_mm(a, b, a_scale, b_scale, out_dtype, bias, mode, fast_accum)
    return _launch(a, b, a_scale, b_scale, out_dtype, bias, mode, sb_rows, fast_accum=fast_accum)


@_gemm_op.register_fake
def _gemm_fake(a, b, a_scale, b_scale, out_dtype, bias, backend, fast_accum):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


def _fp8_tensor_cores(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    fast_accum: bool = False,
) -> torch.Tensor:
    """``(a · bᵀ) ⊙ scales + bias`` for fp8 ``a (M, K)``, ``b (N, K)``; see the module docstring for the scale
    pairings, alignment rules and backends. Returns ``(M, N)`` in ``out_dtype`` (fp32, bf16 or fp16).

    ``fast_accum``: on Hopper, let the tensor/row pairings keep the whole K loop in the tensor cores'
    reduced-precision accumulator (faster; ``use_fast_accum`` of ``torch._scaled_mm``). The default promotes to
    fp32 every 128 of K, which long contractions need (the weight gradient sums over all tokens). The block pairing
    always promotes per 128-block; the torch backend always accumulates in fp32."""
    if not isinstance(fast_accum, bool):
        raise TypeError(f"fast_accum must be a bool, got {type(fast_accum).__name__}")
    mode, sb_rows = _validate(a, b, a_scale, b_scale, out_dtype, bias, backend)
    if backend == "auto":
        backend = "triton" if use_triton(a) and _fp8_tensor_cores(a.device) else "torch"
    if backend == "torch":
        if FP8_OPAQUE_TORCH_GEMM and torch.compiler.is_compiling():  # see xkernels._compat
            return _gemm_op(a, b, a_scale, b_scale, out_dtype, bias, "torch", fast_accum)
        return fp8_gemm_ref(a, b, a_scale, b_scale, out_dtype, bias)
    if backend == "scaled_mm":
        if mode == 2:
            raise ValueError("backend='scaled_mm' supports tensor and row scales only; use backend='triton' for blocks")
        if a.device.type != "cuda":
            raise ValueError(f"backend='scaled_mm' needs CUDA tensors, got {a.device}")
        if b.shape[0] % 16:
            raise ValueError(f"backend='scaled_mm' needs N (b.shape[0] = {b.shape[0]}) to be a multiple of 16")
    elif a.device.type != "cuda" and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (set before importing xkernels)")
    return _gemm_op(a, b, a_scale, b_scale, out_dtype, bias, backend, fast_accum)
