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
    "ARCHS", "SM_LIMITS", "KernelStats", "Occupancy", "compile_kernel", "compile_signature", "loop_facts", "occupancy",
    "ptx_facts", "ptxas_path", "ptxas_stats",
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


_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)\s*;")
_TILE_LOAD = re.compile(r"\bcp\.async\.bulk\.tensor\.\w+\.shared::\w+\.global\b|\bcp\.async\.c[ag]\.shared\.global\b")
_TMA_STORE = re.compile(r"\bcp\.async\.bulk\.tensor\.\w+\.global\.shared::\w+\b")
_GLOBAL_LOAD = re.compile(r"\bld\.global\b")
_GLOBAL_STORE = re.compile(r"\bst\.global\b")
_WGMMA = re.compile(r"\bwgmma\.mma_async\b")
_MMA = re.compile(r"\bwgmma\.mma_async\b|\bmma\.sync\b")


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """Natural loops as ``(first line, last line)`` spans: a ``$L__BB`` label and the last branch back to it.

    LLVM lays a loop's blocks out contiguously in the PTX it emits for these kernels, so a span is the loop.
    Branches to non-``$L__BB`` labels (the ``waitLoop`` of an inline-asm mbarrier wait) are not loops here."""
    labels = {}
    back: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
            continue
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            back[m.group(1)] = i
    return sorted((labels[name], end) for name, end in back.items())


def loop_facts(ptx: str) -> dict:
    """The shape of a GEMM-like kernel's main loop, read from its PTX (no GPU).

    The main loop is the innermost loop holding the MMA instructions (``wgmma.mma_async``, else ``mma.sync``).
    Its *K-step* part runs from the loop's start through its last tile load / MMA; whatever follows inside the loop
    (a flattened persistent loop's epilogue, entered on a tile's last K-step) is its *epilogue* part.

    * ``mma_loop_depth``: loops enclosing the MMAs (1: one flattened loop; 2: a K loop inside a tile loop).
    * ``tile_prologue_loads``: tile loads (TMA ``cp.async.bulk.tensor`` global->shared, or ``cp.async``) inside an
      enclosing loop but outside the main loop: the software pipeline's prologue, re-issued for every tile.
    * ``kstep_global_loads``: ``ld.global`` instructions per K-step (scale loads in the block-scaled GEMM).
    * ``epilogue_in_loop``: the output stores sit inside the main loop (flattened: the next tile's loads are in the
      same pipeline); ``loads_before_stores``: tile loads in the main loop issued before its first store, i.e. in
      flight while the epilogue runs.
    * ``tma_stores`` / ``global_stores``: TMA stores (shared->global) and ``st.global`` in the whole kernel.
    """
    lines = ptx.splitlines()
    mma_lines = [i for i, ln in enumerate(lines) if _MMA.search(ln)]
    facts = {"mma_loop_depth": 0, "tile_prologue_loads": 0, "kstep_global_loads": 0, "epilogue_in_loop": False,
             "loads_before_stores": 0, "tma_stores": sum(bool(_TMA_STORE.search(ln)) for ln in lines),
             "global_stores": sum(bool(_GLOBAL_STORE.search(ln)) for ln in lines)}
    if not mma_lines:
        return facts
    first_mma = mma_lines[0]
    loops = [(a, b) for a, b in _loops(lines) if a <= first_mma <= b]
    if not loops:
        return facts
    start, end = min(loops, key=lambda span: span[1] - span[0])  # innermost
    facts["mma_loop_depth"] = len(loops)
    inside = lambda i: start <= i <= end  # noqa: E731
    for a, b in loops:
        if (a, b) != (start, end):
            facts["tile_prologue_loads"] = max(
                facts["tile_prologue_loads"],
                sum(1 for i in range(a, b + 1) if not inside(i) and _TILE_LOAD.search(lines[i])),
            )
    body = range(start, end + 1)
    kstep_end = max([i for i in body if _TILE_LOAD.search(lines[i]) or _MMA.search(lines[i])])
    facts["kstep_global_loads"] = sum(1 for i in range(start, kstep_end + 1) if _GLOBAL_LOAD.search(lines[i]))
    stores = [i for i in body if _TMA_STORE.search(lines[i]) or _GLOBAL_STORE.search(lines[i])]
    if stores:
        facts["epilogue_in_loop"] = True
        facts["loads_before_stores"] = sum(1 for i in range(start, stores[0]) if _TILE_LOAD.search(lines[i]))
    return facts


def ptx_facts(ptx: str) -> dict:
    """Instruction counts that tell whether the kernel got the code it asked for (and :func:`loop_facts`)."""
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
        **loop_facts(ptx),
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
