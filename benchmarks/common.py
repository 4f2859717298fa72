"""The shared benchmark harness: device and shape choice, peers, timing, derived figures.

Timing rules (every module goes through :func:`run`):

* Warm-up calls (which include ``torch.compile`` compilation and Triton autotuning) are excluded; the number of
  timed rounds is chosen from a calibration call so each case costs about the same wall time.
* Fresh random inputs (never zeros), rotated between rounds from a small pool; on CUDA the L2 cache is also
  flushed before every round (a write of 2x its size), so small shapes are not flattered by a warm cache.
* CUDA: each round is timed with CUDA events recorded right before and after the call (pytest-benchmark's timer
  is swapped for :class:`CudaEventTimer`), and the GPU is kept busy across the setup (the flush, then a short
  ``torch.cuda._sleep``) so the launch latency of the first kernel is hidden, as in a training step. CPU:
  ``time.process_time`` (CPU seconds of all threads: robust to other jobs time-slicing a shared machine); CPU
  numbers are meaningful as ratios between contenders only.
* ``extra_info`` of every case: the implementation and its role (``ours``/``baseline``/``peer``), the work
  (``bytes`` or ``flops``), the derived ``gbps``/``tflops`` (from the median round on CUDA, the fastest round on
  CPU), and ``pct_of_ceiling`` against the ceilings of :mod:`benchmarks.ceilings` (measured once per run).

Under ``--benchmark-disable`` (CI) every case runs its setup and call once, untimed.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from benchmarks import ceilings as ceilings_mod

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
SMOKE = os.environ.get("XK_BENCH_SMOKE") == "1"  # tiny round counts (report --cpu-smoke)
CPU_COMPILE = os.environ.get("XK_BENCH_CPU_COMPILE") == "1"
NO_COMPILE = os.environ.get("XK_BENCH_NO_COMPILE") == "1"  # report --no-compile: drop the torch.compile contenders

# Wall time aimed at per case for the timed rounds, and bounds on the round count.
TARGET_S = 0.02 if SMOKE else (0.15 if ON_CUDA else 0.4)
MIN_ROUNDS = 2 if SMOKE else (10 if ON_CUDA else 3)
MAX_ROUNDS = 5 if SMOKE else (200 if ON_CUDA else 40)
WARMUP_CALLS = 1 if SMOKE else 3

BASELINES = ("eager", "bf16")  # plain PyTorch; "xkernels*" are ours; anything else is a peer


def pick(cuda: Any, cpu: Any) -> Any:
    """``cuda`` on a GPU run, ``cpu`` otherwise (shapes, dtypes)."""
    return cuda if ON_CUDA else cpu


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ contenders
def require_cuda(what: str) -> None:
    if not ON_CUDA:
        pytest.skip(f"{what} needs CUDA (no GPU in this run)")


def require_compile() -> None:
    """torch.compile contenders run on CUDA; on CPU inductor's compile time would exceed the suite's budget."""
    if NO_COMPILE:
        pytest.skip("torch.compile contenders disabled (XK_BENCH_NO_COMPILE=1 / report --no-compile)")
    if not ON_CUDA and not CPU_COMPILE:
        pytest.skip("torch.compile contenders run on CUDA only (set XK_BENCH_CPU_COMPILE=1 to include them on CPU)")


def import_peer(module: str, package: str) -> Any:
    """Import an optional peer or skip the case, saying why."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install raising anything else
        pytest.skip(
            f"peer {package} not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        )


def require_attr(obj: Any, name: str, what: str) -> Any:
    """``getattr(obj, name)`` or skip when that API has not landed / is absent in the installed version."""
    value = getattr(obj, name, None)
    if value is None:
        pytest.skip(f"{what} is not available ({getattr(obj, '__name__', obj)}.{name} missing)")
    return value


def compile_fn(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``: one specialised graph per shape, warmed up by :func:`run`."""
    require_compile()
    return torch.compile(fn, dynamic=False)


def contender(impl: str, *, ours: Callable, eager: Callable, peer: Callable[[], Callable] | None = None) -> Callable:
    """The function a case times: ``ours`` for ``"xkernels"``, the plain-PyTorch ``eager``, its torch.compile for
    ``"compile"``, else the function ``peer()`` builds -- called only then, since building a peer may skip the case."""
    if impl == "xkernels":
        return ours
    if impl == "eager":
        return eager
    if impl == "compile":
        return compile_fn(eager)
    if peer is None:
        raise ValueError(f"no contender {impl!r}")
    return peer()


def liger(module: str, name: str, package: str = "liger-kernel") -> Any:
    """``module.name`` from Liger-Kernel (a CUDA-only peer), or skip the case saying which part is missing."""
    require_cuda("Liger-Kernel")
    value = getattr(import_peer(module, package), name, None)
    if value is None:
        pytest.skip(f"{module}.{name} missing in the installed Liger-Kernel")
    return value


def role(impl: str) -> str:
    if impl.startswith("xkernels"):
        return "ours"
    return "baseline" if impl in BASELINES else "peer"


# ------------------------------------------------------------------------------------------------ timing
class CudaEventTimer:
    """A pytest-benchmark timer whose (start, end) pair measures GPU time between two CUDA events.

    pytest-benchmark's pedantic runner calls the timer exactly twice per round (``end - start`` is the duration):
    the first call records the start event and returns 0; the second records the end event, waits for it and
    returns the elapsed seconds.
    """

    __name__ = "cuda_event_timer"

    def __init__(self) -> None:
        self._start: torch.cuda.Event | None = None

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self._start is None:
            self._start = event
            return 0.0
        event.synchronize()
        elapsed = self._start.elapsed_time(event) / 1e3
        self._start = None
        return elapsed


_flush_buffer: torch.Tensor | None = None


def flush_l2() -> None:
    """Overwrite the GPU's L2 cache (asynchronously), then keep the GPU busy ~50 µs more."""
    global _flush_buffer
    if not ON_CUDA:
        return
    if _flush_buffer is None:
        l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 0) or (64 << 20)
        _flush_buffer = torch.empty(max(2 * l2, 128 << 20) // 4, dtype=torch.int32, device=DEVICE)
    _flush_buffer.zero_()
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(100_000)  # ~50 µs at ~2 GHz: covers the host-side launch of the timed call


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def _leaves(args: Sequence[Any]) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad and a.is_leaf]


def backward(out: Any, grads: Any) -> None:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    gs = grads if isinstance(grads, (tuple, list)) else (grads,)
    pairs = [(o, g) for o, g in zip(outs, gs) if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def run(
    benchmark,
    *,
    fn: Callable[..., Any],
    make_inputs: Callable[[], tuple[tuple, Any]],
    mode: str,
    group: str,
    impl: str,
    family: str,
    shape: str,
    dtype: torch.dtype | str,
    bytes_moved: int | None = None,
    flops: int | None = None,
    ceiling: str | None = None,
    pool: int | None = None,
    extra: dict | None = None,
    after_round: Callable[[], None] | None = None,
    warmup: int | None = None,
) -> None:
    """Benchmark ``fn`` on inputs from ``make_inputs() -> (args, grad_outputs)`` in one ``mode``:

    * ``"fwd"``    -- ``fn(*args)`` under ``torch.no_grad()``;
    * ``"fwdbwd"`` -- ``fn(*args)`` then backward of its outputs with ``grad_outputs`` (leaf ``.grad`` reset
      before each round, untimed);
    * ``"bwd"``    -- the forward runs untimed in the setup, the backward is timed;
    * ``"call"``   -- ``fn(*args)`` as is (optimizer and train steps: ``fn`` does all the work).

    ``pool`` input sets are built up front and rotated (default 2 on CUDA, 3 on CPU, 1 when disabled).
    ``ceiling`` is a key of the ceilings (default ``copy_gbps`` when ``bytes_moved`` is given, else the matmul
    rate of ``dtype``). ``after_round`` runs untimed after each round (e.g. to reset optimizer state).
    """
    if mode not in ("fwd", "fwdbwd", "bwd", "call"):
        raise ValueError(f"mode must be fwd, fwdbwd, bwd or call, got {mode!r}")
    benchmark.group = group
    dname = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if ceiling is None and flops is not None and isinstance(dtype, torch.dtype):
        ceiling = ceilings_mod.matmul_key(dtype)
    info = {
        "family": family,
        "impl": impl,
        "role": role(impl),
        "pass": mode,
        "shape": shape,
        "dtype": dname,
        "device": DEVICE.type,
        "timer": "cuda_events" if ON_CUDA else "process_time",
    }
    if bytes_moved is not None:
        info["bytes"] = int(bytes_moved)
    if flops is not None:
        info["flops"] = int(flops)
    info.update(extra or {})
    benchmark.extra_info.update(info)

    n_sets = 1 if benchmark.disabled else (pool or (2 if ON_CUDA else 3))
    sets = [make_inputs() for _ in range(n_sets)]
    counter = [0]

    def setup():
        args, grads = sets[counter[0] % n_sets]
        counter[0] += 1
        for leaf in _leaves(args):
            leaf.grad = None
        if mode == "bwd":
            out = fn(*args)
            flush_l2()
            return (out, grads), {}
        flush_l2()
        return (args, grads), {}

    if mode == "fwd":

        def target(args, grads):
            with torch.no_grad():
                return fn(*args)
    elif mode == "fwdbwd":

        def target(args, grads):
            backward(fn(*args), grads)
    elif mode == "bwd":

        def target(out, grads):
            backward(out, grads)
    else:

        def target(args, grads):
            return fn(*args)

    teardown = (lambda *a, **k: after_round()) if after_round is not None else None

    if benchmark.disabled:
        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=1)
        return

    try:
        elapsed = _warm_up(setup, target, teardown, warmup)
    except Exception as exc:
        if role(impl) != "peer":
            raise
        # A third-party contender that breaks on this install (API drift, unsupported GPU) is reported, not fatal.
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        pytest.skip(f"peer {impl} failed on this install: {type(exc).__name__}: {msg}")
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(elapsed, 1e-6))))
    if hasattr(benchmark, "_timer"):
        # CPU: the process's CPU time (all threads), which other jobs time-slicing a shared CPU do not inflate.
        benchmark._timer = CudaEventTimer() if ON_CUDA else time.process_time
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds)
    sync()
    _derive(benchmark, info, ceiling)


