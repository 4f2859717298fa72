"""Shared test tables: every public op as one case (inputs builder + function), and an ahead-of-time
compile helper for sm_90a (no GPU needed).

``CASES`` is consumed by tests/test_compile.py (torch._dynamo.explain, opcheck) and tests/test_no_host_sync.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile (sm_90a) of a kernel on a CPU-only machine
# ----------------------------------------------------------------------------------------------------

_AOT_PRELUDE = textwrap.dedent(
    '''
    import json
    import triton  # (bodies use triton.next_power_of_2 etc.)
    from xkernels.aot import compile_kernel

    def aot(kernel, types, consts, num_warps, num_stages=3, aligned=(), cc=90):
        """Compile like a real launch (xkernels.aot) -> {registers, spill_bytes, shared_bytes, cp_async}."""
        st = compile_kernel(kernel, types, consts, num_warps=num_warps, num_stages=num_stages, aligned=aligned, cc=cc)
        return dict(registers=st.registers, spill_bytes=st.spill_bytes, shared_bytes=st.shared,
                    cp_async="cp.async" in st.ptx)
    '''
)


def aot_available() -> str | None:
    """None when ahead-of-time compilation for sm_90a can run here, else why not."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401

        from xkernels.aot import ptxas_path

        ptxas = ptxas_path(90)
    except (ImportError, AttributeError, RuntimeError) as err:
        return f"this Triton cannot compile ahead of time: {err}"
    if not os.path.exists(ptxas):
        return f"Triton's bundled ptxas is missing ({ptxas})"
    return None


