"""The ahead-of-time compile gate (``python -m benchmarks.aot``) on whichever Triton is installed, no GPU.

A subset (SwiGLU and the cross-entropy chunk kernel) keeps it short; the whole table is
``python -m benchmarks.aot --arch sm_90a --out benchmarks/results``.  A deliberately spilling toy kernel compiled
in the same run must make the gate exit non-zero.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError as err:  # pragma: no cover - very old Triton
    pytest.skip(f"this Triton cannot compile ahead of time: {err}", allow_module_level=True)

ROW_KEYS = {
    "kernel", "config", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "div_rn", "div_full",
    "wgmma", "cvt_satfinite", "wait_group_depths",
}

TOY = textwrap.dedent(
    """
    import triton
    import triton.language as tl


    @triton.jit
    def _toy_spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # one warp holding 8192 fp32 values that all stay live (the sum needs every one): far past 255 registers
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(y_ptr + offs, x * tl.sum(x * x, axis=0) + tl.cumsum(x, axis=0))
    """
)
TOY_SPEC = [
    {
        "kernel": "_toy_spill_kernel",
        "module": "xk_toy_spill",
        "scenario": "toy",
        "args": {
            "x_ptr": {"kind": "tensor", "dtype": "float32", "aligned": True},
            "y_ptr": {"kind": "tensor", "dtype": "float32", "aligned": True},
            "BLOCK": {"kind": "int", "value": 8192},
        },
        "num_warps": 1,
        "num_stages": 1,
    }
]


def _aot(tmp_path, *args, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([str(pythonpath)] if pythonpath else []))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--jobs", "1", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


FAMILIES = ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel", "_rotary_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
            "_ce_chunk_kernel", "_amax_kernel", "_cast_kernel", "_fp8_gemm_kernel", "_ns_gram_kernel", "_ns_update_kernel")


@pytest.mark.slow
def test_gate_writes_table_and_fails_on_a_spilling_kernel(tmp_path):
    """One gate run (each is a capture of every scenario plus compiles, ~15 s): every scenario is captured (each
    kernel family shows up); a subset is compiled to keep this short, and a deliberately spilling toy kernel beside
    it must make the gate exit non-zero with a FAIL row while the real kernels pass."""
    (tmp_path / "xk_toy_spill.py").write_text(TOY)
    (tmp_path / "spec.json").write_text(json.dumps(TOY_SPEC))
    out = tmp_path / "out"
    proc = _aot(tmp_path, "--arch", "sm_90a", "--kernels", "_swiglu,_ce_chunk,toy", "--extra-specs",
                str(tmp_path / "spec.json"), "--out", str(out), pythonpath=tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL _toy_spill_kernel" in proc.stdout and "spills" in proc.stdout
    result = json.loads((out / "aot-sm_90a.json").read_text())
    assert {"arch", "triton", "torch", "date", "rows", "failures", "captured"} <= set(result)
    assert result["arch"] == "sm_90a" and not result["capture_errors"]
    assert set(FAMILIES) <= set(result["captured"]), result["captured"]
    assert result["captured"]["_fp8_gemm_kernel"] >= 7  # every autotune config of the CUDA launch
    kernels = {r["kernel"] for r in result["rows"]}
    assert kernels == {"_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_ce_chunk_kernel", "_toy_spill_kernel"}
    assert [f["kernel"] for f in result["failures"]] == ["_toy_spill_kernel"], result["failures"]
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row
        spills = row["kernel"] == "_toy_spill_kernel"
        assert row["registers"] > 0 and (row["spill_bytes"] > 0) == spills, row
    md = (out / "aot-sm_90a.md").read_text()
    assert "| kernel | config |" in md and "_swiglu_fwd_kernel" in md and "**FAIL**" in md


def test_specialisation_follows_triton_rules():
    """Aligned tensors and multiples of 16 get divisibility; the integer 1 becomes a constant; constexprs pass."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks import aot

    class P:
        def __init__(self, name, constexpr=False):
            self.name, self.is_constexpr = name, constexpr

    class K:
        params = [P("x"), P("y"), P("n"), P("one"), P("s"), P("B", True)]

        @staticmethod
        def fn(x, y, n, one, s, B):  # pragma: no cover - signature only
            pass

    spec = {"kernel": "k", "args": {
        "x": {"kind": "tensor", "dtype": "bfloat16", "aligned": True},
        "y": {"kind": "tensor", "dtype": "float8_e4m3fn", "aligned": False},
        "n": {"kind": "int", "value": 1536}, "one": {"kind": "int", "value": 1},
        "s": {"kind": "float", "value": 0.5}, "B": {"kind": "int", "value": 128}}}
    sig, consts, attrs = aot.specialise(K, spec)
    assert sig == {"x": "*bf16", "y": "*fp8e4nv", "n": "i32", "one": "constexpr", "s": "fp32", "B": "constexpr"}
    assert consts == {"one": 1, "B": 128}
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


