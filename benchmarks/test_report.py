"""Self-test of the report's bookkeeping (grouping, ratios, CPU stripping, markdown, README block) on synthetic
records: runs in CI with ``pytest benchmarks/ --benchmark-disable`` (no timing involved)."""

from __future__ import annotations

import pytest

from benchmarks import readme_table, report


def _record(impl, role, median, group="rms_norm fwd 4096x1536 bfloat16", **extra):
    info = {"impl": impl, "role": role, "family": "rmsnorm", "pass": "fwd", "shape": "4096x1536", "dtype": "bfloat16"}
    info.update(extra)
    return {
        "name": f"test_rms_norm[{impl}]",
        "group": group,
        "param": impl,
        "stats": {"min": median * 0.9, "median": median, "rounds": 10},
        "extra_info": info,
    }


RECORDS = [
    _record("eager", "baseline", 4e-4, gbps=60.0, pct_of_ceiling=1.5),
    _record("xkernels", "ours", 1e-4, gbps=240.0, pct_of_ceiling=80.0),
    _record("liger", "peer", 1.25e-4, gbps=192.0, pct_of_ceiling=64.0),
    _record("eager", "baseline", 2e-3, group="linear_cross_entropy fwdbwd", peak_mem_bytes=400),
    _record("xkernels", "ours", 2.5e-3, group="linear_cross_entropy fwdbwd", peak_mem_bytes=80),
]


def test_collect_ratios():
    groups = {g["group"]: g for g in report.collect(RECORDS)}
    norm = groups["rms_norm fwd 4096x1536 bfloat16"]
    assert [r["impl"] for r in norm["rows"]] == ["xkernels", "eager", "liger"]
    assert norm["best_other"] == "liger"
    assert norm["speedup"] == pytest.approx(1.25)
    assert norm["rows"][1]["rel_time"] == pytest.approx(4.0)
    ce = groups["linear_cross_entropy fwdbwd"]
    assert ce["speedup"] == pytest.approx(0.8)
    assert ce["peak_mem_vs_eager"] == pytest.approx(0.2)


def test_cpu_results_publish_ratios_only():
    results = {"groups": report.collect(RECORDS, stat="min_s"), "ceilings": {"device": "CPU", "copy_gbps": 50.0}}
    report.strip_absolute(results)
    for group in results["groups"]:
        for row in group["rows"]:
            assert not set(report.ABSOLUTE_KEYS) & set(row)
            assert "rel_time" in row
    assert "copy_gbps" not in results["ceilings"]


def _results(ratio_only: bool) -> dict:
    return {
        "date": "2026-01-01 00:00 UTC",
        "machine": "TestGPU",
        "ratio_only": ratio_only,
        "device_type": "cuda",
        "versions": {"torch": "2.x", "triton": "3.x", "cuda": "12.x"},
        "ceilings": {"copy_gbps": 300.0, "matmul_bf16_tflops": 10.0},
        "tests": None,
        "modules": {
            "bench_rmsnorm": {"status": "ok", "skips": ["peer te not importable"]},
            "bench_fp8": {"status": "timeout", "skips": []},
        },
        "groups": report.collect(RECORDS),
        "wall_s": 1.0,
    }


def test_markdown_side_by_side():
    md = report.markdown(_results(ratio_only=False))
    row = next(line for line in md.splitlines() if line.startswith("| rms_norm fwd"))
    assert "0.100 ms · 240 GB/s (80%)" in row and "1.25× (liger)" in row
    assert "memory 20% of eager" in md
    assert "`bench_fp8`: timeout" in md and "peer te not importable" in md
    cpu = report.markdown(_results(ratio_only=True))
    assert "ratios only" in cpu and " ms" not in cpu


def test_readme_block_between_markers(tmp_path):
    path = tmp_path / "r.json"
    block = readme_table.table(path, _results(ratio_only=False))
    assert "| rms_norm fwd 4096x1536 bfloat16 | xkernels | liger | 1.25× | 80%" in block
    text = f"intro\n{readme_table.START}\nold\n{readme_table.END}\ntail\n"
    new = readme_table.render(text, block)
    assert new.startswith("intro\n") and new.endswith("tail\n") and "old" not in new
    assert readme_table.render(new, block) == new
    with pytest.raises(ValueError, match="markers"):
        readme_table.render("no markers here", block)


def test_targets():
    records = RECORDS + [
        _record("xkernels", "ours", 1e-3, group="muon step proxy-256 set"),
        _record("torch", "peer", 2e-3, group="muon step proxy-256 set"),
    ]
    targets = report.check_targets(report.collect(records), "cpu")
    by_target = {t["target"]: t for t in targets}
    muon = by_target["Muon step >= 1.5x torch.optim.Muon (proxy set)"]
    assert muon["value"] == pytest.approx(2.0) and muon["met"] is True
    mem = by_target["linear+CE peak memory <= 25% of unfused"]
    assert mem["value"] == pytest.approx(0.2) and mem["met"] is True
    assert not any("Liger" in t["target"] for t in targets)  # GPU-only targets are not judged on CPU