# One interpreter for every ahead-of-time script of the session: a fresh one each time cost a start-up (Python,
# torch, triton, xkernels: seconds on a busy 2-core box) per test.  Each script still runs in its own namespace.
_WORKER_LOOP = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    while True:
        header = sys.stdin.readline()
        if not header:
            break
        script = sys.stdin.read(int(header))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(script, "<aot script>", "exec"), {"__name__": "__aot__"})
                ok = True
            except BaseException:
                traceback.print_exc()
                ok = False
        sys.__stdout__.write(json.dumps({"ok": ok, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\\n")
        sys.__stdout__.flush()
    """
)
_worker: subprocess.Popen | None = None


def _aot_worker() -> subprocess.Popen:
    """The session's AOT interpreter (started on first use): TRITON_INTERPRET=0 (jit functions must be real
    JITFunctions) and this checkout first on sys.path."""
    global _worker
    if _worker is None or _worker.poll() is not None:
        import atexit
        import tempfile

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; keep today's default
        _worker = subprocess.Popen([sys.executable, "-c", _WORKER_LOOP], env=env, cwd=root, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile())
        atexit.register(_worker.kill)
    return _worker


def run_script(script: str, timeout: float = 600) -> str:
    """Run ``script`` in the AOT interpreter; its stdout.  A script that raises (or a worker that dies or runs
    past ``timeout``, which is then killed) fails the calling test with the script's stderr."""
    import select

    worker = _aot_worker()
    worker.stdin.write(f"{len(script)}\n{script}")
    worker.stdin.flush()
    ready, _, _ = select.select([worker.stdout], [], [], timeout)
    line = worker.stdout.readline() if ready else ""
    if not line:
        worker.kill()
        worker.wait()  # dead before the next script starts a new one
        raise AssertionError(f"the AOT interpreter died or ran past {timeout} s (exit {worker.poll()})")
    result = json.loads(line)
    assert result["ok"], result["stderr"][-4000:]
    return result["stdout"]


def run_aot(body: str, timeout: int = 300) -> list[dict]:
    """Run ``body`` (Python using ``aot(...)``; it appends dicts to ``rows``) in the AOT interpreter."""
    script = _AOT_PRELUDE + "\nrows = []\n" + textwrap.dedent(body) + "\nprint('AOT-ROWS ' + json.dumps(rows))\n"
    stdout = run_script(script, timeout)
    line = [ln for ln in stdout.splitlines() if ln.startswith("AOT-ROWS ")][-1]
    return json.loads(line[len("AOT-ROWS ") :])


# ----------------------------------------------------------------------------------------------------
# One case per public op (small shapes: every case runs through the interpreter in a few ms)
# ----------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

import xkernels  # noqa: E402


@dataclasses.dataclass(frozen=True)
class OpCase:
    """``fn(*build(device))`` runs the op once and returns a scalar tensor (a weighted sum of its outputs, so
    every output's gradient is non-trivial) or None (optimizer steps).  ``backward``: the scalar is
    differentiable.  ``kernels``: Triton kernels that must launch on the kernel path (forward+backward).
    ``build`` gets ``backend`` too (the optimizer cases pick their Newton–Schulz implementation from it)."""

    name: str
    build: Callable[[str, str], tuple]
    fn: Callable[..., torch.Tensor | None]
    kernels: tuple[str, ...]
    backward: bool = True


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _weights(*shape, device):
    return torch.randn(*shape, device=device)


def _rms_norm(device, backend):
    return _leaf(3, 5, 32, device=device), (torch.rand(32, device=device) + 0.5).requires_grad_(), _weights(3, 5, 32, device=device)


def _add_rms_norm(device, backend):
    x, w, c = _rms_norm(device, backend)
    return x, _leaf(3, 5, 32, device=device), w, c


def _rotary(device, backend):
    cos, sin = xkernels.rotary_cos_sin(16, 16, device=device)
    pos = torch.tensor([[0, 3, 5, 7], [1, 2, 9, 15]], device=device)
    return _leaf(2, 4, 3, 16, device=device), _leaf(2, 4, 1, 16, device=device), cos, sin, pos


def _swiglu(device, backend):
    return _leaf(3, 5, 40, device=device), _leaf(3, 5, 40, device=device), _weights(3, 5, 40, device=device)


def _swiglu_fused(device, backend):
    return _leaf(3, 5, 80, device=device), _weights(3, 5, 40, device=device)


def _lce(device, backend):
    t = torch.tensor([3, 0, -100, 49, 7, 21], device=device)
    return _leaf(6, 16, device=device), _leaf(50, 16, device=device, scale=0.25), t


def _ns(device, backend):
    return (torch.randn(2, 12, 20, device=device),)


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.up = torch.nn.Linear(16, 24, bias=False)
        self.down = torch.nn.Linear(24, 16, bias=False)
        self.norm = torch.nn.LayerNorm(16)


def _optimizer(device, backend, hybrid):
    from xkernels.optim import Muon, MuonWithAuxAdamW, muon_param_groups

    torch.manual_seed(0)
    model = _TinyLM().to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kw = dict(compute_dtype=torch.float32, use_kernels=backend == "triton")
    if hybrid:
        opt = MuonWithAuxAdamW(muon_param_groups(model, lr=0.01, embed_lr=0.02, weight_decay=0.1), **kw)
    else:
        opt = Muon([model.up.weight, model.down.weight], lr=0.02, **kw)
    opt.step()  # the state exists before any traced or checked step (as after a trainer's first step)
    return (opt,)


def _inplace_rotary(q, k, cos, sin, pos):
    q2, k2 = q * 1.0, k * 1.0  # non-leaf copies: in-place rotation is allowed on them
    q_out, k_out = xkernels.apply_rotary(q2, k2, cos, sin, pos, inplace=True)
    return (q_out * q.detach()).sum() + (k_out * k.detach()).sum()


CASES = [
    OpCase("rms_norm", _rms_norm, lambda x, w, c: (xkernels.rms_norm(x, w) * c).sum(),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("add_rms_norm", _add_rms_norm,
           lambda x, r, w, c: sum((o * c).sum() for o in xkernels.add_rms_norm(x, r, w)),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("add_rms_norm_scale", _add_rms_norm,
           lambda x, r, w, c: sum((o * c).sum() for o in xkernels.add_rms_norm(x, r, w, 1e-5, scale=0.5)),
           ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
    OpCase("apply_rotary", _rotary,
           lambda q, k, cos, sin, pos: sum((o * o.detach()).sum() for o in xkernels.apply_rotary(q, k, cos, sin, pos)),
           ("_rotary_kernel",)),
    OpCase("apply_rotary_inplace", _rotary, _inplace_rotary, ("_rotary_kernel",)),
    OpCase("swiglu", _swiglu, lambda g, u, c: (xkernels.swiglu(g, u) * c).sum(),
           ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")),
    OpCase("swiglu_fused", _swiglu_fused, lambda x, c: (xkernels.swiglu_fused(x) * c).sum(),
           ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")),
    OpCase("linear_cross_entropy", _lce, lambda h, w, t: xkernels.linear_cross_entropy(h, w, t, z_loss=1e-3),
           ("_ce_chunk_kernel",)),
    OpCase("newton_schulz", _ns, lambda g: xkernels.newton_schulz(g, 2, dtype=torch.float32).sum(),
           ("_ns_gram_kernel", "_ns_update_kernel"), backward=False),
    OpCase("muon_step", lambda d, b: _optimizer(d, b, hybrid=False), lambda opt: opt.step(),
           ("_ns_gram_kernel", "_ns_update_kernel"), backward=False),
    OpCase("muon_with_aux_adamw_step", lambda d, b: _optimizer(d, b, hybrid=True), lambda opt: opt.step(),
           ("_ns_gram_kernel", "_ns_update_kernel"), backward=False),
]  # fmt: skip
CASE_IDS = [c.name for c in CASES]