def run_memory_bound(benchmark, fn: Callable[..., Any], make_inputs: Callable[[], tuple[tuple, Any]], *, op: str,
                     family: str, impl: str, mode: str, shape: str, dtype: torch.dtype, bytes_moved: int) -> None:
    """:func:`run` for a memory-bound op (norms, rotary, activations), rated in GB/s against the copy ceiling.
    One group per op, pass, shape and dtype (``"<op> <mode> <shape> <dtype>"``): the contenders compared."""
    group = f"{op} {mode} {shape} {dtype_name(dtype)}"
    run(benchmark, fn=fn, make_inputs=make_inputs, mode=mode, group=group, impl=impl, family=family, shape=shape,
        dtype=dtype, bytes_moved=bytes_moved)  # fmt: skip


def _warm_up(setup, target, teardown, warmup: int | None) -> float:
    """Untimed calls before timing (compilation, autotuning, allocator); returns the last call's seconds."""
    elapsed = 0.0
    for i in range(WARMUP_CALLS if warmup is None else max(1, warmup)):
        a, k = setup()
        sync()
        t0 = time.perf_counter()
        target(*a, **k)
        sync()
        elapsed = time.perf_counter() - t0
        if teardown is not None:
            teardown()
        if i >= 1 and elapsed > TARGET_S:  # slow case: the first call held any compilation; enough warming
            break
    return elapsed


