"""Ahead-of-time compile gate: ``python -m benchmarks.aot --arch sm_90a --out DIR`` (no GPU needed).

Compiles every ``@triton.jit`` kernel of ``xkernels`` for a CUDA architecture with the installed Triton, as a real
launch on that GPU would specialise it, and reads off what only the GPU build shows: registers, spills, shared
memory and the PTX instructions that matter.  Writes ``DIR/aot-<arch>.json`` and ``DIR/aot-<arch>.md`` and exits
non-zero on

* any register spill (ptxas ``bytes spill stores/loads`` > 0),
* shared memory above the architecture's per-block limit (sm_90a 227 KiB, sm_89 99 KiB, sm_80 163 KiB),
* an approximate division (``div.full.f32`` / ``div.approx.f32``) in a kernel whose source asks for IEEE division
  (``tl.div_rn`` or ``tl.fdiv(..., ieee_rounding=True)``) without any ``div.rn.f32`` in its PTX -- e.g. Triton 3.6
  ignores ``ieee_rounding=True``,
* a compile error on an architecture the kernel supports,
* a structural regression named in :data:`STRUCTURE_RULES` (the flattened FP8 GEMM: per-tile pipeline prologue,
  epilogue without in-flight loads / TMA store, per-K-step scale reloads), read from the PTX by
  :func:`xkernels.aot.loop_facts`.

Every row also reports the theoretical occupancy (:func:`xkernels.aot.occupancy`) and, for MMA kernels, the main
loop's facts (loop depth, per-tile prologue loads, ``ld.global`` per K-step, loads in flight before the epilogue's
stores, TMA stores).

How the variants are found (so the table follows the launchers when their configs change):

1. **Capture.**  A child process with ``TRITON_INTERPRET=1`` runs :data:`SCENARIOS` -- the public ops, forward and
   backward, at the 1.3 B model's shapes (hidden 1536, FFN 3840, 24/8 heads of 64, vocab 129,280) -- with every
   Triton launch intercepted and *not executed* (outputs stay uninitialised; only the arguments matter).  Launcher
   choices that depend on the interpreter (``interpreting()``) are answered "compiled", as on a GPU.  Each launch is
   recorded with its argument types, the values of its ``constexpr`` parameters and ``num_warps``/``num_stages``.
2. **Specialise** as Triton's launcher does: tensors -> typed pointers, with ``tt.divisibility=16`` when the data
   pointer is 16-byte aligned; integers equal to 1 -> the constant 1; other integers ``i32``/``i64``, divisible by
   16 -> ``tt.divisibility=16``; ``None`` -> constant.
3. **CUDA-only launch paths** the CPU capture cannot see are listed in :data:`CUDA_VARIANTS`: the FP8 GEMM is
   autotuned on CUDA (every config of its autotuner is compiled) and takes the TMA path on sm_90.
4. **Compile** each distinct variant with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
   run Triton's bundled ``ptxas -v`` on the PTX for registers and spills.

FP8 kernels need sm_89+ (:data:`MIN_CC`).  ``--kernels a,b`` keeps kernels whose name contains one of the words;
``--list`` prints the captured variants without compiling.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from xkernels.aot import ARCHS, compile_signature, occupancy, ptx_facts

ROOT = Path(__file__).resolve().parents[1]

SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_89": 99 * 1024, "sm_80": 163 * 1024}
# Kernels (by module prefix) that need a minimum compute capability: fp8 types exist from sm_89.
MIN_CC = {"xkernels.fp8.": 89}

# The model's shapes (Xmodel-2.5, 1.3 B): a handful of rows is enough, only the column sizes set the configs.
HIDDEN, FFN, N_Q, N_KV, HEAD_DIM, VOCAB = 1536, 3840, 24, 8, 64, 129280
ROWS = 64


# ------------------------------------------------------------------------------------------------ scenarios
def _rmsnorm(torch, xk):
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
        r = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
        w = torch.ones(HIDDEN, dtype=dtype, requires_grad=True)
        xk.rms_norm(x, w).sum().backward()
        for scale in (None, 1.4 / 48**0.5):  # the model folds the residual-branch multiplier into the add
            y, s = xk.add_rms_norm(x, r, w, scale=scale)
            (y.sum() + s.sum()).backward()
        # issue 19 options: Gemma (offset + fp32-inside "gemma" casting), "none" casting, weight-free
        xk.rms_norm(x, w, offset=1.0, casting_mode="gemma").sum().backward()
        xk.rms_norm(x, w, offset=1.0, casting_mode="none").sum().backward()
        xk.rms_norm(x, None).sum().backward()
    # issue 21 item 4: the selectable launch structures (warp-per-row forward, one-program-per-SM backward)
    import importlib

    rn = importlib.import_module("xkernels.rmsnorm")
    saved = rn.FWD_LAYOUT, rn.BWD_SCHEDULE
    rn.FWD_LAYOUT, rn.BWD_SCHEDULE = "warp_per_row", "per_sm"
    try:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
            r = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
            w = torch.ones(HIDDEN, dtype=dtype, requires_grad=True)
            xk.rms_norm(x, w).sum().backward()
            y, s = xk.add_rms_norm(x, r, w, scale=1.4 / 48**0.5)
            (y.sum() + s.sum()).backward()
    finally:
        rn.FWD_LAYOUT, rn.BWD_SCHEDULE = saved


def _rotary(torch, xk):
    cos, sin = xk.rotary_cos_sin(4096, HEAD_DIM, theta=500000.0)
    for pos in (None, torch.arange(16).unsqueeze(0)):
        q = torch.randn(1, 16, N_Q, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 16, N_KV, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
        qo, ko = xk.apply_rotary(q, k, cos, sin, position_ids=pos)
        (qo.float().sum() + ko.float().sum()).backward()
    with torch.no_grad():
        xk.apply_rotary(q.detach().clone(), k.detach().clone(), cos, sin, inplace=True)
    qo, ko = xk.apply_rotary(q, k, cos, sin, kernel="token")  # the earlier kernel, kept for timing side by side
    (qo.float().sum() + ko.float().sum()).backward()
    qo, ko = xk.apply_rotary(q, k, cos[:, : HEAD_DIM // 2].contiguous(), sin[:, : HEAD_DIM // 2].contiguous())
    (qo.float().sum() + ko.float().sum()).backward()  # partial rotary (the pass-through copy)


def _swiglu(torch, xk):
    g = torch.randn(ROWS, FFN, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(ROWS, FFN, dtype=torch.bfloat16, requires_grad=True)
    xk.swiglu(g, u).float().sum().backward()
    x = torch.randn(ROWS, 2 * FFN, dtype=torch.bfloat16, requires_grad=True)
    xk.swiglu_fused(x).float().sum().backward()
    xk.geglu(g, u).float().sum().backward()
    xk.geglu_fused(x).float().sum().backward()


def _layernorm(torch, xk):
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(ROWS, HIDDEN, dtype=dtype, requires_grad=True)
        w = torch.ones(HIDDEN, dtype=dtype, requires_grad=True)
        b = torch.zeros(HIDDEN, dtype=dtype, requires_grad=True)
        xk.layer_norm(x, w, b).sum().backward()
        xk.layer_norm(x, None, None).sum().backward()


def _cross_entropy(torch, xk):
    # The chunk kernel sees (rows, vocab) logits: the hidden size only sets the chunking, so keep it small here.
    h = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(VOCAB, 64, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, VOCAB, (16,))
    xk.linear_cross_entropy(h, w, t, logit_scale=1 / 6).backward()
    with torch.no_grad():
        xk.linear_cross_entropy(h, w, t, logit_scale=1 / 6)
    # every option on (smoothing with class weights, soft cap, z-loss, bias) and the per-token backward
    cw, b = torch.rand(VOCAB) + 0.5, torch.zeros(VOCAB, dtype=torch.bfloat16, requires_grad=True)
    opts = dict(ce_weight=cw, label_smoothing=0.1, softcap=30.0, lse_square_scale=1e-4, bias=b)
    xk.linear_cross_entropy(h, w, t, logit_scale=1 / 6, **opts).backward()
    xk.linear_cross_entropy(h, w, t, reduction="none", label_smoothing=0.1).sum().backward()
    # cross_entropy on ready logits (same kernel; fp32 logits too)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4, VOCAB, dtype=dtype, requires_grad=True)
        xk.cross_entropy(x, t[:4], label_smoothing=0.1, softcap=30.0, weight=cw).backward()


def _fp8(torch, xk):
    from xkernels.fp8 import FP8Linear, FP8Recipe, cast_transpose, fp8_gemm, quantize

    x = torch.randn(ROWS * 2, HIDDEN, dtype=torch.bfloat16)
    for fmt in (torch.float8_e4m3fn, torch.float8_e5m2):
        for gran in ("tensor", "row", "block_1x128", "block_128x128"):
            quantize(x, fmt, gran)
            cast_transpose(x, fmt, gran, pad_to=16, return_amax=True)
    for name in ("delayed", "current", "row", "block"):
        layer = FP8Linear(HIDDEN, FFN, bias=False, recipe=FP8Recipe.from_name(name)).to(torch.bfloat16)
        # 256 tokens: the weight-gradient GEMM contracts over tokens, and with one 128-token block its 1x128 x 1x128
        # scales would have the row pairing's shapes (and launch as it): two blocks make it the block pairing.
        inp = torch.randn(ROWS * 4, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        layer(inp).float().sum().backward()
    a, sa = quantize(x, torch.float8_e4m3fn, "row")
    b, sb = quantize(torch.randn(FFN, HIDDEN, dtype=torch.bfloat16), torch.float8_e4m3fn, "row")
    fp8_gemm(a, b, sa, sb, bias=torch.zeros(FFN), out_dtype=torch.bfloat16)
    # fp32 output (a weight gradient for fp32 master weights): the flat kernel's TMA-store staging is twice as big
    a, sa = quantize(torch.randn(FFN, ROWS * 4, dtype=torch.bfloat16), torch.float8_e5m2, "block_1x128")
    b, sb = quantize(torch.randn(HIDDEN, ROWS * 4, dtype=torch.bfloat16), torch.float8_e4m3fn, "block_1x128")
    fp8_gemm(a, b, sa, sb, out_dtype=torch.float32)


def _newton_schulz(torch, xk):
    from xkernels import newton_schulz

    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((HIDDEN, HIDDEN), (HIDDEN, FFN), (N_KV * HEAD_DIM, HIDDEN), (4, N_KV * HEAD_DIM, N_KV * HEAD_DIM)):
            newton_schulz(torch.randn(*shape), steps=1, dtype=dtype)


SCENARIOS = {
    "rmsnorm": _rmsnorm,
    "rotary": _rotary,
    "swiglu": _swiglu,
    "layernorm": _layernorm,
    "cross_entropy": _cross_entropy,
    "fp8": _fp8,
    "newton_schulz": _newton_schulz,
}


def _fp8_gemm_variants(cc: int, spec: dict) -> list[dict]:
    """On CUDA the FP8 GEMM launcher uses its autotuner (all configs) and, on sm_90 with descriptors, TMA (and a TMA
    store of C where its rows are 16-byte aligned); both kernel structures (``gemm.STRUCTURES``) are compiled."""
    from xkernels.fp8 import gemm

    arg = lambda name, default: spec["args"].get(name, {}).get("value", default)  # noqa: E731
    mode, sb_rows = int(arg("SCALE_MODE", 0)), int(arg("SB_ROWS", 1))
    fast = bool(arg("FAST_ACCUM", False)) and mode != 2  # as gemm._launch: block scaling always promotes
    configs = gemm.gemm_configs(gemm._mode_name(mode, sb_rows), fast_accum=fast, cc=min(cc, 90)) or [None]
    tma = [False] + ([True] if cc >= 90 and gemm.tma_available() else [])
    c_bytes = {"float32": 4}.get(spec["args"].get("c_ptr", {}).get("dtype"), 2)
    c_aligned = int(arg("N", 0)) * c_bytes % 16 == 0
    out = []
    for cfg in configs:
        for structure in gemm.STRUCTURES:
            for use_tma in tma:
                flat = structure == "flat"
                v = json.loads(json.dumps(spec))
                if "USE_TMA" in v["args"]:
                    v["args"]["USE_TMA"] = {"kind": "bool", "value": use_tma}
                if "FAST_ACCUM" in v["args"]:
                    v["args"]["FAST_ACCUM"] = {"kind": "bool", "value": fast}
                if "FLAT" in v["args"]:
                    v["args"]["FLAT"] = {"kind": "bool", "value": flat}
                if "C_TMA" in v["args"]:
                    v["args"]["C_TMA"] = {"kind": "bool", "value": flat and use_tma and c_aligned}
                if cfg is not None:
                    for k in ("BM", "BN", "BK", "GROUP_M"):
                        v["args"][k] = _encode(getattr(cfg, k))
                    v["num_warps"], v["num_stages"] = cfg.num_warps, cfg.num_stages
                v["variant"] = ("tma" if use_tma else "ptr") + f" {structure}" + (
                    f" cfg{configs.index(cfg)}" if cfg is not None else "")
                out.append(v)
    return out


# Modules whose launchers choose tiles or code paths by ``interpreting()`` (the capture answers False for them).
INTERPRETER_CHOICES = ["xkernels.newton_schulz", "xkernels.fp8.quant"]

# kernel name -> function(cc, captured spec) -> the specs a CUDA launch of that architecture compiles instead.
CUDA_VARIANTS = {"_fp8_gemm_kernel": _fp8_gemm_variants}


# ---------------------------------------------------------------------------------------------------- capture
def _encode(value):
    """A launch argument as JSON: what specialisation needs, nothing more."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    name = getattr(value, "name", None)
    if type(value).__name__ == "dtype" and isinstance(name, str):  # tl.dtype
        return {"kind": "tl_dtype", "value": name}
    if type(value).__name__ == "constexpr":
        return _encode(value.value)
    return {"kind": "other", "value": repr(value)}


