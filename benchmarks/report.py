"""One command for the full benchmark report: ``python -m benchmarks.report [--out DIR]``.

On a CUDA machine it

1. records the versions (torch, triton, CUDA, GPU, peers) and measures the ceilings once
   (:mod:`benchmarks.ceilings`), handing them to every pytest run through ``XK_BENCH_CEILINGS``;
2. runs the CUDA parity tests (``pytest tests -q -k cuda``: every test parametrised or marked for CUDA);
3. runs every ``bench_*.py`` module with ``--benchmark-only --benchmark-json``, one pytest process per module
   with its share of the time budget, so a crash, a missing peer or a timeout in one family loses only that family;
4. writes ``<gpu>-<date>.json`` (everything, machine-readable) and ``<gpu>-<date>.md`` (one table per family:
   contenders side by side, throughput and % of the ceiling, speed-up of ours over the best other contender; then
   the kernel issues' targets, met or not, with the numbers) into ``--out`` (default ``benchmarks/results``).

The whole run is held to ``--budget-s`` (default 470 s: within 8 minutes on one H200).  Without CUDA the command
runs the CPU suite and labels the results ``cpu`` and ratio-only (absolute times and rates are dropped from the
files: a shared CPU's numbers are only comparable within one run); ``--cpu-smoke`` runs a tiny subset with minimal
rounds, which is how the command itself is tested.  ``--update-readme`` then regenerates README's table
(:mod:`benchmarks.readme_table`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["bench_rmsnorm", "bench_rotary", "bench_swiglu_ce", "bench_fp8", "bench_muon", "bench_train_step",
           "bench_cross_entropy", "bench_geglu_layernorm"]
# --cpu-smoke: one small selection per module (pytest -k), timed with XK_BENCH_SMOKE=1 round counts.
SMOKE_SELECTION = {
    "bench_rmsnorm": "test_rms_norm and fwd and not fwdbwd",
    "bench_swiglu_ce": "test_linear_cross_entropy",
    "bench_fp8": "test_fp8_gemm",
    "bench_muon": "test_newton_schulz",
    "bench_train_step": "test_train_step",
}
IMPL_ORDER = [
    "xkernels",
    "xkernels-fused",
    "xkernels-row",
    "xkernels-block",
    "xkernels+compile",
    "xkernels+fp8",
    "eager",
    "bf16",
    "compile",
    "torch",
    "torch-loop",
    "liger",
    "scaled_mm",
    "scaled_mm-row",
    "torchao",
    "te",
    "hf-llama",
]
ABSOLUTE_KEYS = ("median_s", "min_s", "gbps", "tflops", "tokens_per_s", "ceiling_value", "peak_mem_bytes")
FAMILY_TITLES = {
    "rmsnorm": "RMSNorm / add + RMSNorm",
    "rotary": "Rotary embedding (q and k)",
    "swiglu": "SwiGLU",
    "cross_entropy": "Linear + cross-entropy",
    "fp8": "FP8 quantise / GEMM / Linear",
    "muon": "Newton–Schulz / Muon",
    "train_step": "Train step",
}


# ---------------------------------------------------------------------------------------------- running
def _run(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, str, float]:
    """``(returncode or None on timeout, combined output, seconds)``."""
    t0 = time.monotonic()
    # Own session, so that a timeout also ends the child's helpers (inductor compile workers) and nothing else.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or "", time.monotonic() - t0


def _summary_line(output: str) -> str:
    lines = [
        ln.strip("= ")
        for ln in output.strip().splitlines()
        if re.search(r"\b(passed|failed|skipped|error|deselected)\b", ln)
    ]
    return lines[-1] if lines else ""


def _skips(output: str) -> list[str]:
    """Unique skip reasons from pytest's ``-ra`` summary."""
    reasons = []
    for line in output.splitlines():
        m = re.match(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", line.strip())
        if m and m.group(1) not in reasons:
            reasons.append(m.group(1))
    return reasons


def run_tests(env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-k", "cuda", "-p", "no:cacheprovider"]
    rc, out, secs = _run(cmd, timeout, env)
    return {
        "command": " ".join(cmd[2:]),
        "returncode": rc,
        "timed_out": rc is None,
        "seconds": round(secs, 1),
        "summary": _summary_line(out),
        "tail": out.strip().splitlines()[-25:],
    }


def run_module(module: str, jsonl: Path, env: dict, timeout: float, selection: str | None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        f"benchmarks/{module}.py",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        "--benchmark-columns=median,rounds",
    ]
    if selection:
        cmd += ["-k", selection]
    rc, out, secs = _run(cmd, timeout, {**env, "XK_BENCH_JSONL": str(jsonl)})
    status = "timeout" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")
    return {
        "status": status,
        "seconds": round(secs, 1),
        "summary": _summary_line(out),
        "skips": _skips(out),
        "tail": [] if rc == 0 else out.strip().splitlines()[-25:],
    }


# ------------------------------------------------------------------------------------------- collecting
def _impl_key(impl: str) -> tuple[int, str]:
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def read_records(paths: list[Path]) -> list[dict]:
    """The cases recorded (one JSON per line) by ``benchmarks/conftest.py``; a torn last line is dropped."""
    records = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def collect(records: list[dict], stat: str = "median_s") -> list[dict]:
    """Group the recorded cases by pytest-benchmark group, with ratios computed on ``stat`` (``median_s`` on
    CUDA; ``min_s`` on a CPU, the round least disturbed by other load); ordered by family."""
    groups: dict[str, dict] = {}
    for bench in records:
        info = dict(bench.get("extra_info", {}))
        stats = bench.get("stats", {})
        row = {
            "impl": info.pop("impl", bench.get("param")),
            "role": info.pop("role", "peer"),
            "test": bench["name"],
            "median_s": stats.get("median"),
            "min_s": stats.get("min"),
            "rounds": stats.get("rounds"),
        }
        for key in (
            "gbps",
            "tflops",
            "pct_of_ceiling",
            "ceiling",
            "ceiling_value",
            "peak_mem_bytes",
            "tokens_per_s",
            "mfu_pct",
            "bytes",
            "flops",
            "timer",
        ):
            if key in info:
                row[key] = info[key]
        name = bench.get("group") or bench["name"]
        group = groups.setdefault(
            name,
            {
                "group": name,
                "family": info.get("family"),
                "pass": info.get("pass"),
                "shape": info.get("shape"),
                "dtype": info.get("dtype"),
                "rows": [],
            },
        )
        group["rows"].append(row)
    out = []
    for group in groups.values():
        rows = sorted(group["rows"], key=lambda r: _impl_key(r["impl"]))
        fastest = min(r[stat] for r in rows)
        for r in rows:
            r["rel_time"] = r[stat] / fastest  # 1.00 = fastest in the group
        ours = [r for r in rows if r["role"] == "ours"]
        others = [r for r in rows if r["role"] != "ours"]
        if ours and others:
            best_other = min(others, key=lambda r: r[stat])
            for r in ours:
                r["speedup_vs_best_other"] = best_other[stat] / r[stat]
            primary = next((r for r in ours if r["impl"] == "xkernels"), min(ours, key=lambda r: r[stat]))
            group["ours"] = primary["impl"]
            group["best_other"] = best_other["impl"]
            group["speedup"] = best_other[stat] / primary[stat]
        mem = {r["impl"]: r.get("peak_mem_bytes") for r in rows if r.get("peak_mem_bytes") is not None}
        if "xkernels" in mem and mem.get("eager"):
            group["peak_mem_vs_eager"] = mem["xkernels"] / mem["eager"]
        group["rows"] = rows
        out.append(group)
    out.sort(key=lambda g: (list(FAMILY_TITLES).index(g["family"]) if g["family"] in FAMILY_TITLES else 99, g["group"]))
    return out


# (description, device types it applies to, group regex, metric, threshold).  Metrics on the xkernels row:
# "pct" = % of the ceiling; "vs:<impl>" = that contender's time / ours; "mem" = our peak memory / eager's.
TARGETS = [
    ("RMSNorm fwd+bwd >= 90% of copy bandwidth", ("cuda",), r"^(add_)?rms_norm fwdbwd", "pct", 90.0),
    ("RMSNorm fwd+bwd >= 1.1x Liger", ("cuda",), r"^(add_)?rms_norm fwdbwd", "vs:liger", 1.1),
    ("rotary fwd+bwd >= 85% of copy bandwidth", ("cuda",), r"^apply_rotary fwdbwd", "pct", 85.0),
    ("rotary fwd+bwd >= 1.2x Liger", ("cuda",), r"^apply_rotary fwdbwd", "vs:liger", 1.2),
    ("FP8 GEMM 8192^3 >= 1.0x torch._scaled_mm", ("cuda",), r"^fp8 gemm 8192x8192x8192", "vs:scaled_mm", 1.0),
    ("FP8 GEMM 8192^3 >= 1.7x bf16", ("cuda",), r"^fp8 gemm 8192x8192x8192", "vs:bf16", 1.7),
    ("FP8Linear fwd+bwd >= 1.3x bf16 (model shapes)", ("cuda",), r"^fp8 linear fwdbwd", "vs:bf16", 1.3),
    ("Muon step >= 2x torch.optim.Muon (1.3B set)", ("cuda",), r"^muon step", "vs:torch", 2.0),
    ("Muon step >= 1.5x torch.optim.Muon (proxy set)", ("cpu",), r"^muon step", "vs:torch", 1.5),
    ("symmetric Gram kernel faster than bmm from 1024^2", ("cuda",), r"^gram .*x(1024|1536|2048)x", "vs:eager", 1.0),
    ("linear+CE peak memory <= 25% of unfused", ("cuda", "cpu"), r"^linear_cross_entropy", "mem", 0.25),
    ("linear+CE time <= 1.1x unfused", ("cuda",), r"^linear_cross_entropy", "vs:eager", 1 / 1.1),
]


def check_targets(groups: list[dict], device_type: str) -> list[dict]:
    """Evaluate the kernel issues' targets that apply to this device on the xkernels rows."""
    out = []
    for desc, devices, pattern, metric, threshold in TARGETS:
        if device_type not in devices:
            continue
        for g in groups:
            if not re.search(pattern, g["group"]):
                continue
            rows = {r["impl"]: r for r in g["rows"]}
            ours = rows.get("xkernels")
            if ours is None:
                continue
            if metric == "pct":
                value = ours.get("pct_of_ceiling")
                met = None if value is None else value >= threshold
            elif metric == "mem":
                value = g.get("peak_mem_vs_eager")
                met = None if value is None else value <= threshold
            else:
                other = rows.get(metric.split(":", 1)[1])
                value = None if other is None else other["rel_time"] / ours["rel_time"]
                met = None if value is None else value >= threshold
            out.append(
                {
                    "target": desc,
                    "case": g["group"],
                    "metric": metric,
                    "value": value,
                    "threshold": threshold,
                    "met": met,
                }
            )
    return out


def strip_absolute(results: dict) -> None:
    """CPU runs publish ratios only: drop absolute times, rates, memory and ceiling values."""
    for group in results["groups"]:
        for row in group["rows"]:
            for key in ABSOLUTE_KEYS:
                row.pop(key, None)
    results["ceilings"] = {k: v for k, v in results.get("ceilings", {}).items() if not isinstance(v, float)}
    results["ceilings"]["note"] = "measured for pct_of_ceiling; values not published (CPU run: ratios only)"


# ------------------------------------------------------------------------------------------- markdown
def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _cell(row: dict, ratio_only: bool) -> str:
    pct = f" ({row['pct_of_ceiling']:.0f}%)" if row.get("pct_of_ceiling") is not None else ""
    if ratio_only:
        return f"{row['rel_time']:.2f}×{pct}"
    rate = ""
    if row.get("gbps") is not None:
        rate = f" · {row['gbps']:.0f} GB/s"
    elif row.get("tokens_per_s") is not None:
        rate = f" · {row['tokens_per_s'] / 1e3:.1f}k tok/s"
    elif row.get("tflops") is not None:
        rate = f" · {row['tflops']:.0f} TFLOP/s"
    return f"{_fmt_time(row['median_s'])}{rate}{pct}"


def markdown(results: dict) -> str:
    ratio_only = results["ratio_only"]
    v = results["versions"]
    lines = [
        f"# Benchmark report: {results['machine']} ({results['date']})",
        "",
        f"torch {v.get('torch')} · triton {v.get('triton')} · CUDA {v.get('cuda')} · python {v.get('python')}"
        + "".join(
            f" · {k} {v[k]}" for k in ("liger-kernel", "torchao", "transformer-engine", "transformers") if v.get(k)
        ),
        "",
    ]
    if ratio_only:
        lines += [
            (
                "**CPU run: ratios only.** Cells are time relative to the fastest contender of the row (1.00× = "
                "fastest; each case's fastest round, the one least disturbed by other load) and, in brackets, the "
                "share of the CPU's measured ceiling; absolute numbers from a shared CPU are not published. On a "
                "CPU shared with other jobs even the ratios are indicative only."
            ),
            "",
        ]
    else:
        c = results["ceilings"]
        lines += [
            "Ceilings (measured this run): "
            + ", ".join(f"{k} {c[k]:.0f}" for k in ("copy_gbps", "matmul_bf16_tflops", "matmul_fp8_tflops") if c.get(k))
            + ". "
            "Cells: median time · throughput (% of the ceiling).",
            "",
        ]
    tests = results.get("tests")
    if tests:
        lines += [
            f"CUDA parity tests (`{tests['command']}`): {tests['summary'] or 'no summary'}"
            + (" — TIMED OUT" if tests.get("timed_out") else ""),
            "",
        ]
    lines += ["Speed-up = best other contender's median / ours (xkernels); > 1 means ours is faster.", ""]
    for family, title in FAMILY_TITLES.items():
        groups = [g for g in results["groups"] if g["family"] == family]
        if not groups:
            continue
        impls = sorted({r["impl"] for g in groups for r in g["rows"]}, key=_impl_key)
        lines += [
            f"## {title}",
            "",
            "| case | " + " | ".join(impls) + " | speed-up (vs) |",
            "|---|" + "---|" * len(impls) + "---|",
        ]
        for g in groups:
            by_impl = {r["impl"]: r for r in g["rows"]}
            cells = [_cell(by_impl[i], ratio_only) if i in by_impl else "—" for i in impls]
            speed = f"{g['speedup']:.2f}× ({g['best_other']})" if "speedup" in g else "—"
            if "peak_mem_vs_eager" in g:
                speed += f"; memory {100 * g['peak_mem_vs_eager']:.0f}% of eager"
            lines.append(f"| {g['group']} | " + " | ".join(cells) + f" | {speed} |")
        lines.append("")
    if results.get("targets"):
        lines += ["## Targets from the kernel issues", "", "| target | case | measured | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            if t["value"] is None:
                measured = "not measured (contender missing)"
            elif t["metric"] == "pct":
                measured = f"{t['value']:.0f}%"
            elif t["metric"] == "mem":
                measured = f"{100 * t['value']:.0f}%"
            else:
                measured = f"{t['value']:.2f}×"
            met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
            lines.append(f"| {t['target']} | {t['case']} | {measured} | {met} |")
        lines.append("")
    skips = sorted({s for m in results["modules"].values() for s in m.get("skips", [])})
    problems = {k: m["status"] for k, m in results["modules"].items() if m["status"] != "ok"}
    if problems:
        lines += ["## Modules that did not finish cleanly", ""] + [f"- `{k}`: {s}" for k, s in problems.items()] + [""]
    if skips:
        lines += ["## Skipped contenders", ""] + [f"- {s}" for s in skips] + [""]
    lines += [f"Total wall time {results['wall_s']:.0f} s. Generated by `python -m benchmarks.report`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="directory for the JSON and markdown"
    )
    parser.add_argument("--budget-s", type=float, default=470.0, help="wall-time budget for the whole report")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny subset, minimal rounds (tests this command on CPU)"
    )
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA parity tests")
    parser.add_argument("--tests-budget-s", type=float, default=90.0, help="time limit for the parity tests")
    parser.add_argument("--modules", nargs="*", default=None, help=f"subset of {MODULES}")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile contenders (saves compile time)"
    )
    parser.add_argument("--update-readme", action="store_true", help="regenerate README's table from --out afterwards")
    args = parser.parse_args(argv)

    import torch  # after argparse: --help stays fast

    if importlib.util.find_spec("pytest_benchmark") is None:
        print(
            "pytest-benchmark is not installed: pip install -e '.[test]' (or pip install pytest-benchmark)",
            file=sys.stderr,
        )
        return 2

    from benchmarks import ceilings
    from benchmarks.conftest import versions

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    on_cuda = torch.cuda.is_available()
    modules = args.modules or (list(SMOKE_SELECTION) if args.cpu_smoke else MODULES)
    args.out.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # benchmarks use the default backend: Triton on CUDA, the torch path on CPU
    if args.cpu_smoke:
        env["XK_BENCH_SMOKE"] = "1"
    if args.no_compile:
        env["XK_BENCH_NO_COMPILE"] = "1"
    print(f"[report] measuring ceilings on {'CUDA' if on_cuda else 'CPU'} ...", flush=True)
    ceil = ceilings.measure()
    with tempfile.TemporaryDirectory(prefix="xk-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "ceilings.json").write_text(json.dumps(ceil), encoding="utf-8")
        env[ceilings.ENV_VAR] = str(tmp / "ceilings.json")

        tests = None
        if on_cuda and not args.skip_tests:
            print("[report] CUDA parity tests ...", flush=True)
            tests = run_tests(env, min(args.tests_budget_s, deadline - time.monotonic() - 60))
            print(f"[report]   {tests['summary']} ({tests['seconds']} s)", flush=True)

        status, raw_files = {}, []
        for i, module in enumerate(modules):
            left = deadline - time.monotonic()
            timeout = max(20.0, left - 35.0 * (len(modules) - i - 1))  # leave each later family at least 35 s
            path = tmp / f"{module}.jsonl"
            print(f"[report] {module} (limit {timeout:.0f} s) ...", flush=True)
            status[module] = run_module(
                module, path, env, timeout, SMOKE_SELECTION.get(module) if args.cpu_smoke else None
            )
            print(
                f"[report]   {status[module]['status']}: {status[module]['summary']} ({status[module]['seconds']} s)",
                flush=True,
            )
            raw_files.append(path)
        groups = collect(read_records(raw_files), stat="median_s" if on_cuda else "min_s")

    vers = versions()
    date = dt.datetime.now(dt.timezone.utc)  # noqa: UP017 (dt.UTC needs Python 3.11)
    machine = ceil["device"]
    results = {
        "schema": 1,
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "device_type": "cuda" if on_cuda else "cpu",
        "ratio_only": not on_cuda,
        "smoke": bool(args.cpu_smoke),
        "versions": vers,
        "ceilings": ceil,
        "tests": tests,
        "modules": status,
        "groups": groups,
        "targets": check_targets(groups, "cuda" if on_cuda else "cpu"),
        "wall_s": time.monotonic() - t0,
    }
    if not on_cuda:
        strip_absolute(results)
    machine_slug = _slug(torch.cuda.get_device_name(0)) if on_cuda else "cpu"
    stem = f"{machine_slug}{'-smoke' if args.cpu_smoke else ''}-{date:%Y-%m-%d}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(results), encoding="utf-8")
    print(f"[report] wrote {json_path} and {md_path} in {results['wall_s']:.0f} s", flush=True)
    if args.update_readme:
        from benchmarks import readme_table

        readme_table.main(["--results", str(args.out)])
    failed = [m for m, s in status.items() if s["status"] != "ok"] + (
        ["tests"] if tests and tests["returncode"] != 0 else []
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