def test_occupancy_follows_the_sm90_calculator():
    """Blocks per SM from registers (per-warp allocation in units of 256), shared memory (+1 KiB reserved per block),
    warps (64 per SM) and the 32-block cap; hand-computed cases."""
    from xkernels.aot import occupancy

    full = occupancy(32, 0, 4)  # 32 regs x 32 lanes = 1024 per warp -> 64 warps: 16 blocks of 4, all 64 warps
    assert (full.blocks, full.warps, full.fraction, full.limiter) == (16, 64, 1.0, "warps")
    assert occupancy(128, 0, 4).blocks == 4 and occupancy(128, 0, 4).limiter == "registers"
    assert occupancy(130, 0, 4).by_registers == 3  # 130 -> 136 per thread (granularity 8): 65536 // 4352 = 15 warps
    assert occupancy(168, 0, 8).fraction == 0.125  # 168 * 32 = 5376 -> 12 warps -> one block of 8
    assert occupancy(16, 0, 1).limiter == "blocks" and occupancy(16, 0, 1).blocks == 32
    smem = occupancy(40, 100 * 1024, 4)  # (100 + 1) KiB per block: 2 fit in 228 KiB
    assert (smem.blocks, smem.limiter) == (2, "shared")
    assert occupancy(256, 0, 4).blocks == 0  # past 255 registers nothing launches
    with pytest.raises(ValueError, match="num_warps"):
        occupancy(32, 0, 0)


_NESTED_PTX = """
$L__BB0_1:
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
\t@%p1 bra $L__BB0_3;
$L__BB0_2:
\tld.global.b32 %r5, [%rd2];
\tld.global.b32 %r6, [%rd3];
\twgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%f1}, %rd4, %rd5, 1, 1, 1;
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
\t@%p2 bra $L__BB0_2;
$L__BB0_3:
\tst.global.v4.b32 [%rd6], {%r7, %r8, %r9, %r10};
\t@%p3 bra $L__BB0_1;
\tret;
"""

_FLAT_PTX = """
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
$L__BB0_1:
\tld.global.b32 %r5, [%rd2];
\twgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%f1}, %rd4, %rd5, 1, 1, 1;
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
\t@%p1 bra $L__BB0_2;
\tld.global.b32 %r6, [%rd3];
\tcp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd7, {%r2, %r3}], [%r11];
$L__BB0_2:
\t@%p2 bra $L__BB0_1;
\tret;
"""


def test_loop_facts_tell_nested_from_flattened_loops():
    """xkernels.aot.loop_facts on two hand-written PTX skeletons: a K loop inside a tile loop (per-tile prologue
    load, two scale loads per K-step, stores after the loop) and one flattened loop (the epilogue's bias load and
    TMA store inside it, after the next K-step's TMA load)."""
    from xkernels.aot import loop_facts

    nested = loop_facts(_NESTED_PTX)
    assert nested == {"mma_loop_depth": 2, "tile_prologue_loads": 1, "kstep_global_loads": 2,
                      "epilogue_in_loop": False, "loads_before_stores": 0, "tma_stores": 0, "global_stores": 1}
    flat = loop_facts(_FLAT_PTX)
    assert flat == {"mma_loop_depth": 1, "tile_prologue_loads": 0, "kstep_global_loads": 1,
                    "epilogue_in_loop": True, "loads_before_stores": 1, "tma_stores": 1, "global_stores": 0}
    assert loop_facts("\tret;\n")["mma_loop_depth"] == 0


def test_gate_flags_a_flattened_gemm_that_lost_its_structure():
    """The gate's STRUCTURE_RULES: a FLAT=1 FP8 GEMM row with a per-tile prologue, stores outside the loop and 34
    scale loads per K-step is a failure; the facts the flattened kernel compiles to are not."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks import aot

    base = {"kernel": "_fp8_gemm_kernel", "num_warps": 8, "spill_bytes": 0, "shared_bytes": 1024, "div_rn": 0,
            "div_full": 0, "div_approx": 0, "asks_ieee_div": False, "wgmma": 8,
            "config": "[tma flat cfg0] SCALE_MODE=2 SB_ROWS=128 HAS_BIAS=0 USE_TMA=1 FAST_ACCUM=0 FLAT=1 C_TMA=1 "
                      "BM=128 BN=128 BK=128 GROUP_M=8 (float8_e4m3fn)"}
    good = dict(base, mma_loop_depth=1, tile_prologue_loads=0, kstep_global_loads=3, epilogue_in_loop=True,
                loads_before_stores=2, tma_stores=4, global_stores=0)
    assert aot.problems(good, "sm_90a") == []
    bad = dict(base, mma_loop_depth=2, tile_prologue_loads=6, kstep_global_loads=34, epilogue_in_loop=False,
               loads_before_stores=0, tma_stores=0, global_stores=8)
    text = "; ".join(aot.problems(bad, "sm_90a"))
    assert "not flattened" in text and "not overlapped" in text and "34 scale loads" in text, text
    nested = dict(bad, config=bad["config"].replace("FLAT=1 C_TMA=1", "FLAT=0 C_TMA=0"))
    assert aot.problems(nested, "sm_90a") == []  # the first version, kept for A/B runs, is not held to it
