"""The GPU session in one command: ``python -m benchmarks.gpu_session --out "$OUT"`` (rehearsed on CPU by ``--dry-run``).

Made for a short lease of one GPU machine without network (the H200 image: Python 3.12, torch 2.11, Triton 3.6):
every phase runs in its own process with a hard time limit, a phase that overruns is killed and recorded and the
rest still run, and the whole plan stays within ``--budget-s`` (default 540 s = 9 minutes).  Phases:

1. ``setup``  -- installs the optional peer wheels found in ``.whl/`` (``pip install --no-index --no-deps``; e.g.
   Liger-Kernel, which the image lacks).  The package itself is used from the checkout (``python -m`` from the
   repository root; README: ``pip install --no-deps --no-build-isolation -e .`` if you want it installed).
2. ``aot``    -- the ahead-of-time compile table for this GPU's architecture (:mod:`benchmarks.aot`).
3. ``parity`` -- the CUDA parity tests (``pytest tests -k cuda -x``: stops at the first failure; the log is kept).
4. ``bench``  -- the kernel benchmarks against the peers at the model's shapes (:mod:`benchmarks.report`, parity
   tests skipped since phase 3 ran them).
5. ``fp8ab``  -- the FP8 GEMM's two kernel structures side by side (``nested``: the first version; ``flat``: the
   flattened persistent loop with the TMA-store epilogue and scalar 128x128 weight scales) for every scale pairing
   at the model's shapes: ms, TFLOP/s, speed-up and the largest output difference (``session.json`` ``fp8ab``).
6. ``train``  -- a 1.3 B-shaped training step (Xmodel-2.5: 48 x 1536, vocab 129,280), bf16 then FP8
   (``convert_to_fp8``, delayed scaling): tokens/s and MFU (matmul FLOPs over the GPU's dense bf16 peak and over
   the measured bf16 matmul ceiling).

Files written into ``--out`` (flat, few and small, as the device tool returns at most 8 files):
``session.json`` (every phase: status, seconds, budget, results), ``session.md`` (the same for people),
``session.log`` (every phase's output, each capped), ``aot-<arch>.json`` / ``.md`` and ``bench.json`` / ``.md``.

``--dry-run`` runs the same plan on the CPU with tiny shapes and the PyTorch path (the AOT phase still compiles one
kernel for sm_90a, the parity phase one interpreter test, the benchmarks one smoke module, the train phase the
``cpu-default`` model for two steps), so CI proves every phase starts, writes its files and respects its budget.
Exit status: 0 when every phase passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_CAP = 400_000  # characters of each phase's output kept in session.log

# (name, budget on a GPU, budget in a dry run) -- seconds.  Sum on a GPU: 530 s, under the 540 s default total.
# A failed phase does not stop the later ones (benchmarks of a kernel whose parity failed are still worth having:
# session.md shows both).  The AOT phase also fills Triton's compile cache for the later phases where the keys match.
# fp8ab: the FP8 GEMM's two kernel structures (xkernels.fp8.gemm.STRUCTURES) timed side by side at the model's
# shapes, so the first GPU run measures what the flattened loop / TMA-store epilogue / scalar block scales bought.
# Its 45 s cover up to 24 autotuned launches (3 shapes x 4 pairings x 2 structures, ~4 configs each); cases are
# written as they finish, most important first (the K = 1536 forward shape), so a cut-off run still reports.
PHASES = [("setup", 25, 20), ("aot", 75, 45), ("parity", 120, 45), ("bench", 155, 50), ("fp8ab", 45, 30),
          ("train", 110, 45)]
# Dense bf16 tensor-core peaks (data sheets, SXM parts) for MFU; the measured matmul ceiling is reported as well.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


# ---------------------------------------------------------------------------------------------------- phases
def run_phase(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group; kill the group at ``timeout``.  Returns the phase record."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    secs = time.monotonic() - t0
    status = "timeout" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")
    out = out or ""
    return {
        "phase": name,
        "command": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd),
        "status": status,
        "returncode": rc,
        "seconds": round(secs, 1),
        "budget_s": round(timeout, 1),
        "tail": out.strip().splitlines()[-15:],
        "_log": out if len(out) <= LOG_CAP else out[: LOG_CAP // 4] + "\n[... cut ...]\n" + out[-3 * LOG_CAP // 4 :],
    }


def _arch() -> str:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {(9, 0): "sm_90a", (8, 9): "sm_89", (8, 0): "sm_80"}.get((major, minor), "sm_90a")
    return "sm_90a"


def plan(dry_run: bool, out: Path, work: Path, arch: str) -> list[tuple[str, list[str] | None, dict]]:
    """``(phase, command or None to skip, extra env)`` for each phase."""
    py = sys.executable
    wheels = sorted((ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    setup = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", *map(str, wheels)]
    if not wheels:  # nothing to install: just record pip (and so the Python) the session runs on
        setup = [py, "-m", "pip", "--version"]
    elif dry_run:
        setup = [*setup, "--dry-run"]
    aot = [py, "-m", "benchmarks.aot", "--arch", arch, "--out", str(out), "--jobs", str(min(16, os.cpu_count() or 1))]
    parity = [py, "-m", "pytest", "tests", "-q", "-x", "-k", "cuda", "-p", "no:cacheprovider"]
    bench = [py, "-m", "benchmarks.report", "--out", str(work / "bench"), "--skip-tests", "--no-compile"]
    train = [py, "-m", "benchmarks.gpu_session", "--_train", str(work / "train.json")]
    fp8ab = [py, "-m", "benchmarks.gpu_session", "--_fp8ab", str(work / "fp8ab.json")]
    interp = {}
    if dry_run:
        aot += ["--scenarios", "swiglu", "--kernels", "_swiglu_fwd"]
        parity = [py, "-m", "pytest", "tests/test_guard_regions.py", "-q", "-x", "-p", "no:cacheprovider",
                  "-k", "swiglu_bwd_into_caller_buffers"]
        interp = {"TRITON_INTERPRET": "1"}
        bench = [*bench, "--cpu-smoke", "--modules", "bench_rmsnorm"]
        train += ["--dry-run"]
        fp8ab += ["--dry-run"]
    return [
        ("setup", setup, {}),
        ("aot", aot, {"TRITON_INTERPRET": "0"}),
        ("parity", parity, interp),
        ("bench", bench, {}),
        ("fp8ab", fp8ab, interp),
        ("train", train, {"XKERNELS_BACKEND": "torch"} if dry_run else {}),
    ]


# ---------------------------------------------------------------------------------------------- train phase
def _train_main(result_path: Path, dry_run: bool) -> int:
    """The ``train`` phase's child: time a training step, bf16 then FP8; write a JSON result."""
    import torch

    from xmodel.config import XmodelConfig
    from xmodel.model import Xmodel

    on_cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if on_cuda else "cpu")
    if on_cuda:
        cfg = XmodelConfig.from_preset("xmodel-2.5")
        batch, seq, dtype, warmup, steps = 1, 4096, torch.bfloat16, 2, 5
    else:  # rehearsal: tiny model, fp32, the PyTorch path, one thread (as the trainer on a CPU)
        torch.set_num_threads(1)
        cfg = XmodelConfig.from_preset("cpu-default", num_hidden_layers=2)
        batch, seq, dtype, warmup, steps = 2, 64, torch.float32, 1, 2
    gpu = torch.cuda.get_device_name(0) if on_cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    ceiling = None
    if on_cuda:
        from benchmarks import ceilings

        try:
            ceiling = ceilings.measure().get("matmul_bf16_tflops")
        except Exception as err:  # noqa: BLE001 -- MFU against the data sheet still works
            print(f"[train] ceiling not measured: {err}", flush=True)
    results = {"device": gpu, "preset": "xmodel-2.5" if on_cuda else "cpu-default-2L", "batch": batch, "seq": seq,
               "params": None, "peak_bf16_tflops": peak, "measured_bf16_tflops": ceiling, "runs": []}
    flops_step = cfg.flops_per_token(seq) * batch * seq

    for variant in ("bf16", "fp8") if on_cuda else ("fp32", "fp8"):
        t_start = time.monotonic()
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = Xmodel(cfg)
            model = model.to(dtype)
            results["params"] = sum(p.numel() for p in model.parameters())
            if variant == "fp8":
                from xkernels.fp8 import FP8Recipe, convert_to_fp8

                model = convert_to_fp8(model, FP8Recipe.from_name("delayed")) or model
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    **({"fused": True} if on_cuda else {}))
            tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
            ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

            def step():
                loss = model(ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            for _ in range(warmup):
                loss = step()
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            if on_cuda:
                torch.cuda.synchronize()
            secs = (time.perf_counter() - t0) / steps
            run = {
                "variant": variant,
                "status": "ok",
                "step_s": secs,
                "tokens_per_s": batch * seq / secs,
                "tflops": flops_step / secs / 1e12,
                "loss": float(loss.detach().float()),
                "setup_s": round(time.monotonic() - t_start - secs * steps, 1),
            }
            if peak:
                run["mfu_pct"] = 100 * run["tflops"] / peak
            if ceiling:
                run["pct_of_measured_matmul"] = 100 * run["tflops"] / ceiling
            if on_cuda:
                run["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as err:  # noqa: BLE001 -- recorded; the bf16 number survives an FP8 failure
            run = {"variant": variant, "status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
        results["runs"].append(run)
        print(f"[train] {json.dumps(run)}", flush=True)
        del model
        if on_cuda:
            torch.cuda.empty_cache()
        result_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")  # after each variant
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


# ---------------------------------------------------------------------------------------------- fp8ab phase
def _fp8ab_main(result_path: Path, dry_run: bool) -> int:
    """The ``fp8ab`` phase's child: each FP8 GEMM scale pairing at the model's shapes, ``nested`` (the first
    version; 1x128 activation scales row-major, as it was fed) then ``flat`` (today's; M-major scales), timed with
    CUDA events after the autotuner's first call. Writes JSON after every case (a timeout keeps what was done)."""
    import torch

    from xkernels.fp8 import fp8_gemm, gemm, quantize

    on_cuda = torch.cuda.is_available() and not dry_run
    device = "cuda" if on_cuda else "cpu"
    # (M, N, K): gate+up and o projections forward (K = 1536: 12 K-steps per tile), the down projection's weight
    # gradient (N x K = 1536 x 3840 over 16384 tokens); the dry run: one tiny shape through the interpreter.
    shapes = [(16384, 7680, 1536), (16384, 1536, 1536), (1536, 3840, 16384)] if on_cuda else [(64, 64, 128)]
    pairings = [("tensor", "tensor"), ("row", "row"), ("block_1x128", "block_128x128"), ("block_1x128", "block_1x128")]
    if not on_cuda:
        pairings = pairings[::2]  # the rehearsal: one epilogue-scaled and one block-scaled pairing
    reps = 20 if on_cuda else 1
    results = {"device": torch.cuda.get_device_name(0) if on_cuda else "cpu", "cases": []}
    torch.manual_seed(0)
    status = 0
    for m, n, k in shapes:
        a_hi = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b_hi = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5
        for ga, gb in pairings:
            a, sa = quantize(a_hi, torch.float8_e4m3fn, ga)
            b, sb = quantize(b_hi, torch.float8_e4m3fn, gb)
            case = {"shape": f"{m}x{n}x{k}", "scales": f"{ga}/{gb}"}
            outs = {}
            for structure in ("nested", "flat"):
                sa_s = sa.contiguous() if structure == "nested" else sa
                try:
                    with gemm.kernel_structure(structure):
                        outs[structure] = fp8_gemm(a, b, sa_s, sb, out_dtype=torch.bfloat16, backend="triton")
                        if on_cuda:
                            torch.cuda.synchronize()
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            for _ in range(reps):
                                fp8_gemm(a, b, sa_s, sb, out_dtype=torch.bfloat16, backend="triton")
                            end.record()
                            torch.cuda.synchronize()
                            ms = start.elapsed_time(end) / reps
                            case[f"{structure}_ms"] = round(ms, 4)
                            case[f"{structure}_tflops"] = round(2 * m * n * k / ms / 1e9, 1)
                except Exception as err:  # noqa: BLE001 -- recorded; the other structure still runs
                    case[f"{structure}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    status = 1
            if len(outs) == 2:
                case["max_abs_diff"] = float((outs["flat"].float() - outs["nested"].float()).abs().max())
            if "flat_ms" in case and "nested_ms" in case:
                case["speedup"] = round(case["nested_ms"] / case["flat_ms"], 3)
            results["cases"].append(case)
            print(f"[fp8ab] {json.dumps(case)}", flush=True)
            result_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return status


# ------------------------------------------------------------------------------------------------- markdown
def markdown(session: dict) -> str:
    lines = [
        f"# GPU session: {session['device']} ({session['date']})",
        "",
        f"{'DRY RUN (CPU, tiny shapes). ' if session['dry_run'] else ''}"
        f"torch {session['versions'].get('torch')} · triton {session['versions'].get('triton')} · "
        f"CUDA {session['versions'].get('cuda')} · python {session['versions'].get('python')} · "
        f"total {session['wall_s']:.0f} s of {session['budget_s']:.0f} s",
        "",
        "| phase | status | seconds | budget s | summary |",
        "|---|---|---|---|---|",
    ]
    for p in session["phases"]:
        lines.append(f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['budget_s']} | {p.get('summary', '')} |")
    train = session.get("train")
    if train and train.get("runs"):
        lines += ["", f"## Train step ({train['preset']}, {train['batch']} x {train['seq']} tokens, "
                      f"{(train.get('params') or 0) / 1e9:.2f} B parameters)", "",
                  "| variant | status | step s | tokens/s | TFLOP/s | MFU % (data-sheet peak) | % of measured matmul |",
                  "|---|---|---|---|---|---|---|"]
        for r in train["runs"]:
            if r["status"] != "ok":
                lines.append(f"| {r['variant']} | {r['status']} | | | | | |")
                continue
            mfu = f"{r['mfu_pct']:.1f}" if "mfu_pct" in r else "—"
            meas = f"{r['pct_of_measured_matmul']:.1f}" if "pct_of_measured_matmul" in r else "—"
            lines.append(f"| {r['variant']} | ok | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | "
                         f"{mfu} | {meas} |")
    ab = session.get("fp8ab")
    if ab and ab.get("cases"):
        lines += ["", "## FP8 GEMM structures: nested (first version) vs flat (flattened loop, TMA-store epilogue)", "",
                  "| M x N x K | scales | nested ms | flat ms | nested TFLOP/s | flat TFLOP/s | speed-up | max abs diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in ab["cases"]:
            cells = [c.get(f"{s}_{f}", c.get(f"{s}_error", "—") if f == "ms" else "—")
                     for f in ("ms", "tflops") for s in ("nested", "flat")]
            cells = [cells[0], cells[2], cells[1], cells[3]]
            lines.append(f"| {c['shape']} | {c['scales']} | " + " | ".join(str(x)[:60] for x in cells)
                         + f" | {c.get('speedup', '—')} | {c.get('max_abs_diff', '—')} |")
    aot = session.get("aot")
    if aot:
        lines += ["", f"## AOT ({aot['arch']}): {aot['variants']} variants, {len(aot['failures'])} with problems", ""]
        lines += [f"- {f['kernel']} {f['config'][:90]}: {'; '.join(f['problems'])}" for f in aot["failures"][:40]]
    lines += ["", "Files: " + ", ".join(session["files"]) + ". Generated by `python -m benchmarks.gpu_session`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def _summary(name: str, rec: dict, work: Path, out: Path, arch: str, session: dict) -> str:
    from benchmarks.report import _summary_line

    text = rec.get("_log", "")
    if name == "aot" and (out / f"aot-{arch}.json").exists():
        data = json.loads((out / f"aot-{arch}.json").read_text())
        session["aot"] = {"arch": arch, "variants": len(data["rows"]), "failures": data["failures"]}
        return f"{len(data['rows'])} variants, {len(data['failures'])} with problems"
    if name in ("parity", "bench"):
        return _summary_line(text)[:200]
    if name == "fp8ab" and (work / "fp8ab.json").exists():
        session["fp8ab"] = json.loads((work / "fp8ab.json").read_text())
        return "; ".join(f"{c['shape']} {c['scales']}: x{c['speedup']}" if "speedup" in c
                         else f"{c['shape']} {c['scales']}: {'ok' if 'max_abs_diff' in c else 'failed'}"
                         for c in session["fp8ab"]["cases"])[:200]
    if name == "train" and (work / "train.json").exists():
        session["train"] = json.loads((work / "train.json").read_text())
        return "; ".join(
            f"{r['variant']}: {r['tokens_per_s']:.0f} tok/s" + (f", MFU {r['mfu_pct']:.1f}%" if "mfu_pct" in r else "")
            if r["status"] == "ok" else f"{r['variant']}: {r['status'][:80]}"
            for r in session["train"]["runs"]
        )
    return (rec["tail"][-1] if rec["tail"] else "")[:200]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_train"]:
        return _train_main(Path(argv[1]), "--dry-run" in argv)
    if argv[:1] == ["--_fp8ab"]:
        return _fp8ab_main(Path(argv[1]), "--dry-run" in argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the session's files (flat)")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny shapes, the PyTorch path")
    parser.add_argument("--budget-s", type=float, default=540.0, help="hard limit for the whole session")
    parser.add_argument("--phases", default=None, help=f"comma-separated subset of {','.join(p[0] for p in PHASES)}")
    parser.add_argument("--phase-budget", action="append", default=[], metavar="NAME=SECONDS",
                        help="override one phase's budget (repeatable)")
    args = parser.parse_args(argv)

    import torch

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    budgets = {name: (dry if args.dry_run else gpu) for name, gpu, dry in PHASES}
    for item in args.phase_budget:
        name, _, secs = item.partition("=")
        if name not in budgets:
            parser.error(f"--phase-budget: unknown phase {name!r}")
        budgets[name] = float(secs)
    wanted = args.phases.split(",") if args.phases else [p[0] for p in PHASES]
    arch = _arch()
    on_cuda = torch.cuda.is_available() and not args.dry_run
    if not on_cuda and not args.dry_run:
        print("[session] no CUDA device: use --dry-run to rehearse on a CPU", file=sys.stderr)
        return 2

    from benchmarks.conftest import versions

    session = {
        "schema": 1,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017 (3.10)
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
        "arch": arch,
        "versions": versions(),
        "budget_s": args.budget_s,
        "phases": [],
    }
    logs = []
    with tempfile.TemporaryDirectory(prefix="xk-session-") as tmp:
        work = Path(tmp)
        steps = [s for s in plan(args.dry_run, out, work, arch) if s[0] in wanted]
        for i, (name, cmd, extra_env) in enumerate(steps):
            later = sum(min(20.0, budgets[n]) for n, _, _ in steps[i + 1 :])  # leave each later phase a start
            timeout = min(budgets[name], deadline - time.monotonic() - later)
            if cmd is None or timeout < 1:
                rec = {"phase": name, "status": "skipped (no time left)" if cmd else "skipped", "seconds": 0,
                       "budget_s": budgets[name], "tail": [], "_log": ""}
            else:
                if name == "bench":
                    cmd = [*cmd, "--budget-s", str(max(10.0, timeout - 15))]
                print(f"[session] {name} (limit {timeout:.0f} s): {' '.join(cmd[1:])}", flush=True)
                env = {**os.environ, **extra_env, "PYTHONUNBUFFERED": "1"}
                env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
                if "TRITON_INTERPRET" not in extra_env:
                    env.pop("TRITON_INTERPRET", None)
                rec = run_phase(name, cmd, timeout, env)
            rec["summary"] = _summary(name, rec, work, out, arch, session)
            print(f"[session]   {rec['status']} in {rec['seconds']} s: {rec['summary']}", flush=True)
            logs.append(f"===== {name}: {rec['status']} ({rec['seconds']} s of {rec['budget_s']} s) =====\n"
                        + rec.pop("_log", ""))
            session["phases"].append(rec)
        bench_dir = work / "bench"
        for suffix in ("json", "md"):
            found = sorted(bench_dir.glob(f"*.{suffix}")) if bench_dir.is_dir() else []
            if found:
                shutil.copyfile(found[-1], out / f"bench.{suffix}")
    session["wall_s"] = time.monotonic() - t0
    (out / "session.log").write_text("\n".join(logs), encoding="utf-8")
    session["files"] = sorted(p.name for p in out.iterdir() if p.is_file()) + (
        [] if (out / "session.json").exists() else ["session.json", "session.md"]
    )
    session["files"] = sorted(set(session["files"]))
    (out / "session.json").write_text(json.dumps(session, indent=1) + "\n", encoding="utf-8")
    (out / "session.md").write_text(markdown(session), encoding="utf-8")
    print(f"[session] wrote {', '.join(session['files'])} into {out} in {session['wall_s']:.0f} s", flush=True)
    return 0 if all(p["status"] == "ok" for p in session["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
