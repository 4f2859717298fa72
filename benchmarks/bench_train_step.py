"""End-to-end training step (forward, backward, AdamW step): our Xmodel vs a Hugging Face LlamaForCausalLM.

Two groups, each with HF ``LlamaForCausalLM`` of identical shape (μP scalars aside) as the peer:

* ``logits`` -- the model returns the (tokens x vocab) logits and the loss is taken from them
  (ours: ``model(ids, labels=..., return_logits=True)``; HF: ``model(input_ids=ids, labels=ids)``, which always
  materialises the logits);
* ``labels`` -- the loss straight from the labels: ours through the fused chunked
  :func:`xkernels.linear_cross_entropy` (no logits in memory); HF as above (it has no fused loss).

Script mode, the CPU figure of the report (side by side in one process, rounds interleaved)::

    python -m benchmarks.bench_train_step --repeats 30 [--compile] [--threads 1] [--no-write]

prints the median step time of each variant and the ratios (HF time / ours: > 1 means ours is faster;
eager / compiled for ``--compile``, which compiles each decoder block as ``python -m xmodel.train --compile``
does) and writes ``benchmarks/results/train-step-cpu-<date>.{json,md}`` with the torch / triton / transformers
versions, the CPU and the date.  Timing: ``time.process_time`` of one thread (robust to other jobs on a shared
machine), medians over ``--repeats`` rounds, the variants' order rotating each round.  Each ratio is given twice:
as the ratio of the two medians and as the median of the per-round ratios (the two steps of one round run back to
back, so slow drifts of a shared machine cancel) with its distribution-free 95% interval (:func:`median_ci`).

pytest-benchmark cases (``pytest benchmarks/bench_train_step.py``; CI smoke: ``--benchmark-disable``, one tiny step
each) -- CUDA: the 1.3B architecture at full width (hidden 1536, 24/8 heads x 64, FFN 3840, vocab 129280) with
**4 of its 48 layers**, bf16 parameters, batch 2 x seq 4096; variants ``eager`` (PyTorch path), ``xkernels``,
``xkernels+compile`` (per decoder block), ``xkernels+fp8`` and the peer ``hf-llama``.  CPU: the ``cpu-default``
preset (4 layers, hidden 256, vocab 4096), fp32, batch 4 x seq 256 (on CPU ``xkernels`` runs the PyTorch path).

FLOPs per step: ``config.flops_per_token(seq) * tokens`` (matmuls only, backward = 2x forward); MFU is that rate
over the measured bf16 (CUDA) or fp32 (CPU) matmul ceiling, reported as ``pct_of_ceiling``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import xkernels
from benchmarks.common import DEVICE, ON_CUDA, import_peer, pick, require_attr, require_compile, require_cuda, run
from xmodel.config import XmodelConfig
from xmodel.model import Xmodel

HEADS = ("logits", "labels")
PRESET, OVERRIDES = pick(("xmodel-2.5", {"num_hidden_layers": 4}), ("cpu-default", {}))
BATCH, SEQ = pick((2, 4096), (4, 256))
DTYPE = pick(torch.bfloat16, torch.float32)
IMPLS = ["eager", "xkernels", "xkernels+compile", "xkernels+fp8", "hf-llama"]


# ------------------------------------------------------------------------------------------------ models
def hf_llama(cfg: XmodelConfig, seq: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """HF ``LlamaForCausalLM`` with the shape of ``cfg`` (ImportError when transformers is absent)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=max(seq, 2048),
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    with torch.device(device):
        return transformers.LlamaForCausalLM(hf_cfg)


def loss_fn(impl: str, head: str) -> Callable:
    """``loss(model, ids, labels)`` for a variant: ``labels`` are aligned with ``ids`` (ours) -- HF shifts
    internally, so it gets the ids (its loss covers T-1 positions, its logits all T)."""
    if impl.startswith("hf"):
        return lambda m, ids, labels: m(input_ids=ids, labels=ids).loss
    return_logits = head == "logits"
    return lambda m, ids, labels: m(ids, labels=labels, return_logits=return_logits).loss


