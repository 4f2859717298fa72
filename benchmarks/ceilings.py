"""Measured ceilings every benchmark is compared with: device copy bandwidth and dense matmul rates.

Measured once per run (``pytest`` session or ``python -m benchmarks.report``) on the device the benchmarks use,
never taken from a data sheet:

* ``copy_gbps``           -- ``dst.copy_(src)`` of a large buffer; bytes = read + write.  CUDA: 2 x 1 GiB bf16.
* ``matmul_bf16_tflops``  -- ``a @ b`` in bf16, 2*M*N*K FLOPs.  CUDA: 8192^3.  CPU: 512^3.
* ``matmul_fp8_tflops``   -- ``torch._scaled_mm`` E4M3 x E4M3 -> bf16 with tensor scales at 8192^3 (CUDA with
  compute capability >= 8.9 only; otherwise absent).
* ``matmul_fp32_tflops``  -- ``a @ b`` in fp32 (CPU only, 1024^3: the dtype the CPU suite runs in).

Each figure is the best of several timed repetitions after a warm-up (CUDA events on CUDA; process CPU time, all
threads, on CPU -- so CPU figures are per CPU-second, consistent with the CPU benchmarks).  ``XK_BENCH_CEILINGS``
may name a JSON file holding a previous measurement; the report command measures once and passes it to pytest
that way so the suite does not measure again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch

ENV_VAR = "XK_BENCH_CEILINGS"
_cache: dict | None = None


def best_seconds(fn: Callable[[], object], reps: int, device: torch.device, warmup: int = 2) -> float:
    """Best wall time of ``fn()`` over ``reps`` repetitions (CUDA events on CUDA), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)
    times = []  # CPU: process CPU time, like the CPU benchmarks (robust to other jobs on a shared machine)
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def _copy_gbps(device: torch.device) -> float:
    n = (1 << 29) if device.type == "cuda" else (1 << 23)  # 1 GiB bf16 on CUDA, 32 MiB fp32 on CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    t = best_seconds(lambda: dst.copy_(src), reps=10, device=device)
    return 2 * src.numel() * src.element_size() / t / 1e9


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = best_seconds(lambda: a @ b, reps=reps, device=device)
    return 2 * n**3 / t / 1e12


def _fp8_tflops(device: torch.device, n: int = 8192) -> float | None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return None
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    try:
        t = best_seconds(
            lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            reps=10,
            device=device,
        )
    except (RuntimeError, TypeError):
        return None
    return 2 * n**3 / t / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure(device: torch.device | str | None = None) -> dict:
    """Measure the ceilings on ``device`` (default: CUDA when available, else CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out: dict = {"device": device_name(device), "device_type": device.type, "copy_gbps": _copy_gbps(device)}
    if device.type == "cuda":
        out["matmul_bf16_tflops"] = _matmul_tflops(device, torch.bfloat16, 8192, reps=10)
        fp8 = _fp8_tflops(device)
        if fp8 is not None:
            out["matmul_fp8_tflops"] = fp8
    else:
        out["matmul_bf16_tflops"] = _matmul_tflops(device, torch.bfloat16, 512, reps=5)
        out["matmul_fp32_tflops"] = _matmul_tflops(device, torch.float32, 1024, reps=5)
    return out


def get() -> dict:
    """The ceilings of this run: from ``$XK_BENCH_CEILINGS`` when set, else measured once and cached."""
    global _cache
    if _cache is None:
        path = os.environ.get(ENV_VAR)
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                _cache = json.load(f)
        else:
            _cache = measure()
    return _cache


def matmul_key(dtype: torch.dtype) -> str:
    """The ceiling key a GEMM in ``dtype`` is compared with."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "matmul_fp8_tflops"
    if dtype == torch.float32:
        return "matmul_fp32_tflops"
    return "matmul_bf16_tflops"


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
