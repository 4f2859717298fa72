"""Scaled FP8 GEMM vs the dequantised fp32 product of the same fp8 inputs (relative error < 1e-3)."""

import json
import textwrap
import threading

import pytest
import torch
import triton
import triton.runtime._allocation

from xkernels.dispatch import force_backend
from xkernels.fp8 import E4M3, E5M2, fp8_gemm, quantize
from xkernels.fp8 import gemm
from xkernels.fp8.gemm import GemmConfig, _launch, _scale_mode, fp8_gemm_ref

PAIRS = [
    ("tensor", "tensor"),
    ("row", "row"),
    ("block_1x128", "block_128x128"),  # forward / input-gradient GEMM of the block recipe
    ("block_1x128", "block_1x128"),  # weight-gradient GEMM of the block recipe
]
SHAPES = [(64, 96, 128), (100, 80, 208), (1, 16, 400)]  # ragged M/N/K (not multiples of the 128 block)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _operands(m, n, k, ga, gb, device, a_dtype=E4M3, b_dtype=E4M3):
    a, sa = quantize(torch.randn(m, k, device=device) * 2, a_dtype, ga)
    b, sb = quantize(torch.randn(n, k, device=device) * 0.1, b_dtype, gb)
    return a, b, sa, sb


def _dequantised_product(a, b, sa, sb, bias=None):
    return fp8_gemm_ref(a, b, sa, sb, torch.float32, bias)


