"""Every launch variant of the FP8 kernels (each autotune config of each scale pairing), compiled ahead of time for
a GPU target with :mod:`xkernels.aot`, no GPU needed (used by the tests and by humans). Run it in a process started
without ``TRITON_INTERPRET=1`` (the tests run it in a subprocess).

    TRITON_INTERPRET=0 python -m xkernels.fp8._aot [--cc 90] [--kernels cast,gemm] [--modes tensor,row,block,block_1x128]
"""

from __future__ import annotations

import itertools

from xkernels.aot import KernelStats, compile_kernel

__all__ = ["KernelStats", "cast_variants", "compile_kernel", "gemm_variants", "table"]


# --- the FP8 kernels' launch variants -----------------------------------------------------------------------------

GEMM_PTRS = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "bias_ptr": "*fp32", "sa_ptr": "*fp32",
             "sb_ptr": "*fp32"}
GEMM_ALIGNED = ("stride_am", "stride_bn", "stride_cm", "K")
CAST_PTRS = {"x_ptr": "*bf16", "y_ptr": "*fp8e4nv", "yt_ptr": "*fp8e4nv", "s_ptr": "*fp32", "st_ptr": "*fp32",
             "amax_ptr": "*fp32"}
CAST_ALIGNED = ("stride_xm", "stride_ym", "stride_ytk")


def gemm_variants(cc: int = 90, modes=("tensor", "row", "block", "block_1x128"), use_tma=(True, False),
                  structures=("flat", "nested")):
    """(name, constexprs, num_warps, num_stages) for every config the autotuner can pick, per scale pairing and
    kernel structure (``gemm.STRUCTURES``; flat with TMA stores C through TMA, as for a 16-byte aligned N)."""
    from xkernels.fp8.gemm import SCALE_MODES, gemm_configs

    for mode, structure, tma in itertools.product(modes, structures, use_tma):
        for fast in ((True, False) if SCALE_MODES[mode] != 2 else (False,)):
            for c in gemm_configs(mode, fast_accum=fast, cc=cc):
                consts = dict(stride_ak=1, stride_bk=1, stride_cn=1, SCALE_MODE=SCALE_MODES[mode],
                              SB_ROWS=128 if mode == "block" else 1, HAS_BIAS=True, USE_TMA=tma, FAST_ACCUM=fast,
                              FLAT=structure == "flat", C_TMA=structure == "flat" and tma,
                              BM=c.BM, BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M)
                name = f"fp8_gemm_{mode}_{c.BM}x{c.BN}x{c.BK}_w{c.num_warps}_s{c.num_stages}_tma{int(tma)}" \
                       f"_fast{int(fast)}_{structure}"
                yield name, consts, c.num_warps, c.num_stages


def cast_variants():
    """(name, constexprs, num_warps, num_stages) for every (MODE, T_MODE) pair the cast launcher uses."""
    import triton.language as tl

    from xkernels.fp8.quant import CAST_LAUNCH

    pairs = [(0, 0, True), (0, 1, True), (0, 2, False), (1, 0, False), (1, 3, False), (2, 0, False), (2, 1, False)]
    for mode, t_mode, amax in pairs:
        consts = dict(stride_xk=1, FP8_DTYPE=tl.float8e4nv, FP8_MAX=448.0, MBITS=3, EMIN=-6, EPS=1e-12, MODE=mode,
                      T_MODE=t_mode, S_ROWS=1, ST_ROWS=1, WRITE_AMAX=amax, EXACT_ROUND=False, OFF64=False,
                      **CAST_LAUNCH.constexprs)
        yield f"fp8_cast_mode{mode}_t{t_mode}_amax{int(amax)}", consts, CAST_LAUNCH.num_warps, CAST_LAUNCH.num_stages


def table(cc: int = 90, kernels=("cast", "gemm"), modes=("tensor", "row", "block", "block_1x128")):
    """Yield (name, KernelStats) for every variant of the chosen kernels."""
    from xkernels.fp8 import gemm, quant

    if "cast" in kernels:
        for name, consts, warps, stages in cast_variants():
            yield name, compile_kernel(quant._cast_kernel, CAST_PTRS, consts, num_warps=warps, num_stages=stages,
                                       aligned=CAST_ALIGNED, cc=cc)
    if "gemm" in kernels:
        for name, consts, warps, stages in gemm_variants(cc, modes):
            yield name, compile_kernel(gemm._fp8_gemm_kernel, GEMM_PTRS, consts, num_warps=warps,
                                       num_stages=stages, aligned=GEMM_ALIGNED, cc=cc)


if __name__ == "__main__":
    import argparse

    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, default=90)
    parser.add_argument("--kernels", default="cast,gemm")
    parser.add_argument("--modes", default="tensor,row,block,block_1x128")
    ns = parser.parse_args()
    print(f"| kernel (sm_{ns.cc}, triton {triton.__version__}) | regs | spill st/ld B | smem B |")
    print("|---|---|---|---|")
    for name, st in table(ns.cc, ns.kernels.split(","), ns.modes.split(",")):
        print(f"| {name} | {st.registers} | {st.spill_stores}/{st.spill_loads} | {st.shared} |", flush=True)