def make_step(model: torch.nn.Module, loss: Callable, backend: Callable = contextlib.nullcontext) -> Callable:
    """One training step on ``(ids, labels)``: forward, backward, AdamW step, zero grads."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        with backend():
            loss(model, ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------------ script mode
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 -- absent or broken: recorded as None
            out[name] = None
    return out


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics ``x_(k)``, ``x_(n+1-k)`` with
    the largest ``k`` such that ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2`` (the whole range when ``n`` is too
    small for ``level``)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    alpha, k, tail = (1.0 - level) / 2.0, 0, 0.0
    while k < n // 2:
        tail_next = tail + math.comb(n, k) / 2.0**n  # P(Binomial(n, 1/2) <= k)
        if tail_next > alpha:
            break
        tail, k = tail_next, k + 1
    # P(Bin < k) <= alpha: the k-th smallest and k-th largest values (1-based), or the whole range for k = 0
    return (xs[k - 1], xs[n - k]) if k > 0 else (xs[0], xs[-1])


def measure(args: argparse.Namespace) -> dict:
    """Build every variant, warm it up, time ``args.repeats`` interleaved rounds; return the report dict."""
    from xmodel.training.compile import RecompileLog, compile_blocks, compile_counters

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = XmodelConfig.from_preset(args.preset)
    variants: dict[str, tuple[str, Callable]] = {}  # name -> (group, step)
    compiled_stats: dict[str, dict] = {}
    for head in HEADS:
        variants[f"xmodel/{head}"] = (head, make_step(Xmodel(cfg), loss_fn("xmodel", head)))
        variants[f"hf-llama/{head}"] = (head, make_step(hf_llama(cfg, args.seq), loss_fn("hf", head)))
        if args.compile:
            model = compile_blocks(Xmodel(cfg))
            variants[f"xmodel+compile/{head}"] = (head, make_step(model, loss_fn("xmodel", head)))
    gen = torch.Generator().manual_seed(1)
    pool = []
    for _ in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        pool.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))

    with xkernels.force_backend("torch"), RecompileLog() as recompiles:
        for name, (_, step) in variants.items():  # warm-up (compilation included), untimed
            before = compile_counters()
            t0 = time.perf_counter()
            for i in range(args.warmup):
                step(*pool[i % len(pool)])
            if "+compile" in name:
                after = compile_counters()
                compiled_stats[name] = {k: after[k] - before[k] for k in after}
                compiled_stats[name]["warmup_s"] = round(time.perf_counter() - t0, 2)
        warm_counters = compile_counters()
        names = list(variants)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeats):
            ids, labels = pool[r % len(pool)]
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.process_time()
                variants[name][1](ids, labels)
                times[name].append(time.process_time() - t0)
        timed_counters = compile_counters()

    medians = {n: statistics.median(v) for n, v in times.items()}
    pairs = {f"hf/{head}": (f"hf-llama/{head}", f"xmodel/{head}") for head in HEADS}
    if args.compile:
        pairs.update({f"compile/{head}": (f"xmodel/{head}", f"xmodel+compile/{head}") for head in HEADS})
        pairs.update({f"hf_vs_compiled/{head}": (f"hf-llama/{head}", f"xmodel+compile/{head}") for head in HEADS})
    ratios = {key: medians[num] / medians[den] for key, (num, den) in pairs.items()}
    paired = {}
    for key, (num, den) in pairs.items():
        per_round = [a / b for a, b in zip(times[num], times[den])]
        lo, hi = median_ci(per_round)
        paired[key] = {"median": round(statistics.median(per_round), 4), "ci95": [round(lo, 4), round(hi, 4)]}
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "kind": "train_step_cpu",
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.bench_train_step " + " ".join(args.argv),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
        "versions": versions(),
        "shape": {"preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": "float32",
                  "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                  "params": Xmodel(cfg).num_parameters()},
        "timing": {"clock": "time.process_time", "repeats": args.repeats, "warmup": args.warmup,
                   "step": "forward + backward + AdamW step + zero_grad", "xkernels_backend": "torch"},
        "median_s": {n: round(v, 5) for n, v in medians.items()},
        "min_s": {n: round(min(v), 5) for n, v in times.items()},
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "paired_ratios": paired,
        "compile": {"per_variant_warmup": compiled_stats, "after_warmup": warm_counters,
                    "recompiles_while_timed": timed_counters["frames"] - warm_counters["frames"],
                    "recompile_reasons": recompiles.reasons} if args.compile else None,
    }


def _fp8_cases() -> list[tuple[str, Callable, tuple]]:
    """``(name, fn, inputs)`` for the FP8 ops and modules: quantize + cast_transpose, fp8_gemm, and FP8Linear
    under each recipe (training: the delayed-scaling history update is in the graph)."""
    from xkernels.fp8 import E4M3, E5M2, FP8Linear, FP8Recipe, cast_transpose, fp8_gemm, quantize

    def casts(x):
        q, sc = quantize(x, E4M3, "tensor")
        q2, s2, qt, st, amax = cast_transpose(x, E5M2, "block_1x128", pad_to=16, return_amax=True)
        return q.float().sum() + sc.sum() + qt.float().sum() + st.sum() + amax

    a, sa = quantize(torch.randn(40, 128), E4M3, "tensor")
    b, sb = quantize(torch.randn(32, 128), E4M3, "tensor")
    cases = [("fp8 quantize + cast_transpose", casts, (torch.randn(40, 144),)),
             ("fp8_gemm", lambda a, b, sa, sb: fp8_gemm(a, b, sa, sb, out_dtype=torch.float32).sum(), (a, b, sa, sb))]
    for recipe in ("delayed", "current", "row", "block"):
        mod = FP8Linear(64, 48, recipe=FP8Recipe.from_name(recipe, amax_history_len=4)).train()
        cases.append((f"FP8Linear ({recipe}, training)", lambda x, mod=mod: mod(x).sum(),
                      (torch.randn(2, 20, 64, requires_grad=True),)))
    return cases


def explain_ops(backends: tuple[str, ...]) -> list[dict]:
    """``torch._dynamo.explain`` of every public op (the cases of tests/op_cases.py, whose forward+backward the
    test suite also compiles, plus the FP8 ops): graphs and graph breaks per op and backend."""
    from tests.op_cases import CASES

    rows = []
    for backend in backends:
        cases = [(c.name, c.fn, c.build("cpu", backend)) for c in CASES] + _fp8_cases()
        for name, fn, inputs in cases:
            torch._dynamo.reset()
            with xkernels.force_backend(backend):
                ex = torch._dynamo.explain(fn)(*inputs)
            rows.append({"op": name, "backend": backend, "graphs": ex.graph_count, "breaks": ex.graph_break_count,
                         "break_reasons": [str(r.reason)[:200] for r in ex.break_reasons]})
    torch._dynamo.reset()
    return rows


def markdown(report: dict) -> str:
    s, v, m = report["shape"], report["versions"], report["machine"]
    lines = [
        f"# Train step on CPU: Xmodel vs HF LlamaForCausalLM ({report['date']})",
        "",
        f"`{report['command']}`",
        "",
        f"CPU {m['cpu']} ({m['cores']} cores, {m['threads']} thread(s) used); torch {v['torch']}, triton {v['triton']}, "
        f"transformers {v['transformers']}, python {v['python']}.",
        f"Shape: `{s['preset']}` ({s['layers']} layers x {s['hidden']}, vocab {s['vocab']}, {s['params']:,} params), "
        f"batch {s['batch']} x seq {s['seq']}, {s['dtype']}.  Step = {report['timing']['step']}; "
        f"{report['timing']['clock']}, median of {report['timing']['repeats']} interleaved rounds "
        f"(after {report['timing']['warmup']} warm-up steps each).",
        "",
        "| variant | median step (ms) | min (ms) |",
        "|---|---:|---:|",
    ]
    for name, med in report["median_s"].items():
        lines.append(f"| {name} | {med * 1e3:.1f} | {report['min_s'][name] * 1e3:.1f} |")
    lines += ["", "| ratio | of the medians | median of per-round ratios | 95% CI of that median |", "|---|---:|---:|---|"]
    labels = {"hf": "HF time / ours (eager)", "compile": "ours eager / ours compiled",
              "hf_vs_compiled": "HF time / ours compiled"}
    for key, value in report["ratios"].items():
        kind, head = key.split("/")
        p = report["paired_ratios"][key]
        lines.append(f"| {labels[kind]}, {head} | {value:.3f}x | {p['median']:.3f}x | "
                     f"[{p['ci95'][0]:.3f}x, {p['ci95'][1]:.3f}x] |")
    lines += ["", "Per-round ratios pair the two variants' steps of the same round (run back to back), which cancels "
              "slow drifts of the machine; the interval is the distribution-free one of their median "
              "(binomial order statistics)."]
    if report.get("compile"):
        c = report["compile"]
        lines += ["", "Compiled variants (per decoder block, `xmodel.training.compile.compile_blocks`):", ""]
        for name, st in c["per_variant_warmup"].items():
            lines.append(f"* {name}: {st['frames']} frame(s) compiled, {st['unique_graphs']} graph(s), "
                         f"{st['graph_breaks']} graph break(s), warm-up {st['warmup_s']} s")
        lines.append(f"* recompilations while timed: {c['recompiles_while_timed']}")
    if report.get("explain"):
        backends = sorted({r["backend"] for r in report["explain"]})
        lines += ["", f"`torch._dynamo.explain` per op ({', '.join(backends)} path; Triton on CPU = the interpreter):",
                  "", "| op | " + " | ".join(f"{b}: graphs / breaks" for b in backends) + " |",
                  "|---|" + "---:|" * len(backends)]
        by_op: dict[str, dict[str, dict]] = {}
        for r in report["explain"]:
            by_op.setdefault(r["op"], {})[r["backend"]] = r
        for op, per in by_op.items():
            cells = [f"{per[b]['graphs']} / {per[b]['breaks']}" if b in per else "-" for b in backends]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--compile", action="store_true", help="also time ours with each decoder block compiled")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--preset", default="cpu-default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-explain", action="store_true",
                        help="skip the per-op torch._dynamo.explain table (the Triton path is explained when kernels "
                             "can run: on a GPU, or on CPU with TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    report = measure(args)
    if not args.no_explain:
        from xkernels.dispatch import interpreting, triton_available

        kernels = triton_available() and (torch.cuda.is_available() or interpreting())
        report["explain"] = explain_ops(("torch", "triton") if kernels else ("torch",))
    text = markdown(report)
    print(text)
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"train-step-cpu-{report['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        stem.with_suffix(".md").write_text(text, encoding="utf-8")
        print(f"wrote {stem}.json and {stem}.md")
    return 0


# ------------------------------------------------------------------------------------------------ pytest cases
def _build(impl: str, cfg: XmodelConfig):
    """``(model, backend_context)`` for one variant."""
    if impl == "eager" and not ON_CUDA:
        pytest.skip("on CPU the xkernels case already runs the PyTorch path (it is the eager baseline)")
    if impl == "xkernels+fp8":
        require_cuda(impl)
    if impl == "xkernels+compile":
        require_compile()
    if impl == "hf-llama":
        import_peer("transformers", "transformers (pip install transformers)")
        return hf_llama(cfg, SEQ, DEVICE).to(DTYPE), contextlib.nullcontext
    with torch.device(DEVICE):
        model = Xmodel(cfg)
    model = model.to(DTYPE)
    if impl == "xkernels+fp8":
        fp8 = import_peer("xkernels.fp8", "xkernels.fp8")
        require_attr(fp8, "convert_to_fp8", "xkernels.fp8.convert_to_fp8")(model, fp8.FP8Recipe())
    if impl == "xkernels+compile":
        from xmodel.training.compile import compile_blocks

        compile_blocks(model, dynamic=False)
    backend = (lambda: xkernels.force_backend("torch")) if impl == "eager" else contextlib.nullcontext
    return model, backend


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, impl, head):
    cfg = XmodelConfig.from_preset(PRESET, **OVERRIDES)
    model, backend = _build(impl, cfg)
    model.train()
    step = make_step(model, loss_fn(impl, head), backend)
    batch, seq = (1, 64) if benchmark.disabled else (BATCH, SEQ)  # CI smoke: one tiny step

    def make_inputs():
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=DEVICE)
        return (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()), None

    tokens = batch * seq
    run(
        benchmark,
        fn=step,
        make_inputs=make_inputs,
        mode="call",
        impl=impl,
        family="train_step",
        group=f"train step ({head}) {PRESET}{'-' + str(cfg.num_hidden_layers) + 'L' if OVERRIDES else ''} "
        f"{batch}x{seq} {str(DTYPE).removeprefix('torch.')}",
        shape=f"{batch}x{seq}",
        dtype=DTYPE,
        flops=cfg.flops_per_token(seq) * tokens,
        ceiling="matmul_bf16_tflops" if DTYPE == torch.bfloat16 else "matmul_fp32_tflops",
        warmup=pick(3, 1),
        extra={"tokens": tokens, "layers": cfg.num_hidden_layers, "preset": PRESET, "head": head},
    )



if __name__ == "__main__":
    raise SystemExit(main())