def _derive(benchmark, info: dict, ceiling: str | None) -> None:
    """Add gbps / tflops / pct_of_ceiling (and tokens/s) from the measured time to ``extra_info``."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:
        return
    # CUDA: the median round.  CPU: the fastest round, the one least disturbed by other load on a shared machine.
    t = float(stats.median if ON_CUDA else stats.min)
    derived: dict[str, Any] = {"median_s": float(stats.median), "derived_from": "median" if ON_CUDA else "min"}
    ceil = ceilings_mod.get()
    if "bytes" in info:
        derived["gbps"] = info["bytes"] / t / 1e9
        key, value = ceiling or "copy_gbps", derived["gbps"]
    elif "flops" in info:
        derived["tflops"] = info["flops"] / t / 1e12
        key, value = ceiling or "matmul_bf16_tflops", derived["tflops"]
    else:
        key = value = None
    if key is not None and ceil.get(key):
        derived["ceiling"] = key
        derived["ceiling_value"] = ceil[key]
        derived["pct_of_ceiling"] = 100.0 * value / ceil[key]
    if "tokens" in info:  # train steps: MFU is the model-FLOP rate over the measured matmul ceiling
        derived["tokens_per_s"] = info["tokens"] / t
        if "pct_of_ceiling" in derived:
            derived["mfu_pct"] = derived["pct_of_ceiling"]
    benchmark.extra_info.update(derived)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Fresh N(0, scale^2) data on the benchmark device."""
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)