def _capture_main(names: list[str]) -> None:
    """Child process (TRITON_INTERPRET=1): run the scenarios, print one JSON list of launch specs."""
    import torch
    import triton.runtime.interpreter as interpreter
    from triton.runtime.autotuner import Autotuner

    import xkernels
    from xkernels import dispatch

    # Launchers that pick settings for the interpreter (smaller tiles, exact-rounding emulation) must pick the GPU's.
    for name in INTERPRETER_CHOICES:
        importlib.import_module(name).interpreting = lambda: False

    specs, seen = [], set()
    current = {"scenario": None}

    def record(fn, args, kwargs, configs=None):
        params = list(inspect.signature(fn.fn).parameters)
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        spec = {
            "kernel": fn.fn.__name__,
            "module": fn.fn.__module__,
            "scenario": current["scenario"],
            "args": {p: _encode(bound[p]) for p in params if p in bound},
            "num_warps": kwargs.get("num_warps", 4),
            "num_stages": kwargs.get("num_stages", 3),
        }
        if configs:
            spec["configs"] = [
                {"kwargs": {k: _encode(v) for k, v in c.kwargs.items()}, "num_warps": c.num_warps, "num_stages": c.num_stages}
                for c in configs
            ]
        key = json.dumps({k: v for k, v in spec.items() if k != "scenario"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            record(self, args, kwargs)

    def tuned_run(self, *args, **kwargs):
        record(self.fn, args, kwargs, configs=self.configs)

    interpreter.InterpretedFunction.run = run
    Autotuner.run = tuned_run
    torch.manual_seed(0)
    errors = {}
    with dispatch.force_backend("triton"):
        for name in names:
            current["scenario"] = name
            try:
                SCENARIOS[name](torch, xkernels)
            except Exception as err:  # noqa: BLE001 -- reported in the table, the gate fails
                errors[name] = f"{type(err).__name__}: {err}"
    print("AOT-CAPTURE " + json.dumps({"specs": specs, "errors": errors}))


def capture(names: list[str]) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--_capture", ",".join(names)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("AOT-CAPTURE "):
            return json.loads(line[len("AOT-CAPTURE "):])
    raise RuntimeError(f"capture failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------- compile
_PTR = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "float8_e4m3fn": "fp8e4nv",
    "float8_e5m2": "fp8e5", "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}


def _decode_const(arg):
    import triton.language as tl

    if arg["kind"] == "tl_dtype":
        return tl.dtype(arg["value"])
    if arg["kind"] == "none":
        return None
    return arg.get("value")


def specialise(kernel, spec: dict):
    """``(signature, constexprs, attrs)`` for ``ASTSource``, as Triton's launcher specialises this launch."""
    params = kernel.params
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(params):
        name = p.name
        arg = spec["args"].get(name)
        if arg is None:  # a parameter with a default the launcher did not pass
            default = inspect.signature(kernel.fn).parameters[name].default
            arg = _encode(default)
        nospec = getattr(p, "do_not_specialize", False)
        if p.is_constexpr or arg["kind"] in ("none", "tl_dtype", "str", "other"):
            sig[name] = "constexpr"
            consts[name] = _decode_const(arg)
        elif arg["kind"] == "tensor":
            sig[name] = "*" + _PTR[arg["dtype"]]
            if arg["aligned"] and not getattr(p, "do_not_specialize_on_alignment", False):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg["kind"] == "bool":
            sig[name] = "i1"
        elif arg["kind"] == "int":
            v = arg["value"]
            if v == 1 and not nospec:
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0 and not nospec:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg["kind"] == "float":
            sig[name] = "fp32"
        else:
            raise TypeError(f"{spec['kernel']}: cannot specialise argument {name}={arg}")
    return sig, consts, attrs


def _asks_ieee_division(kernel) -> bool:
    """Whether the kernel's source (or a @triton.jit helper it calls in the same module) requests IEEE division."""
    import sys as _sys

    mod = _sys.modules.get(kernel.fn.__module__)
    src = kernel.src if isinstance(getattr(kernel, "src", None), str) else inspect.getsource(kernel.fn)
    pattern = r"div_rn\s*\(|ieee_rounding\s*=\s*True"
    if re.search(pattern, src):
        return True
    if mod is None:
        return False
    for name in re.findall(r"\b(_\w+)\s*\(", src):  # helpers called from the kernel
        helper = getattr(mod, name, None)
        if helper is not None and hasattr(helper, "fn") and re.search(pattern, inspect.getsource(helper.fn)):
            return True
    return False


def _config_label(spec: dict, declared: set) -> str:
    """The declared ``tl.constexpr`` values (not the integers Triton specialised to 1) and the tensor dtypes."""
    consts = [f"{k}={_short(v)}" for k, v in spec["args"].items() if k in declared and v["kind"] != "none"]
    dtypes = sorted({v["dtype"] for v in spec["args"].values() if v["kind"] == "tensor"})
    label = " ".join(consts)
    return (f"[{spec['variant']}] " if spec.get("variant") else "") + label + (f" ({'/'.join(dtypes)})" if dtypes else "")


def _safe_label(spec: dict) -> str:
    try:
        import importlib as _il

        kernel = getattr(_il.import_module(spec["module"]), spec["kernel"])
        return _config_label(spec, {p.name for p in kernel.params if p.is_constexpr})
    except Exception:  # noqa: BLE001
        return spec.get("variant") or ""


def _short(arg) -> str:
    v = arg.get("value")
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def compile_spec(spec: dict, arch: str) -> dict:
    module = importlib.import_module(spec["module"])
    kernel = getattr(module, spec["kernel"])
    sig, consts, attrs = specialise(kernel, spec)
    row = {
        "kernel": spec["kernel"],
        "module": spec["module"],
        "scenario": spec["scenario"],
        "config": _config_label(spec, {p.name for p in kernel.params if p.is_constexpr}),
        "num_warps": spec["num_warps"],
        "num_stages": spec["num_stages"],
    }
    t0 = time.monotonic()
    stats = compile_signature(kernel, sig, consts, attrs, num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                              cc=ARCHS[arch])
    row.update(registers=stats.registers, spill_bytes=stats.spill_bytes, shared_bytes=stats.shared)
    row.update(ptx_facts(stats.ptx))
    occ = occupancy(stats.registers, stats.shared, spec["num_warps"], ARCHS[arch])
    row.update(occupancy_blocks=occ.blocks, occupancy=round(occ.fraction, 4), occupancy_limiter=occ.limiter)
    row["asks_ieee_div"] = _asks_ieee_division(kernel)
    row["compile_s"] = round(time.monotonic() - t0, 2)
    return row


def _compile_row(spec: dict, arch: str) -> dict:
    os.environ["TRITON_INTERPRET"] = "0"  # (spawned workers import triton afresh)
    try:
        return compile_spec(spec, arch)
    except Exception as err:  # noqa: BLE001 -- a compile error is a row of the table and fails the gate
        return {"kernel": spec["kernel"], "module": spec["module"], "scenario": spec["scenario"],
                "config": _safe_label(spec), "num_warps": spec["num_warps"],
                "num_stages": spec["num_stages"], "error": _short_error(err)}


def _short_error(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] + (" ... " + lines[-1] if len(lines) > 1 else "") if lines else ""
    return f"{type(err).__name__}: {text[:400]}"


def _consts(row: dict) -> dict:
    """The ``NAME=value`` constexprs of a row's config label."""
    return dict(re.findall(r"\b([A-Z_][A-Z0-9_]*)=(\S+)", row.get("config", "")))


def _fp8_gemm_structure(row: dict) -> list[str]:
    """What the flattened FP8 GEMM (FLAT=1) must keep on Hopper (wgmma), read from its PTX (``loop_facts``): one
    loop around the MMAs with no per-tile pipeline prologue; with a TMA store (C_TMA=1) the stores inside that loop
    after tile loads that are then in flight; with 128x128 weight scales one scalar weight-scale load per K-step
    next to the activation-scale words a thread needs (BM / (8 * warps))."""
    c = _consts(row)
    if c.get("FLAT") != "1" or not row.get("wgmma"):
        return []
    out = []
    if row["mma_loop_depth"] != 1 or row["tile_prologue_loads"]:
        out.append(f"tile loop not flattened (depth {row['mma_loop_depth']}, "
                   f"{row['tile_prologue_loads']} prologue loads per tile)")
    if c.get("C_TMA") == "1" and not (row["tma_stores"] and row["loads_before_stores"]):
        out.append("epilogue not overlapped (no TMA store after in-flight tile loads in the main loop)")
    if c.get("SCALE_MODE") == "2" and c.get("SB_ROWS") == "128":
        limit = 1 + int(c["BM"]) // (8 * row["num_warps"])
        if row["kstep_global_loads"] > limit:
            out.append(f"{row['kstep_global_loads']} scale loads per K-step (> {limit})")
    return out


# kernel name -> function(row) -> structural problems (facts from xkernels.aot.loop_facts)
STRUCTURE_RULES = {"_fp8_gemm_kernel": _fp8_gemm_structure}


def problems(row: dict, arch: str) -> list[str]:
    out = []
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    if row["kernel"] in STRUCTURE_RULES and "mma_loop_depth" in row:
        out += STRUCTURE_RULES[row["kernel"]](row)
    if row["spill_bytes"] > 0:
        out.append(f"spills {row['spill_bytes']} B")
    if row["shared_bytes"] > SHARED_LIMIT[arch]:
        out.append(f"shared {row['shared_bytes']} B > {SHARED_LIMIT[arch]} B")
    if row["asks_ieee_div"] and row["div_rn"] == 0 and (row["div_full"] or row["div_approx"]):
        out.append("approximate divide where the code asks for IEEE")
    return out


def _constexpr_names(spec: dict) -> set:
    """The kernel's ``tl.constexpr`` parameters (their integer values are compiled in, not specialised by class)."""
    try:
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        while not hasattr(kernel, "params") and hasattr(kernel, "fn"):  # autotuner / heuristics wrappers
            kernel = kernel.fn
        return {p.name for p in kernel.params if p.is_constexpr}
    except (ImportError, AttributeError):
        return set()


def _variant_key(spec: dict) -> str:
    """Two launches compile the same code when they differ only in integer values Triton does not specialise on
    (a constexpr integer, e.g. NUM_STAGES=2 vs 3, is compiled in: kept as is)."""
    constexprs = _constexpr_names(spec)

    def norm(arg, name=None):
        if arg["kind"] == "int" and name not in constexprs:
            v = arg["value"]
            return {"kind": "int", "class": "1" if v == 1 else ("d16" if v % 16 == 0 else "n"),
                    "wide": not -(2**31) <= v < 2**31}
        return arg

    body = {k: v for k, v in spec.items() if k not in ("scenario", "args")}
    body["args"] = {k: norm(v, k) for k, v in spec["args"].items()}
    return json.dumps(body, sort_keys=True)


def expand(specs: list[dict], cc: int) -> list[dict]:
    """Captured specs -> the specs a CUDA launch on ``cc`` compiles (autotune configs, CUDA-only variants)."""
    out = []
    for spec in specs:
        if any(spec["module"].startswith(p) and cc < need for p, need in MIN_CC.items()):
            continue
        if spec["kernel"] in CUDA_VARIANTS:
            out += CUDA_VARIANTS[spec["kernel"]](cc, spec)
        elif spec.get("configs"):
            for i, cfg in enumerate(spec["configs"]):
                v = json.loads(json.dumps(spec))
                v["args"].update(cfg["kwargs"])
                v["num_warps"], v["num_stages"], v["variant"] = cfg["num_warps"], cfg["num_stages"], f"cfg{i}"
                v.pop("configs")
                out.append(v)
        else:
            out.append(spec)
    uniq, seen = [], set()
    for s in out:
        key = _variant_key(s)
        if key not in seen:
            seen.add(key)
            uniq.append(s)
    return uniq


# ------------------------------------------------------------------------------------------------- reporting
def _occ_cell(r: dict) -> str:
    if "occupancy_blocks" not in r:
        return "-"
    return f"{r['occupancy_blocks']} ({r['occupancy'] * 100:.0f}%, {r['occupancy_limiter'][0]})"


def _loop_cell(r: dict) -> str:
    if not r.get("mma_loop_depth"):
        return "-"
    return (f"{r['mma_loop_depth']}/{r['tile_prologue_loads']}/{r['kstep_global_loads']}/"
            f"{r['loads_before_stores'] if r['epilogue_in_loop'] else '-'}/{r['tma_stores']}")


def markdown(result: dict) -> str:
    lines = [
        f"# Ahead-of-time compile, {result['arch']} (triton {result['triton']}, torch {result['torch']})",
        "",
        f"{result['date']}. Generated by `python -m benchmarks.aot --arch {result['arch']}` (no GPU): every kernel "
        "variant the launchers make at the 1.3B model's shapes, every autotune config, compiled as a real launch "
        "specialises it. regs/spill from `ptxas -v` (spill = store + load bytes per thread); smem = shared memory "
        "per block; div rn/full = IEEE / approximate fp32 divides in the PTX; wgmma = async MMA instructions; "
        "wait = `wgmma.wait_group` depths; sat = `cvt.rn.satfinite` conversions; occ = theoretical occupancy "
        "(`xkernels.aot.occupancy`: resident blocks/SM and warps/64, with the limiting resource: r registers, "
        "s shared memory, w warps, b the block cap). Main loop (`xkernels.aot.loop_facts`, kernels with MMAs): "
        "depth = loops around the MMAs (1 = flattened persistent loop, 2 = K loop nested in the tile loop), "
        "pro = tile loads re-issued per tile outside the main loop (pipeline prologue), ld/k = `ld.global` per "
        "K-step (scale loads), pre-st = tile loads in flight before the epilogue's stores (epilogue inside the "
        "loop), tma-st = TMA stores.",
        "",
        f"**{'PASS' if not result['failures'] else 'FAIL'}**: {len(result['rows'])} variants, "
        f"{len(result['failures'])} with problems.",
        "",
        "| kernel | config | warps/stages | regs | spill B | smem B | occ | div rn/full | wgmma | wait | sat | "
        "main loop depth/pro/ld-k/pre-st/tma-st | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['config']} | {r['num_warps']}/{r['num_stages']} | | | | | | | | | | "
                         f"**compile error** |")
            continue
        probs = "; ".join(problems(r, result["arch"]))
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['shared_bytes']} | {_occ_cell(r)} | {r['div_rn']}/{r['div_full'] + r['div_approx']} | "
            f"{r['wgmma']} | {','.join(map(str, r['wait_group_depths'])) or '-'} | {r['cvt_satfinite']} | "
            f"{_loop_cell(r)} | {'**' + probs + '**' if probs else ''} |"
        )
    if result.get("capture_errors"):
        lines += ["", "Scenarios that failed to capture:", ""]
        lines += [f"- `{k}`: {v}" for k, v in result["capture_errors"].items()]
    return "\n".join(lines) + "\n"


def run(arch: str, out_dir: Path | None, kernels: list[str] | None, scenarios: list[str] | None,
        list_only: bool = False, extra_specs: list[dict] | None = None, jobs: int = 1) -> tuple[int, dict]:
    import torch
    import triton

    cc = ARCHS[arch]
    cap = capture(scenarios or list(SCENARIOS))
    specs = specs_all = expand(cap["specs"] + (extra_specs or []), cc)
    if kernels:
        specs = [s for s in specs if any(k in s["kernel"] for k in kernels)]
    if list_only:
        for name, err in cap["errors"].items():
            print(f"[aot] scenario {name} failed: {err}")
        for s in specs:
            print(f"{s['kernel']:28s} {s.get('variant') or '':12s} warps={s['num_warps']} stages={s['num_stages']} "
                  f"[{s['scenario']}]")
        return (1 if cap["errors"] else 0), {"specs": specs, "capture_errors": cap["errors"]}
    rows = []

    def report(row):
        rows.append(row)
        status = "; ".join(problems(row, arch)) or "ok"
        print(f"[aot] {row['kernel']} {row['config'][:70]}: "
              + (f"regs {row['registers']} spill {row['spill_bytes']} smem {row['shared_bytes']} " if "registers" in row else "")
              + status, flush=True)

    if jobs > 1 and len(specs) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            for row in pool.map(_compile_row, specs, [arch] * len(specs)):
                report(row)
    else:
        for spec in specs:
            report(_compile_row(spec, arch))
    failures = [{"kernel": r["kernel"], "config": r["config"], "problems": problems(r, arch)} for r in rows if problems(r, arch)]
    captured: dict = {}
    for s in specs_all:
        captured[s["kernel"]] = captured.get(s["kernel"], 0) + 1
    result = {
        "arch": arch,
        "captured": captured,  # kernel -> variants found before --kernels filtered them
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017 (3.10)
        "capture_errors": cap["errors"],
        "failures": failures,
        "rows": rows,
    }
    if cap["errors"]:
        failures.append({"kernel": "(capture)", "config": "", "problems": [f"{k}: {v}" for k, v in cap["errors"].items()]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"aot-{arch}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out_dir / f"aot-{arch}.md").write_text(markdown(result), encoding="utf-8")
    return (1 if failures else 0), result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_capture"]:
        _capture_main(argv[1].split(","))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sm_90a")
    parser.add_argument("--out", type=Path, default=None, help="directory for aot-<arch>.json / .md")
    parser.add_argument("--kernels", default=None, help="comma-separated substrings of kernel names to keep")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--list", action="store_true", help="print the variants found, compile nothing")
    parser.add_argument("--extra-specs", type=Path, default=None, help=argparse.SUPPRESS)  # tests: toy kernels
    args = parser.parse_args(argv)
    scen = args.scenarios.split(",") if args.scenarios else None
    if scen and (bad := [s for s in scen if s not in SCENARIOS]):
        parser.error(f"unknown scenario(s) {bad}; choose from {list(SCENARIOS)}")
    extra = json.loads(args.extra_specs.read_text()) if args.extra_specs else None
    rc, result = run(args.arch, args.out, args.kernels.split(",") if args.kernels else None, scen, args.list, extra, max(1, args.jobs))
    if not args.list:
        n = len(result["rows"])
        print(f"[aot] {args.arch}: {n} variants, {len(result['failures'])} with problems"
              + (f"; wrote {args.out}/aot-{args.arch}.json and .md" if args.out else ""))
        for f in result["failures"]:
            print(f"[aot] FAIL {f['kernel']} {f['config'][:80]}: {'; '.join(f['problems'])}")
    return rc


if __name__ == "__main__":
    # Compiling for a GPU needs real @triton.jit functions, not the interpreter's (the capture child sets it to 1).
    if sys.argv[1:2] != ["--_capture"]:
        os.environ["TRITON_INTERPRET"] = "0"
    sys.exit(main())
