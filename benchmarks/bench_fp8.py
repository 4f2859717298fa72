"""FP8: quantisation, the scaled GEMM and FP8Linear, against torch._scaled_mm (cuBLASLt), bf16 matmul, torchao's
Float8Linear and Transformer Engine.

* quantize: activations (tokens x 1536, bf16) to E4M3 at each granularity; bytes = read bf16 + write fp8 = 3 per
  element.  Contenders: ours, the eager reference (``quantize_ref``) and its torch.compile.
* GEMM ``(M, K) x (N, K)^T``: 8192^3 and the model's shapes at 16384 tokens (q+kv 1536->2048, o 1536->1536,
  gate+up 1536->7680, down 3840->1536); FLOPs 2 M N K, % of the measured FP8 (or bf16) matmul rate.  Ours with
  tensor, row and DeepSeek block scales; ``torch._scaled_mm`` with tensor and row scales; bf16 ``torch.matmul``.
* FP8Linear forward + backward (three GEMMs, 6 M N K FLOPs) at the same model shapes vs bf16 ``nn.Linear``,
  torchao ``Float8Linear`` (tensorwise) and TE ``te.Linear`` under ``fp8_autocast`` when installed.

* MLP block (Linear -> GELU -> Linear, fwd+bwd): FP8Linear eager vs inside one torch.compile per block, bf16 eager
  and compiled, torchao float8 compiled (peer; skipped with the reason when absent or without a GPU).

On CPU the GEMM runs the dequantise-then-matmul reference at small shapes (ratios only).
GPU targets (issue 3): GEMM >= 1.0x torch._scaled_mm at 8192^3 and >= 1.7x bf16; FP8Linear fwd+bwd >= 1.3x bf16.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import ceilings
from benchmarks.common import (
    DEVICE,
    ON_CUDA,
    compile_fn,
    contender,
    import_peer,
    pick,
    randn,
    require_cuda,
    run,
)
from xkernels import fp8
from xkernels.fp8 import gemm as fp8_gemm_module


E4M3 = torch.float8_e4m3fn
ACT = torch.bfloat16
QUANT_SHAPE = pick((16384, 1536), (1024, 1536))
QUANT_GRANULARITIES = ["tensor", "row", "block_1x128"]
GEMM_SHAPES = pick(
    [(8192, 8192, 8192), (16384, 2048, 1536), (16384, 1536, 1536), (16384, 7680, 1536), (16384, 1536, 3840)],
    [(256, 256, 256)],
)  # (M, N, K)
LINEAR_SHAPES = pick(
    [(16384, 2048, 1536), (16384, 1536, 1536), (16384, 7680, 1536), (16384, 1536, 3840)], [(256, 256, 256)]
)


def _shape_id(s):
    return "x".join(map(str, s))


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("granularity", QUANT_GRANULARITIES)
@pytest.mark.parametrize("impl", ["xkernels", "eager", "compile"])
def test_quantize(benchmark, impl, granularity):
    ours = lambda x: fp8.quantize(x, E4M3, granularity)
    fn = contender(impl, ours=ours, eager=lambda x: fp8.quantize_ref(x, E4M3, granularity))
    rows, cols = QUANT_SHAPE
    run(
        benchmark,
        fn=fn,
        make_inputs=lambda: ((randn(rows, cols, dtype=ACT),), None),
        mode="fwd",
        impl=impl,
        family="fp8",
        group=f"fp8 quantize {granularity} {rows}x{cols} bf16->e4m3",
        shape=f"{rows}x{cols}",
        dtype="bfloat16->float8_e4m3fn",
        bytes_moved=3 * rows * cols,
    )


# ------------------------------------------------------------------------------------------------- GEMM
def _scaled_mm_available() -> None:
    require_cuda("torch._scaled_mm (cuBLASLt FP8)")
    if torch.cuda.get_device_capability(DEVICE) < (8, 9) or not hasattr(torch, "_scaled_mm"):
        pytest.skip("torch._scaled_mm needs an FP8 GPU (compute capability >= 8.9)")


# "-nested": the first version of our kernel (K loop nested in the tile loop, pointer-store epilogue, per-column
# weight scales, row-major 1x128 activation scales) next to today's flattened one, for A/B runs on one GPU.
GEMM_IMPLS = ["xkernels", "xkernels-row", "xkernels-block", "xkernels-nested", "xkernels-block-nested", "scaled_mm",
              "scaled_mm-row", "bf16"]


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", GEMM_IMPLS)
def test_fp8_gemm(benchmark, impl, shape):
    m, n, k = shape
    if impl.startswith("scaled_mm"):
        _scaled_mm_available()
    structure = "nested" if impl.endswith("-nested") else "flat"
    gran_a, gran_b = {"row": ("row", "row"), "block": ("block_1x128", "block_128x128")}.get(
        impl.removesuffix("-nested").partition("-")[2], ("tensor", "tensor")
    )

    def make_inputs():
        a_hi, b_hi = randn(m, k, dtype=ACT), randn(n, k, dtype=ACT, scale=k**-0.5)
        if impl == "bf16":
            return (a_hi, b_hi), None
        a, sa = fp8.quantize_ref(a_hi, E4M3, gran_a)
        b, sb = fp8.quantize_ref(b_hi, E4M3, gran_b)
        if structure == "nested":
            sa = sa.contiguous()  # the first version's row-major 1x128 scales (now written M-major)
        if impl.startswith("scaled_mm"):
            sa = sa.reshape(()) if gran_a == "tensor" else sa.reshape(m, 1)
            sb = sb.reshape(()) if gran_b == "tensor" else sb.reshape(1, n)
        return (a, b, sa, sb), None

    if impl == "bf16":
        fn = lambda a, b: a @ b.t()
    elif impl.startswith("scaled_mm"):
        fn = lambda a, b, sa, sb: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=ACT)
    else:

        def fn(a, b, sa, sb):
            with fp8_gemm_module.kernel_structure(structure):
                return fp8.fp8_gemm(a, b, sa, sb, out_dtype=ACT)

    dtype = ACT if impl == "bf16" else E4M3
    run(
        benchmark,
        fn=fn,
        make_inputs=make_inputs,
        mode="fwd",
        impl=impl,
        family="fp8",
        group=f"fp8 gemm {_shape_id(shape)} (MxNxK)",
        shape=_shape_id(shape),
        dtype="bfloat16" if impl == "bf16" else "float8_e4m3fn->bfloat16",
        flops=2 * m * n * k,
        ceiling=ceilings.matmul_key(dtype),
        extra={"scales": "none" if impl == "bf16" else f"{gran_a}/{gran_b}",
               "structure": structure if impl.startswith("xkernels") else None},
    )


# --------------------------------------------------------------------------------------------- FP8Linear
def _torchao_float8(module: torch.nn.Module) -> torch.nn.Module:
    """torchao's float8 training conversion (tensorwise) of the module's linears (a CUDA-only peer)."""
    require_cuda("torchao Float8Linear")
    return import_peer("torchao.float8", "torchao").convert_to_float8_training(module)


def _linear(impl: str, n_in: int, n_out: int) -> torch.nn.Module:
    base = torch.nn.Linear(n_in, n_out, bias=False, device=DEVICE, dtype=ACT)
    if impl == "bf16":
        return base
    if impl == "xkernels":
        return fp8.FP8Linear.from_linear(base, fp8.FP8Recipe())
    if impl == "xkernels-block":
        return fp8.FP8Linear.from_linear(base, fp8.FP8Recipe(scaling="block"))
    if impl == "torchao":
        return _torchao_float8(torch.nn.Sequential(base))
    require_cuda("Transformer Engine")
    te = import_peer("transformer_engine.pytorch", "transformer-engine")
    return te.Linear(n_in, n_out, bias=False, params_dtype=ACT, device="cuda")


def _te_autocast(impl: str):
    if impl != "te":
        return None
    te = import_peer("transformer_engine.pytorch", "transformer-engine")
    recipe_mod = import_peer("transformer_engine.common.recipe", "transformer-engine")
    recipe = recipe_mod.DelayedScaling(
        fp8_format=recipe_mod.Format.HYBRID, amax_history_len=128, amax_compute_algo="max"
    )
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _run_fwdbwd(
    benchmark, impl: str, module, fn, m: int, n_in: int, n_out: int, *, high_precision: bool, group: str, shape: str,
    flops: int,
) -> None:
    """Forward + backward of ``fn(x, w)`` on fresh ``(m, n_in)`` bf16 activations; ``w`` is the module's first
    weight, passed so that the harness resets its ``.grad`` between rounds.  The FP8 contenders are rated against
    the FP8 matmul ceiling on CUDA (bf16's elsewhere: the CPU path is the reference), ``high_precision`` ones
    against bf16's."""
    weight = next(module.parameters())

    def make_inputs():
        return (randn(m, n_in, dtype=ACT, requires_grad=True), weight), randn(m, n_out, dtype=ACT)

    ceiling = ceilings.matmul_key(ACT if high_precision or not ON_CUDA else E4M3)
    run(benchmark, fn=fn, make_inputs=make_inputs, mode="fwdbwd", impl=impl, family="fp8", group=group, shape=shape,
        dtype="bfloat16" if high_precision else "fp8", flops=flops, ceiling=ceiling)  # fmt: skip


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", ["xkernels", "xkernels-block", "bf16", "torchao", "te"])
def test_fp8_linear(benchmark, impl, shape):
    m, n_out, n_in = shape
    module = _linear(impl, n_in, n_out)
    autocast = _te_autocast(impl)

    def fn(x, w):
        if autocast is None:
            return module(x)
        with autocast():
            return module(x)

    _run_fwdbwd(benchmark, impl, module, fn, m, n_in, n_out, high_precision=impl == "bf16",
                group=f"fp8 linear fwdbwd {m}x{n_in}->{n_out}", shape=f"{m}x{n_in}->{n_out}",
                flops=6 * m * n_out * n_in)  # fmt: skip


# ------------------------------------------------------------------------------ compiled MLP block (issue 14)
BLOCK_SHAPE = pick((16384, 1536, 3840), (256, 128, 256))  # (tokens, hidden, intermediate)
BLOCK_IMPLS = ["xkernels", "xkernels-compile", "bf16", "compile", "torchao-compile"]


def _mlp_block(impl: str, hidden: int, inter: int) -> torch.nn.Module:
    """Linear -> GELU -> Linear, as trainers compile it (torchtitan: one torch.compile per block)."""
    block = torch.nn.Sequential(
        torch.nn.Linear(hidden, inter, bias=False, device=DEVICE, dtype=ACT),
        torch.nn.GELU(approximate="tanh"),
        torch.nn.Linear(inter, hidden, bias=False, device=DEVICE, dtype=ACT),
    )
    if impl.startswith("xkernels"):
        fp8.convert_to_fp8(block, fp8.FP8Recipe(), skip=())
    elif impl.startswith("torchao"):
        block = _torchao_float8(block)
    if impl.endswith("compile"):
        block = compile_fn(block)  # FP8Linear traces without graph breaks (tests/test_fp8_compile.py)
    return block


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
def test_fp8_mlp_block(benchmark, impl):
    """FP8Linear inside a compiled MLP block vs the same block eager, bf16 (eager and compiled) and torchao float8
    compiled (skipped, saying why, when torchao is absent or there is no GPU)."""
    m, hidden, inter = BLOCK_SHAPE
    block = _mlp_block(impl, hidden, inter)
    _run_fwdbwd(benchmark, impl, block, lambda x, w: block(x), m, hidden, hidden,
                high_precision=impl in ("bf16", "compile"),
                group=f"fp8 mlp block fwdbwd {m}x{hidden}->{inter}->{hidden}", shape=f"{m}x{hidden}x{inter}",
                flops=2 * 6 * m * hidden * inter)  # fmt: skip
