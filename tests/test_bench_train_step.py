"""The CPU train-step report (benchmarks/bench_train_step.py, script mode): its statistics and one tiny run."""

from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks.bench_train_step import explain_ops, main, markdown, median_ci


def _binomial_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n


@pytest.mark.parametrize("n", [1, 5, 6, 9, 10, 17, 30, 60, 101])
def test_median_ci_is_the_tightest_order_statistic_interval(n):
    """The interval's ranks (x_(k), x_(n+1-k)) cover the median with probability >= 95% and the next tighter pair
    would not; below n = 6 no pair reaches 95% and the whole range is returned."""
    values = random.Random(n).sample(range(10 * n), n)
    lo, hi = median_ci(values)
    xs = sorted(values)
    k = xs.index(lo) + 1
    assert xs.index(hi) + 1 == n + 1 - k
    assert lo <= sorted(values)[(n - 1) // 2] <= hi

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Bin(n, 1/2) <= k - 1)
        return 1.0 - 2.0 * _binomial_cdf(k - 1, n)

    if k > 1 or coverage(1) >= 0.95:
        assert coverage(k) >= 0.95 - 1e-12
        assert k + 1 > (n + 1) // 2 or coverage(k + 1) < 0.95
    else:
        assert (lo, hi) == (xs[0], xs[-1])


def test_median_ci_rejects_empty():
    with pytest.raises(ValueError, match="at least one value"):
        median_ci([])


def test_script_writes_report_with_paired_ratios(tmp_path, capsys):
    """One tiny round of every variant (ours and HF, both heads): the JSON and markdown land in --out-dir with the
    paired ratios and their intervals."""
    pytest.importorskip("transformers")
    rc = main(["--repeats", "3", "--warmup", "1", "--batch", "1", "--seq", "16", "--out-dir", str(tmp_path),
               "--no-explain"])
    assert rc == 0
    (js,) = tmp_path.glob("train-step-cpu-*.json")
    report = json.loads(js.read_text())
    assert set(report["median_s"]) == {"xmodel/logits", "hf-llama/logits", "xmodel/labels", "hf-llama/labels"}
    for key in ("hf/logits", "hf/labels"):
        p = report["paired_ratios"][key]
        assert p["ci95"][0] <= p["median"] <= p["ci95"][1]
        assert report["ratios"][key] > 0
    md = js.with_suffix(".md").read_text()
    assert "median of per-round ratios" in md and "HF time / ours (eager), labels" in md
    assert "wrote" in capsys.readouterr().out


def test_explain_table_lists_every_op_with_its_graphs_and_breaks():
    """The report's per-op table (torch path here; test_compile.py covers the Triton path op by op)."""
    from op_cases import CASES

    rows = explain_ops(("torch",))
    names = [r["op"] for r in rows]
    assert [c.name for c in CASES] == names[: len(CASES)]
    assert any(n.startswith("FP8Linear (delayed") for n in names)
    for r in rows:
        assert r["graphs"] >= 1 and r["breaks"] == 0, r
    report = {"date": "d", "command": "c", "machine": {"cpu": "x", "cores": 2, "threads": 1},
              "versions": {"torch": "t", "triton": "t", "transformers": "t", "python": "p"},
              "shape": {"preset": "p", "layers": 1, "hidden": 8, "vocab": 16, "params": 1, "batch": 1, "seq": 2,
                        "dtype": "float32"},
              "timing": {"step": "s", "clock": "c", "repeats": 1, "warmup": 1}, "median_s": {}, "min_s": {},
              "ratios": {}, "paired_ratios": {}, "compile": None, "explain": rows}
    md = markdown(report)
    assert "| FP8Linear (block, training) | 1 / 0 |" in md
