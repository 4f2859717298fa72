"""pytest setup for the benchmark suite (``pytest benchmarks/ --benchmark-only``; CI: ``--benchmark-disable``).

* Collects ``bench_*.py`` (pytest.ini's ``python_files`` is left to the test suite).
* Nothing here sets ``TRITON_INTERPRET``: on CPU the ops take their default (auto) path, the PyTorch reference
  (and if the interpreter is switched on from outside, the torch backend is forced for the benchmarks).
* The ceilings (:mod:`benchmarks.ceilings`) are measured once per session when timing is on, and written into
  the ``--benchmark-json`` output under ``"xkernels"`` together with the versions of torch/triton/CUDA and peers.
* With ``XK_BENCH_JSONL=path`` every finished case is appended to that file at once (the report command's source:
  a family that runs out of time keeps the cases it finished).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import platform

import pytest
import torch


def pytest_collect_file(file_path, parent):
    name = file_path.name
    if file_path.suffix != ".py" or not fnmatch.fnmatch(name, "bench_*.py"):
        return None
    patterns = parent.config.getini("python_files") or []
    if parent.session.isinitpath(file_path) or any(fnmatch.fnmatch(name, p) for p in patterns):
        return None  # pytest's own collector takes files named on the command line or matching python_files
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_configure(config):
    # torch.compile contenders: one graph per (shape, pass); keep dynamo from giving up on recompiles.
    dynamo_config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if dynamo_config is not None:
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))


PEERS = ("liger-kernel", "torchao", "transformer-engine", "transformers", "pytest-benchmark")


def versions() -> dict:
    """Versions of everything the numbers depend on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    for dist in PEERS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from benchmarks import ceilings

    output_json["xkernels"] = {"versions": versions(), "ceilings": ceilings.get()}


@pytest.fixture(scope="session", autouse=True)
def _ceilings(request):
    """Measure the ceilings once, before the first timed case (not when timing is disabled)."""
    if not request.config.getoption("benchmark_disable", default=False):
        from benchmarks import ceilings

        ceilings.get()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cpu_torch_path():
    """On CPU the suite measures the PyTorch path.  If TRITON_INTERPRET=1 leaked in from the environment (or from
    tests/conftest.py in a combined session), keep the interpreter out of the timings by forcing the torch backend."""
    from xkernels.dispatch import force_backend, interpreting

    if torch.cuda.is_available() or not interpreting():
        yield
        return
    with force_backend("torch"):
        yield


@pytest.fixture(autouse=True)
def _record(request):
    """Append the finished case to ``$XK_BENCH_JSONL`` (one JSON object per line)."""
    yield
    path = os.environ.get("XK_BENCH_JSONL")
    bench = getattr(request.node, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if not path or stats is None:
        return
    record = {
        "name": request.node.name,
        "fullname": request.node.nodeid,
        "group": bench.group,
        "param": bench.param,
        "stats": {k: getattr(stats, k) for k in ("min", "max", "mean", "median", "stddev", "rounds")},
        "extra_info": bench.extra_info,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
