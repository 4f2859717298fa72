"""Test helpers that other trainers can use too: count Triton launches, forbid host synchronisation.

* :func:`count_launches` -- which ``@triton.jit`` kernels ran inside a block (compiled on a GPU, or through
  Triton's CPU interpreter).  A parity test that compares a kernel with its reference must also show that the
  kernel ran: with ``TRITON_INTERPRET`` unset on a CPU-only machine both sides would be the reference.
* :func:`no_host_sync` -- fails at the first operation inside a block that makes the host wait for the device
  (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, data-dependent shapes such as ``nonzero``).  Such an
  operation stalls the CPU on a GPU, breaks CUDA-graph capture and splits a ``torch.compile`` graph.  Run on a
  CPU it finds the same operations, so the check works without a GPU.
* :func:`round_casts_like_gpu` -- makes Triton's CPU interpreter round fp32 -> bf16 casts to nearest even, as a GPU
  does (the interpreter truncates), so a kernel's bf16 results under test are the values a GPU would store and its
  parity tests can hold the Triton path to the PyTorch path's tolerances.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "count_launches", "no_host_sync", "round_casts_like_gpu", "rounds_casts_like_gpu"]


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter]:
    """``with count_launches() as launches: ...`` -- ``launches[name]`` is how often kernel ``name`` ran.

    Counts every launch of a ``@triton.jit`` function (autotuned ones count once per launch, not per config
    tried), compiled or interpreted.  Names are the Python function names (``"_rmsnorm_fwd_kernel"``).
    """
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    launches: collections.Counter = collections.Counter()
    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not kwargs.get("warmup", False):
                launches[self.fn.__name__] += 1
            return _original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        yield launches
    finally:
        for cls, original in patched:
            cls.run = original


class HostSyncError(RuntimeError):
    """An operation inside :func:`no_host_sync` would make the host wait for the device."""


# Tensor methods that hand a device value to Python (seen by a TorchFunctionMode: on a CPU tensor ``tolist``
# never reaches the aten dispatcher) ...
_SYNCING_METHODS = {
    "tolist": "reads the tensor on the host",
    "item": "reads a value on the host",
    "__bool__": "bool(t) / `if t:` reads a value on the host",
    "__int__": "int(t) reads a value on the host",
    "__float__": "float(t) reads a value on the host",
    "__index__": "using a tensor as an int (range(t), shapes) reads it on the host",
    "__complex__": "complex(t) reads a value on the host",
}
# ... and aten ops that read device memory on the host (also from C++) or whose output shape depends on the data
_SYNCING_OPS = {
    "aten::_local_scalar_dense": "reads a value on the host",
    "aten::is_nonzero": "reads a value on the host",
    "aten::equal": "torch.equal returns a Python bool",
    "aten::nonzero": "nonzero has a data-dependent output shape",
    "aten::masked_select": "masked_select has a data-dependent output shape",
    "aten::unique_dim": "unique has a data-dependent output shape",
    "aten::_unique2": "unique has a data-dependent output shape",
    "aten::repeat_interleave": "repeat_interleave(Tensor) without output_size has a data-dependent shape",
}


class _NoSyncMethods(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCING_METHODS:
            raise HostSyncError(f"Tensor.{name} would synchronise the host with the device: {_SYNCING_METHODS[name]}")
        return func(*args, **(kwargs or {}))


class _NoSyncOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNCING_OPS and not (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size")):
            raise HostSyncError(f"{func} would synchronise the host with the device: {_SYNCING_OPS[name]}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise :class:`HostSyncError` at the first host-synchronising operation run inside the block.

    Sees the forward and (when ``backward()`` is called inside the block) the backward of every op: tensor
    methods that return Python values, and aten ops reached from Python or C++.  Meant for eager code (not
    inside ``torch.compile``).  Copies between devices are not flagged (the tests run on one device).
    """
    with _NoSyncMethods(), _NoSyncOps():
        yield


# --------------------------------------------------------------------------------------------------------------------
# GPU rounding in Triton's CPU interpreter
# --------------------------------------------------------------------------------------------------------------------
def _bf16_bits_rne(values) -> "numpy.ndarray":
    """fp32 values -> bf16 bit patterns (uint16), rounded to nearest, ties to even: what ``cvt.rn.bf16.f32`` on a GPU
    and ``Tensor.bfloat16()`` give.  Overflow rounds to inf; a NaN stays a (quiet) NaN with its sign."""
    import numpy as np

    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def rounds_casts_like_gpu() -> bool:
    """Whether :func:`round_casts_like_gpu` is in force in this process."""
    from triton.runtime import interpreter

    return getattr(interpreter.InterpreterBuilder.cast_impl, "_xk_rounds_like_gpu", False)


def round_casts_like_gpu() -> None:
    """Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) round casts to bf16 to nearest even, as a GPU does.

    The interpreter (Triton 3.6 and 3.9) truncates an fp32 -> bf16 cast -- ``x.to(tl.bfloat16)``, or an fp32 value
    stored through a bf16 pointer -- so about half of all bf16 values a kernel stores come out one ulp low, which
    doubles a kernel's bf16 error under test and hides rounding-level bugs.  After this call those casts give the
    GPU's ``cvt.rn.bf16.f32`` result bit for bit (NaN, inf and overflow included).  Casts from fp16 and fp64 go
    through fp32 first (fp16 -> fp32 is exact; fp64 is rounded twice, which can differ from the GPU's single rounding
    in a tie of a tie, never seen in practice).  Casts to fp16 need no patch: the interpreter uses numpy's, which
    rounds to nearest even.  Idempotent; process-wide; meant for test sessions (``tests/conftest.py`` calls it).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if rounds_casts_like_gpu():
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        src_type, dst = src.dtype.scalar, dst_type.scalar
        if dst == tl.bfloat16 and src_type != tl.bfloat16 and src_type.is_floating():
            data = src.data if src_type != tl.float64 else src.data.astype(np.float32)
            return interpreter.TensorHandle(_bf16_bits_rne(data.astype(np.float32, copy=False)), dst)
        return truncating(self, src, dst_type)

    cast_impl._xk_rounds_like_gpu = True
    cast_impl._xk_truncating = truncating
    builder.cast_impl = cast_impl