@pytest.mark.parametrize("ga,gb", PAIRS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_matches_dequantised_product(device, ga, gb, shape):
    m, n, k = shape
    a, b, sa, sb = _operands(m, n, k, ga, gb, device)
    out = fp8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert _rel_err(out, _dequantised_product(a, b, sa, sb)) < 1e-3


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("ga,gb", [("tensor", "tensor"), ("block_1x128", "block_128x128")])
def test_out_dtypes_and_bias(device, out_dtype, ga, gb):
    a, b, sa, sb = _operands(70, 48, 144, ga, gb, device, E5M2, E4M3)  # hybrid: E5M2 gradient x E4M3 weight
    bias = torch.randn(48, device=device, dtype=torch.bfloat16)
    out = fp8_gemm(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
    assert out.dtype == out_dtype
    ref = _dequantised_product(a, b, sa, sb, bias)
    # Error of the final rounding to out_dtype dominates for half types (bf16: 8 bits, fp16: 11 bits).
    tol = {torch.float32: 1e-3, torch.bfloat16: 2e-3, torch.float16: 1e-3}[out_dtype]  # bf16 RNE: ~1.1e-3
    assert _rel_err(out, ref) < tol


def test_block_scales_are_applied_per_k_block(device):
    """Block scales that differ strongly between K blocks must be applied inside the K loop, not at the end."""
    m, n, k = 32, 32, 256
    x = torch.randn(m, k, device=device)
    x[:, 128:] *= 1000.0  # second K block has a 1000x larger scale
    a, sa = quantize(x, E4M3, "block_1x128")
    b, sb = quantize(torch.randn(n, k, device=device), E4M3, "block_128x128")
    out = fp8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    assert _rel_err(out, _dequantised_product(a, b, sa, sb)) < 1e-3
    exact = x @ torch.cat([b[:, :128].float() * sb[0, 0], b[:, 128:].float() * sb[0, 1]], 1).t()
    assert _rel_err(out, exact) < 0.05  # and it is close to the unquantised-activation product


@pytest.mark.parametrize(
    "use_tma, structure, ga, gb, out_dtype",
    [
        (False, "flat", "block_1x128", "block_128x128", torch.float32),
        (True, "flat", "block_1x128", "block_128x128", torch.float32),  # TMA loads + TMA store of C
        (True, "nested", "block_1x128", "block_128x128", torch.float32),  # the first version, kept for A/B runs
        (True, "flat", "row", "row", torch.bfloat16),  # TMA store of bf16 halves, epilogue scales + bias
    ],
)
def test_persistent_grid_and_tma_descriptors(use_tma, structure, ga, gb, out_dtype):
    """Fewer programs than tiles (the Hopper persistent loop, grouped order; the flattened tile x K loop), the TMA
    descriptor path (loads, and the epilogue's two-half TMA store clipped at the ragged M/N edges), both kernel
    structures. Runs the kernel directly on CPU through the interpreter (which emulates tensor descriptors), or
    on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if use_tma and device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need sm_90+")
    a, b, sa, sb = _operands(150, 112, 272, ga, gb, device)
    bias = torch.randn(112, device=device)
    mode = _scale_mode(a, b, sa, sb)
    cfg = GemmConfig(BM=32, BN=32, GROUP_M=3)
    out = _launch(a, b, sa, sb, out_dtype, bias, *mode, config=cfg, num_programs=5, use_tma=use_tma,
                  structure=structure)
    tol = 1e-3 if out_dtype == torch.float32 else 2e-3  # bf16 round-to-nearest-even (interpreter as GPU)
    assert out.dtype == out_dtype and _rel_err(out.float(), _dequantised_product(a, b, sa, sb, bias)) < tol
    with pytest.raises(ValueError, match="structure must be one of"):
        _launch(a, b, sa, sb, out_dtype, bias, *mode, config=cfg, structure="flattened")


@pytest.mark.parametrize("ga", ["tensor", "row"])
def test_fast_accum_keyword(device, ga):
    """fast_accum reaches every backend; the interpreter and the reference accumulate in fp32 either way."""
    a, b, sa, sb = _operands(40, 48, 256, ga, ga, device)
    ref = _dequantised_product(a, b, sa, sb)
    for fast in (False, True):
        assert _rel_err(fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, fast_accum=fast), ref) < 1e-3
    with pytest.raises(TypeError, match="fast_accum must be a bool"):
        fp8_gemm(a, b, sa, sb, fast_accum=1)


def test_tma_launch_from_another_thread():
    """triton.set_allocator is a ContextVar: a TMA launch on autograd's backward thread (here: a plain worker
    thread, after the main thread has launched) must set the descriptor allocator itself (on a GPU the launch
    fails with "no allocator was set" otherwise; the interpreter does not need it, so the test checks the
    allocator the worker's context holds after its launch)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need sm_90+")
    a, b, sa, sb = _operands(40, 32, 128, "tensor", "tensor", device)
    mode = _scale_mode(a, b, sa, sb)
    cfg = GemmConfig(BM=32, BN=32)
    ref = _dequantised_product(a, b, sa, sb)
    _launch(a, b, sa, sb, torch.float32, None, *mode, config=cfg, use_tma=True)  # main thread first
    result = {}

    def worker():
        try:
            result["out"] = _launch(a, b, sa, sb, torch.float32, None, *mode, config=cfg, use_tma=True)
            result["alloc"] = triton.runtime._allocation._allocator.get()
        except Exception as err:  # noqa: BLE001 - reported to the main thread
            result["err"] = err

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert "err" not in result, result.get("err")
    assert _rel_err(result["out"], ref) < 1e-3
    # The launch installed our allocator in the worker's own context (the main thread's is invisible there).
    assert result["alloc"] is gemm._tma_scratch_allocator(torch.device(device))


def test_tma_falls_back_only_on_compile_errors(monkeypatch):
    from triton.compiler.errors import CompilationError

    monkeypatch.setattr(gemm, "_tma_broken", False)
    calls = []

    def plain():
        calls.append("plain")
        return "plain"

    def runtime_failure():
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        gemm._run_tma_with_fallback(runtime_failure, plain)
    assert not gemm._tma_broken and calls == []  # a runtime error never switches TMA off

    def compile_failure():
        raise CompilationError("", None, "descriptor lowering failed")

    with pytest.warns(UserWarning, match="TMA kernel failed to compile"):
        assert gemm._run_tma_with_fallback(compile_failure, plain) == "plain"
    assert gemm._tma_broken and calls == ["plain"]
    assert gemm._run_tma_with_fallback(lambda: "tma", plain) == "tma"


def test_launchers_run_on_the_operands_device(monkeypatch):
    """Every launcher enters its tensors' CUDA device (a process driving two GPUs); a no-op on CPU."""
    import contextlib

    from xkernels.fp8 import _device, quant

    class _FakeCuda:
        device = torch.device("cuda", 1)

    guard = _device.on_device(_FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # constructed lazily: no GPU needed
    assert isinstance(_device.on_device(torch.ones(1)), contextlib.nullcontext)
    seen = []

    def spy(t):
        seen.append(t.device)
        return contextlib.nullcontext()

    a, b, sa, sb = _operands(32, 32, 128, "tensor", "tensor", "cpu")
    monkeypatch.setattr(gemm, "on_device", spy)
    monkeypatch.setattr(quant, "on_device", spy)
    gemm._launch(a, b, sa, sb, torch.float32, None, 0, 1, config=GemmConfig(BM=32, BN=32))
    quant._cast_transpose_triton(torch.randn(8, 32), E4M3, "tensor", None, True, 16, True)
    assert seen == [a.device, a.device]


def test_strided_operands(device):
    a, b, sa, sb = _operands(48, 32, 128, "row", "row", device)
    at = a.view(torch.uint8).t().contiguous().t().view(E4M3)  # column-major A
    out = fp8_gemm(at, b, sa, sb, out_dtype=torch.float32)
    assert _rel_err(out, _dequantised_product(a, b, sa, sb)) < 1e-3


def test_torch_backend_is_the_reference(device):
    a, b, sa, sb = _operands(40, 32, 128, "tensor", "tensor", device)
    with force_backend("torch"):
        out = fp8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    assert torch.equal(out, _dequantised_product(a, b, sa, sb))
    assert torch.equal(fp8_gemm(a, b, sa, sb, torch.float32, backend="torch"), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm (cuBLASLt) needs a CUDA GPU")
@pytest.mark.parametrize("ga", ["tensor", "row"])
def test_scaled_mm_backend(ga):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 cuBLASLt needs sm_89+")
    a, b, sa, sb = _operands(256, 128, 256, ga, ga, "cuda")
    out = fp8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, backend="scaled_mm")
    assert _rel_err(out, _dequantised_product(a, b, sa, sb)) < 5e-3


def test_bad_inputs_raise_clear_errors(device):
    a, b, sa, sb = _operands(32, 32, 128, "tensor", "tensor", device)
    with pytest.raises(TypeError, match="a must be an fp8 tensor"):
        fp8_gemm(a.float(), b, sa, sb)
    with pytest.raises(TypeError, match="b must be an fp8 tensor"):
        fp8_gemm(a, b.to(torch.bfloat16), sa, sb)
    with pytest.raises(ValueError, match="their K dims differ"):
        fp8_gemm(a, b[:, :64], sa, sb)
    a2, sa2 = quantize(torch.randn(32, 40, device=device), E4M3)
    b2, sb2 = quantize(torch.randn(16, 40, device=device), E4M3)
    with pytest.raises(ValueError, match="K = 40 must be a multiple of 16"):
        fp8_gemm(a2, b2, sa2, sb2)
    _, sa_row = quantize(torch.randn(32, 128, device=device), E4M3, "row")
    with pytest.raises(ValueError, match=r"match no supported granularity.*row: \(32, 1\) and \(32, 1\)"):
        fp8_gemm(a, b, sa_row, sb)
    with pytest.raises(ValueError, match="match no supported granularity"):
        fp8_gemm(a, b, torch.ones(32, 3, device=device), torch.ones(1, 1, device=device))
    with pytest.raises(TypeError, match="a_scale must be float32"):
        fp8_gemm(a, b, sa.double(), sb)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        fp8_gemm(a, b, sa, sb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(32,\)"):
        fp8_gemm(a, b, sa, sb, bias=torch.ones(31, device=device))
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8_gemm(a, b, sa, sb, backend="cublas")
    if device == "cpu":
        with pytest.raises(ValueError, match="backend='scaled_mm' needs CUDA"):
            fp8_gemm(a, b, sa, sb, backend="scaled_mm")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="b is on cpu but a is on cuda"):
            fp8_gemm(a.cuda(), b.cpu(), sa.cuda(), sb.cuda())
        with pytest.raises(ValueError, match="a_scale is on cpu but a is on cuda"):
            fp8_gemm(a.cuda(), b.cuda(), sa.cpu(), sb.cuda())


_LOWERING_SCRIPT = textwrap.dedent(
    """
    import inspect, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from xkernels.fp8 import gemm, quant

    def build(kernel, ptrs, consts, cc):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
        # What a real launch specialises: 16-byte aligned pointers and leading strides.
        aligned = [n for n in names if n in ptrs or n in ("stride_am", "stride_bn", "stride_cm", "K")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=8, num_stages=3))

    gemm_ptrs = {"a_ptr": "*fp8e5", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "bias_ptr": "*fp32",
                 "sa_ptr": "*fp32", "sb_ptr": "*fp32"}
    for cc, tma, mode in ((90, True, 2), (90, False, 0), (89, False, 1)):
        consts = dict(stride_ak=1, stride_bk=1, stride_cn=1, SCALE_MODE=mode, SB_ROWS=128, HAS_BIAS=True,
                      USE_TMA=tma, FAST_ACCUM=False, FLAT=True, C_TMA=tma, BM=128, BN=128, BK=128, GROUP_M=8)
        k = build(gemm._fp8_gemm_kernel, gemm_ptrs, consts, cc)
        assert ("wgmma" in k.asm["ptx"]) == (cc == 90), cc
        assert k.metadata.shared >= 2 * 2 * 128 * 128, "K loop not software-pipelined (single-buffered)"
    # Accumulation precision on Hopper: by default the tensor/row pairings promote the wgmma accumulator into
    # fp32 after every K tile (fp32 adds of the partial product); fast_accum keeps the whole loop in wgmma.
    adds = {}
    for fast in (True, False):
        consts = dict(stride_ak=1, stride_bk=1, stride_cn=1, SCALE_MODE=0, SB_ROWS=1, HAS_BIAS=False,
                      USE_TMA=True, FAST_ACCUM=fast, FLAT=True, C_TMA=True, BM=128, BN=128, BK=128, GROUP_M=8)
        adds[fast] = build(gemm._fp8_gemm_kernel, gemm_ptrs, consts, 90).asm["ptx"].count("add.f32")
    assert adds[False] >= adds[True] + 128 * 128 // 256, adds  # one fp32 add per accumulator register
    from xkernels.fp8 import _aot
    for name, consts, warps, stages in _aot.cast_variants():
        ptx = build(quant._cast_kernel, _aot.CAST_PTRS, consts, 90).asm["ptx"]
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx, name
        assert "div.full.f32" not in ptx, "approximate divide where the code asks for IEEE"
    print("lowered")
    """
)


@pytest.mark.slow
def test_kernels_lower_for_hopper_and_ada():
    """Compile (no GPU needed) the GEMM for sm_90 (TMA + wgmma, pipelined) and sm_89, and the cast kernel
    (hardware RNE saturating cvt, IEEE division): catches GPU-only lowering errors the interpreter cannot see."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget to compile ahead of time: {err}")
    from aot_worker import run_script

    assert "lowered" in run_script(_LOWERING_SCRIPT, timeout=300)


def _aot_rows(script: str) -> list[tuple]:
    """Run an _aot script without the interpreter (kernels must be compiled, not interpreted); parse its rows."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget to compile ahead of time: {err}")
    from aot_worker import run_script

    stdout = run_script(textwrap.dedent(script), timeout=600)
    rows = [line.split() for line in stdout.splitlines() if line.startswith("ROW ")]
    assert rows, stdout
    return [(r[1], int(r[2]), int(r[3])) for r in rows]


@pytest.mark.slow
def test_cast_kernel_registers_sm90():
    """Every cast/cast-transpose variant: <= 144 registers and no spills on sm_90a (the whole-tile kernel took
    209-255, one program per SM), with the launch's own num_warps/num_stages."""
    rows = _aot_rows(
        """
        from xkernels.fp8 import _aot
        for name, st in _aot.table(90, kernels=("cast",)):
            print("ROW", name, st.registers, st.spill_stores)
        """
    )
    assert len(rows) == 7
    for name, regs, spills in rows:
        assert spills == 0 and regs <= 144, (name, regs, spills)


@pytest.mark.slow
def test_block_scaled_gemm_configs_are_spill_free_sm90():
    """Every autotune config a block-scaled launch can pick (1x128 b scales with and without TMA: the wgrad GEMM,
    which spilled worst; 128x128 b scales with TMA: forward and dgrad) compiles for sm_90a without spills."""
    rows = _aot_rows(
        """
        from xkernels.fp8 import _aot, gemm
        flat = ("flat",)  # (the nested structure's configs: the AOT gate, benchmarks/results/aot-sm_90a.md)
        variants = [*_aot.gemm_variants(90, ("block_1x128",), structures=flat),
                    *_aot.gemm_variants(90, ("block",), use_tma=(True,), structures=flat)]
        for name, consts, warps, stages in variants:
            st = _aot.compile_kernel(gemm._fp8_gemm_kernel, _aot.GEMM_PTRS, consts, num_warps=warps,
                                     num_stages=stages, aligned=_aot.GEMM_ALIGNED)
            print("ROW", name, st.registers, st.spill_stores)
        """
    )
    assert len(rows) == 2 * 2 + 4
    for name, regs, spills in rows:
        assert spills == 0, (name, regs, spills)


_STRUCTURE_SCRIPT = """
    import json
    from xkernels.aot import compile_kernel, occupancy, ptx_facts
    from xkernels.fp8 import _aot, gemm

    cases = {"tensor_flat": ("tensor", "flat", 64, 128, 4, 4), "block_flat": ("block", "flat", 128, 128, 8, 4),
             "block_nested": ("block", "nested", 128, 128, 8, 4)}
    out = {}
    for key, (mode, structure, bm, bn, warps, stages) in cases.items():
        consts = dict(stride_ak=1, stride_bk=1, stride_cn=1, SCALE_MODE=gemm.SCALE_MODES[mode],
                      SB_ROWS=128 if mode == "block" else 1, HAS_BIAS=True, USE_TMA=True, FAST_ACCUM=False,
                      FLAT=structure == "flat", C_TMA=structure == "flat", BM=bm, BN=bn, BK=128, GROUP_M=8)
        st = compile_kernel(gemm._fp8_gemm_kernel, _aot.GEMM_PTRS, consts, num_warps=warps, num_stages=stages,
                            aligned=_aot.GEMM_ALIGNED)
        out[key] = dict(ptx_facts(st.ptx), registers=st.registers, spills=st.spill_bytes,
                        blocks=occupancy(st.registers, st.shared, warps).blocks)
    print("FACTS " + json.dumps(out))
"""


@pytest.mark.slow
def test_gemm_main_loop_structure_sm90():
    """What the flattened persistent GEMM must keep, read from its sm_90a PTX (xkernels.aot.loop_facts): one loop
    around the wgmma (no per-tile TMA prologue), the epilogue's TMA stores inside that loop after the next K-steps'
    TMA loads (in flight across the epilogue), and at most 3 scale loads per K-step of the 128x128-block GEMM
    (2 activation-scale words + 1 weight scale). The nested structure (kept for A/B runs) shows what each fact
    catches: a 3-stage prologue re-issued per tile and 34 scale loads per K-step."""
    pytest.importorskip("triton.backends.compiler")
    from aot_worker import run_script

    stdout = run_script(textwrap.dedent(_STRUCTURE_SCRIPT), timeout=600)
    facts = json.loads([ln for ln in stdout.splitlines() if ln.startswith("FACTS ")][-1][len("FACTS "):])
    for key in ("tensor_flat", "block_flat"):
        f = facts[key]
        assert f["mma_loop_depth"] == 1 and f["tile_prologue_loads"] == 0, (key, f)
        assert f["epilogue_in_loop"] and f["loads_before_stores"] >= 2 and f["tma_stores"] >= 2, (key, f)
        assert f["global_stores"] == 0 and f["spills"] == 0, (key, f)
    assert facts["tensor_flat"]["kstep_global_loads"] == 0, facts["tensor_flat"]
    assert facts["block_flat"]["kstep_global_loads"] <= 3, facts["block_flat"]
    old = facts["block_nested"]
    assert old["mma_loop_depth"] == 2 and old["tile_prologue_loads"] >= 2 * (4 - 1), old
    assert old["kstep_global_loads"] >= 32 and not old["epilogue_in_loop"] and old["tma_stores"] == 0, old
    assert facts["block_flat"]["registers"] < old["registers"], facts


def test_gemm_configs_per_mode_and_m_bucket():
    from xkernels.fp8.gemm import gemm_configs, m_bucket

    for mode in ("tensor", "row", "block", "block_1x128"):
        for fast in (False, True):
            configs = gemm_configs(mode, fast_accum=fast)
            assert configs and all(c.BK == 128 for c in configs)
            # sm_89 (~99 KiB of shared memory) gets only configs that fit
            assert all(c.num_stages * (c.BM + c.BN) * c.BK <= 99 * 1024 for c in gemm_configs(mode, cc=89))
    assert len(gemm_configs("tensor", fast_accum=True)) > len(gemm_configs("tensor"))
    with pytest.raises(ValueError, match="mode must be one of"):
        gemm_configs("blocks")
    assert [m_bucket(m) for m in (1, 16, 17, 4096, 4097, 8192)] == [16, 16, 32, 4096, 8192, 8192]
