"""Ahead-of-time compilation (sm_90a) of kernels on a CPU-only machine, for the register / spill / lowering tests:
one long-lived interpreter per test session runs each compile script (``run_aot``, ``run_script``)."""

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
