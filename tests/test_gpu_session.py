"""The GPU session's rehearsal: ``python -m benchmarks.gpu_session --dry-run`` runs every phase on the CPU with tiny
shapes, writes its files (few, flat, small: the device tool returns at most 8 files) and keeps to its budgets."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["setup", "aot", "parity", "bench", "fp8ab", "train"]


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_its_files(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", "--out", str(out), "--budget-s", "240"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files), "the session writes flat files only"
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    assert {"session.json", "session.md", "session.log", "aot-sm_90a.json", "aot-sm_90a.md", "bench.json",
            "bench.md"} <= set(files)
    session = json.loads((out / "session.json").read_text())
    assert session["dry_run"] and [p["phase"] for p in session["phases"]] == PHASES
    for phase in session["phases"]:
        assert phase["status"] == "ok", phase
        assert phase["seconds"] <= phase["budget_s"] + 2, phase
    assert session["wall_s"] <= wall and session["wall_s"] <= 240
    runs = {r["variant"]: r for r in session["train"]["runs"]}
    assert runs["fp32"]["status"] == "ok" and runs["fp32"]["tokens_per_s"] > 0
    assert runs["fp8"]["status"] == "ok"
    ab = session["fp8ab"]["cases"]  # both kernel structures ran (interpreted) on each scale pairing and agree
    assert len(ab) == 2 and all(c["max_abs_diff"] < 1e-2 for c in ab), ab
    md = (out / "session.md").read_text()
    assert "DRY RUN" in md and "| train | ok |" in md and "tokens/s" in md and "| fp8ab | ok |" in md


def test_phase_over_budget_is_killed_and_recorded():
    from benchmarks.gpu_session import run_phase

    t0 = time.monotonic()
    rec = run_phase("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2.0)
    assert time.monotonic() - t0 < 20
    assert rec["status"] == "timeout" and rec["returncode"] is None
    assert "started" in rec["_log"]
    rec = run_phase("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30.0)
    assert rec["status"] == "failed (exit 3)"
