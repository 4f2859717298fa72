"""Compile a Triton kernel ahead of time for an NVIDIA GPU, on a machine without one.

Triton builds PTX and a cubin for any target it knows (``GPUTarget("cuda", 90, 32)`` is sm_90a) without a driver;
``ptxas -v`` (the one Triton ships) then reports what decides a kernel's speed before it ever runs: registers per
thread, spill bytes, and the PTX shows which instructions were chosen (IEEE or approximate divides, wgmma, cp.async).
This module is the one place that does it; the AOT gate (``python -m benchmarks.aot``) and the register/spill tests of
each kernel family are built on it.

Call it in a process started without ``TRITON_INTERPRET=1``: the interpreter replaces ``@triton.jit`` functions by
Python ones that cannot be compiled.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = [
    "ARCHS", "SM_LIMITS", "KernelStats", "Occupancy", "compile_kernel", "compile_signature", "occupancy", "ptx_facts",
    "ptxas_path", "ptxas_stats",
]

# The targets we check, by ``--gpu-name``: Hopper (H100/H200), Ada (L4/L40: FP8 without wgmma), Ampere (A100).
ARCHS = {"sm_90a": 90, "sm_89": 89, "sm_80": 80}


def _arch(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


@dataclass(frozen=True)
class KernelStats:
    """What one compiled kernel variant costs on the target."""

    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    shared: int  # bytes of shared memory per program (Triton's metadata)
    ptx: str

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many blocks (programs) of a kernel are resident at once."""

    registers: int = 65536  # 32-bit registers per SM
    max_warps: int = 64
    shared: int = 228 * 1024  # bytes of shared memory per SM (the carve-out's maximum)
    max_blocks: int = 32
    reg_granularity: int = 256  # registers are allocated per warp in units of 256 (8 per thread)
    max_regs_per_thread: int = 255
    reserved_shared: int = 1024  # the CUDA runtime reserves 1 KiB of shared memory per block (sm_80 and later)
    shared_granularity: int = 128


# CUDA occupancy-calculator values (CUDA C Programming Guide, "Compute capabilities" table).
SM_LIMITS = {
    90: SMLimits(),
    89: SMLimits(max_warps=48, shared=100 * 1024, max_blocks=24),
    80: SMLimits(shared=164 * 1024),
}


@dataclass(frozen=True)
class Occupancy:
    """Theoretical occupancy of one kernel variant: resident blocks per SM and what limits them."""

    blocks: int  # resident blocks (programs) per SM: the minimum of the four limits below
    warps: int  # resident warps per SM
    fraction: float  # warps / max warps per SM
    by_registers: int
    by_shared: int
    by_warps: int
    by_blocks: int
    limiter: str  # "registers", "shared", "warps" or "blocks" (the first that reaches the minimum)


