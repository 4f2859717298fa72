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
    import inspect, json, os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def aot(kernel, types, consts, num_warps, num_stages=3, aligned=(), cc=90):
        """Compile like a real launch (16-byte aligned pointers and ``aligned`` integers) and return
        {registers, spill_bytes (local memory per thread), shared_bytes, ptx_cp_async}."""
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        attrs = {
            (names.index(n),): [["tt.divisibility", 16]]
            for n in names
            if n not in consts and (types.get(n, "").startswith("*") or n in aligned)
        }
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        use = {key: int(v) for key, v in re.findall(r"(REG|STACK|LOCAL):(\\d+)", res)}
        return dict(registers=use["REG"], spill_bytes=use["LOCAL"] + use["STACK"], shared_bytes=k.metadata.shared,
                    cp_async="cp.async" in k.asm["ptx"])
    '''
)


def aot_available() -> str | None:
    """None when ahead-of-time compilation for sm_90a can run here, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        return f"this Triton cannot compile ahead of time: {err}"
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "Triton's bundled cuobjdump is missing"
    return None


def run_aot(body: str, timeout: int = 300) -> list[dict]:
    """Run ``body`` (Python using ``aot(...)``; it appends dicts to ``rows``) in a fresh interpreter with
    TRITON_INTERPRET=0 (jit functions must be real JITFunctions) and this checkout first on sys.path."""
    script = _AOT_PRELUDE + "\nrows = []\n" + textwrap.dedent(body) + "\nprint('AOT-ROWS ' + json.dumps(rows))\n"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; keep today's default
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-ROWS ")][-1]
    return json.loads(line[len("AOT-ROWS ") :])