def occupancy(registers: int, shared_bytes: int, num_warps: int, cc: int = 90) -> Occupancy:
    """Blocks per SM from registers per thread, shared memory per block and warps per block (the CUDA occupancy
    calculator's rules). Registers: a warp takes ``ceil(32 * registers / 256) * 256`` of the SM's 65536 and the
    blocks that fit are ``floor(floor(65536 / per_warp) / num_warps)``; shared: each block takes its bytes plus
    1 KiB the runtime reserves, rounded up to 128 B, out of 228 KiB; warps: 64 per SM; at most 32 blocks (sm_90).

    >>> occupancy(128, 0, 4).blocks   # 128 regs x 32 lanes = 4096 per warp -> 16 warps -> 4 blocks of 4 warps
    4
    """
    if num_warps < 1 or registers < 0 or shared_bytes < 0:
        raise ValueError(f"need num_warps >= 1, registers >= 0, shared_bytes >= 0; got {num_warps}, {registers}, "
                         f"{shared_bytes}")
    lim = SM_LIMITS.get(cc, SM_LIMITS[90])
    per_warp = -(-max(registers, 1) * 32 // lim.reg_granularity) * lim.reg_granularity
    by_regs = (lim.registers // per_warp) // num_warps if registers <= lim.max_regs_per_thread else 0
    smem = -(-(shared_bytes + lim.reserved_shared) // lim.shared_granularity) * lim.shared_granularity
    by_smem = lim.shared // smem
    by_warps = lim.max_warps // num_warps
    limits = {"warps": by_warps, "blocks": lim.max_blocks, "registers": by_regs, "shared": by_smem}  # ties: the first
    blocks = min(limits.values())
    limiter = next(k for k, v in limits.items() if v == blocks)
    return Occupancy(blocks, blocks * num_warps, blocks * num_warps / lim.max_warps, by_regs, by_smem, by_warps,
                     lim.max_blocks, limiter)


def ptxas_path(cc: int) -> str:
    """The ptxas Triton itself uses for ``cc`` (it must read the PTX version this Triton writes).

    Triton 3.6 and 3.9 have ``get_ptxas(arch) -> NvidiaTool(path, version)`` (3.9 may pick its newer
    ``ptxas-blackwell``); older ones took no argument and returned a path. ``TRITON_PTXAS_PATH`` overrides, as in
    Triton."""
    override = os.environ.get("TRITON_PTXAS_PATH")
    if override:
        return override
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(cc)
    except TypeError:
        tool = nv.get_ptxas()
    if hasattr(tool, "path"):
        return tool.path
    return tool if isinstance(tool, str) else tool[0]


def ptxas_stats(ptx: str, cc: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` per thread from ``ptxas -v`` for the kernel in ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas_path(cc), "-v", f"--gpu-name={_arch(cc)}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, timeout=600,
        )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {_arch(cc)}: {text[-2000:]}")
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    stores, loads = max(spills, key=sum, default=(0, 0))
    return max(regs, default=0), stores, loads


def ptx_facts(ptx: str) -> dict:
    """Instruction counts that tell whether the kernel got the code it asked for."""
    depths = sorted({int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})
    return {
        "div_rn": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
        "div_full": len(re.findall(r"\bdiv\.full\.f32\b", ptx)),
        "div_approx": len(re.findall(r"\bdiv\.approx(\.ftz)?\.f32\b", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "tma_loads": len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.(ca|cg)\b", ptx)),
        "cvt_satfinite": len(re.findall(r"\bcvt\.rn\.satfinite\b", ptx)),
        "wait_group_depths": depths,
    }


def compile_signature(kernel, signature: dict, constexprs: dict, attrs: dict, *, num_warps: int, num_stages: int,
                      cc: int = 90) -> KernelStats:
    """Compile ``kernel`` with an explicit ``ASTSource`` signature / constexprs / attrs for ``cuda:cc``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs, stores, loads = ptxas_stats(ptx, cc)
    meta = compiled.metadata
    shared = meta.shared if hasattr(meta, "shared") else meta["shared"]
    return KernelStats(regs, stores, loads, int(shared), ptx)


def compile_kernel(kernel, types: dict[str, str], constexprs: dict, *, num_warps: int, num_stages: int = 3,
                   aligned: tuple[str, ...] = (), cc: int = 90) -> KernelStats:
    """Compile ``kernel`` as a launch with 16-byte aligned tensors would specialise it.

    ``types``: Triton types of the non-constexpr arguments that are not ``i32`` (``{"x_ptr": "*bf16"}``);
    ``constexprs``: every constexpr (and any argument to fix, e.g. a unit stride); ``aligned``: integer arguments
    that are multiples of 16 in a real launch (strides, sizes). Pointers get ``tt.divisibility=16``."""
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if n not in constexprs and (sig[n].startswith("*") or n in aligned)
    }
    return compile_signature(kernel, sig, constexprs, attrs, num_warps=num_warps, num_stages=num_stages, cc=cc)
