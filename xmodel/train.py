"""Train Xmodel-2.5: ``python -m xmodel.train [--config FILE|NAME] [--key value]...``

With no arguments: builds the default corpus (stdlib source + pydoc topics), trains a 4096-token byte-level BPE,
and trains the ``cpu-default`` model through the whole recipe -- warmup, stable, decay with the switch to Muon --
in a few minutes on a CPU.  Under ``torchrun --nproc_per_node N`` the same command runs FSDP2 (or DDP).
Every option: ``python -m xmodel.train --help``; the recipe's facts: ``xmodel/configs/*.yaml``.

The recipe, step by step (see :func:`train_loop`): the lr follows the WSD schedule; at the decay start the hidden
matrices move from AdamW to Muon; the forward runs under bf16 autocast on CUDA (fp32 master weights), fp32 on CPU,
with the transformer linears in FP8 when ``--fp8`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from xmodel.training import checkpoint as ckpt
from xmodel.training.config import TrainConfig, parse_args, resolve_lr
from xmodel.training.data import MixtureSampler, check_token_ids
from xmodel.training.distributed import (DistInfo, check_fp8_all_gather, check_replicate, exit_process,
                                         init_distributed, shutdown, unwrap, wrap_model)
from xmodel.training.metrics import MetricsLogger, peak_flops, plot_metrics
from xmodel.training.optim import TrainOptimizer, build_adamw
from xmodel.training.faults import fault_point
from xmodel.training.prepare import (
    build_model_config,
    check_compatible,
    check_schedule_change,
    check_writable_dir,
    choose_checkpoint,
    fp8_convert,
    load_data,
    log0,
    run_identity,
    validation_set,
)
from xmodel.training.schedule import WSDSchedule


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite steps, ...): the message says what happened and what is intact."""


class BadInput(ValueError):
    """Bad input found at startup, before the run directory is written (exit status 2)."""


class RunFailure(RuntimeError):
    """An unexpected error after the run started (exit status 1); ``__cause__`` holds the original exception."""


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits 0.  A second SIGINT aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Run:
    """Everything :func:`train_loop` needs, built by :func:`setup`."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    model: torch.nn.Module  # possibly wrapped (FSDP2 / DDP / compiled)
    model_config: Any
    optimizer: TrainOptimizer
    schedule: WSDSchedule
    sampler: MixtureSampler
    val: list[torch.Tensor]
    start_step: int
    identity: dict[str, Any]
    tokenizer_dir: Path | None  # None when training on .bin shards without --tokenizer
    log: MetricsLogger | None = None
    resumed_from: Path | None = None
    autocast: Any = None
    first_val: float | None = None
    last_val: float | None = None
    step: int = 0  # completed optimizer steps (for error messages)
    last_ckpt: Path | None = None  # the newest complete checkpoint


# ---------------------------------------------------------------------------------------------------------
# Setup: everything that can fail on bad input happens here, before the run directory is touched.
# ---------------------------------------------------------------------------------------------------------
def setup(cfg: TrainConfig) -> Run:
    info, device = init_distributed(cfg.device)
    check_fp8_all_gather(cfg.fp8_all_gather, info)
    if cfg.threads or device.type == "cpu":
        torch.set_num_threads(cfg.threads or 1)

    def log(msg: str) -> None:
        log0(info, msg)

    check_writable_dir(cfg.run_dir, "--out-dir")
    if not cfg.cache_path.is_dir():  # an existing cache may be read-only (shared and complete)
        check_writable_dir(cfg.cache_path, "--cache-dir" if cfg.cache_dir else
                           "--cache-dir (unset: $XMODEL_CACHE or ~/.cache/xmodel)")
    model_config = build_model_config(cfg)
    chosen = choose_checkpoint(cfg, log)
    if info.active:  # every rank validated the same files; make sure they agree before loading
        step = -1 if chosen is None else int(chosen.meta["step"])
        t = torch.tensor([step, -step], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # (max step, -min step)
        if t.tolist() != [step, -step]:
            raise ValueError("--resume: the ranks found different checkpoints (is the run directory on a "
                             "filesystem every rank sees?)")
    tokenizer, train, val, train_specs, val_specs = load_data(cfg, info)
    if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"--tokenizer: its vocabulary has {tokenizer.vocab_size} ids but the model has vocab_size "
            f"{model_config.vocab_size}; set --model.vocab_size {tokenizer.vocab_size} (or larger)"
        )
    check_token_ids(train, model_config.vocab_size, "data")
    check_token_ids(val, model_config.vocab_size, "val-data")
    identity = run_identity(cfg, model_config, tokenizer, train_specs, val_specs, info)
    meta = None
    init = None
    if chosen is not None:
        meta = chosen.meta
        check_compatible(meta.get("identity", {}), identity, chosen.path)
        check_layout_change(meta, cfg, info, chosen.path, log)
        if int(meta["step"]) < cfg.steps:
            check_schedule_change(meta.get("config", {}), cfg, int(meta["step"]), meta["phase"], chosen.path, log)
    elif cfg.init_from:
        try:
            init = ckpt.check_checkpoint(Path(cfg.init_from))
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"--init-from: {exc}") from None
        check_compatible({"model": init.meta.get("identity", {}).get("model")}, {"model": identity["model"]},
                         Path(cfg.init_from))
    check_muon_settings(cfg)
    check_replicate(cfg.parallel, cfg.dp_replicate if info.active else 1, info)

    # Model: built on the meta device, materialised, initialised from the seed (identically on every rank).
    from xmodel.model import Xmodel

    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = Xmodel(model_config)
    model.to_empty(device=device)
    model.init_weights(scheme=cfg.init, generator=torch.Generator(device=device).manual_seed(cfg.seed))
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.fp8:
        fp8_convert(model, cfg, device, info)
    if cfg.compile:  # per decoder block, after AC and FP8 conversion, before FSDP2 / DDP (as torchtitan)
        from xmodel.training.compile import compile_blocks

        compile_blocks(model)
    model = wrap_model(model, cfg.parallel, device, info, cfg.dp_replicate, cfg.fp8_all_gather and info.active)

    lr = resolve_lr(cfg, model_config.mup_width_multiplier)
    optimizer = TrainOptimizer(
        build_adamw(model, lr, cfg.lr_embed, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay), model)
    schedule = WSDSchedule(cfg.warmup_steps, cfg.decay_start_step, cfg.decay_steps, cfg.min_lr_ratio, cfg.decay_shape)
    sampler = MixtureSampler(train, cfg.seed)
    sampler.vocab_size = model_config.vocab_size
    val_batches = validation_set(cfg, val, info)

    start_step = 0
    source = chosen or init
    if source is not None:
        if source.meta["phase"] == "muon":
            _switch(optimizer, cfg)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        ckpt.load_checkpoint(source, model, optimizer, info, "--resume" if chosen else "--init-from")
        source.state = None  # the loaded tensors now live in the model and optimizer
        for g, h in zip(optimizer.param_groups, hyper):  # hyper-parameters come from this run's config
            g.update(h)
    if meta is not None:  # resume: also the data position and the step
        sampler.load_state_dict(meta["data"])
        start_step = int(meta["step"])

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    run = Run(cfg, info, device, model, model_config, optimizer, schedule, sampler, val_batches, start_step,
              identity, tokenizer.export_dir if tokenizer else None, autocast=autocast,
              resumed_from=chosen.path if chosen else None)
    run.first_val = meta.get("first_val") if meta else None
    run.last_val = meta.get("last_val") if meta else None
    run.step = start_step
    run.last_ckpt = chosen.path if chosen else None
    return run


def check_layout_change(meta: dict, cfg: TrainConfig, info: DistInfo, path: Path, log) -> None:
    """Resuming at another world size (or micro-batch, accumulation, parallelism): say what changed; refuse a changed
    global batch (``batch_size * grad_accum * world``) unless ``--allow-batch-change``.  The checkpoint itself loads
    at any world size (DCP reshards it); the data position counts global samples, so it carries over as it is."""
    saved = meta.get("config", {})
    old = {"world": int(meta.get("world", 1)), "batch_size": int(saved.get("batch_size", cfg.batch_size)),
           "grad_accum": int(saved.get("grad_accum", cfg.grad_accum)), "parallel": saved.get("parallel", cfg.parallel),
           "dp_replicate": int(saved.get("dp_replicate", 1))}
    new = {"world": info.world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "parallel": cfg.parallel,
           "dp_replicate": cfg.dp_replicate}
    for side in (old, new):
        if side["world"] == 1:  # one process has no parallelism to compare
            side.update(parallel=None, dp_replicate=None)
    changes = [f"{'processes' if k == 'world' else '--' + k.replace('_', '-')} {old[k]} -> {new[k]}"
               for k in old if old[k] is not None and new[k] is not None and old[k] != new[k]]
    if not changes:
        return
    g_old = old["batch_size"] * old["grad_accum"] * old["world"]
    g_new = new["batch_size"] * new["grad_accum"] * new["world"]
    if g_old != g_new and not cfg.allow_batch_change:
        hints = []
        if g_old % (cfg.grad_accum * info.world) == 0:
            hints.append(f"--batch-size {g_old // (cfg.grad_accum * info.world)}")
        if g_old % (cfg.batch_size * info.world) == 0:
            hints.append(f"--grad-accum {g_old // (cfg.batch_size * info.world)}")
        keep = f" (e.g. {' or '.join(hints)})" if hints else ""
        raise ValueError(
            f"--batch-size/--grad-accum: {path} was trained with a global batch of {old['batch_size']} x "
            f"{old['grad_accum']} x {old['world']} = {g_old} sequences per step (micro-batch x accumulation x "
            f"processes); this run has {cfg.batch_size} x {cfg.grad_accum} x {info.world} = {g_new}. Keep the global "
            f"batch{keep}, or pass --allow-batch-change to continue with {g_new} sequences per step")
    log(f"resuming with a changed layout: {', '.join(changes)}; global batch {g_old} -> {g_new} sequences"
        f"{' (kept)' if g_old == g_new else ' (--allow-batch-change)'}; the checkpoint is resharded on load")


def check_muon_settings(cfg: TrainConfig) -> None:
    """Build a Muon optimizer with this run's settings on a 2x2 matrix now, so a setting it rejects fails at startup
    and not hours later at the decay start."""
    if cfg.decay_optimizer != "muon":
        return
    from xkernels.optim import MuonWithAuxAdamW

    p = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        MuonWithAuxAdamW([{"params": [p], "use_muon": True, "lr": 1e-3, "weight_decay": cfg.weight_decay}],
                         momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                         adjust_lr_fn=cfg.muon_adjust_lr)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--muon-momentum/--muon-ns-steps/--muon-adjust-lr: Muon rejects these settings ({exc}); "
                         f"they take effect at the decay start (step {cfg.decay_start_step})") from None


def _switch(optimizer: TrainOptimizer, cfg: TrainConfig) -> int:
    compute_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.muon_dtype]
    return optimizer.switch_to_muon(cfg.muon_momentum, cfg.muon_nesterov, cfg.muon_ns_steps, cfg.muon_adjust_lr,
                                    compute_dtype)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------
def micro_batch_loss(run: Run, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(run.device, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T): predict token t+1 from tokens <= t
    with run.autocast:
        return run.model(inputs, labels=targets).loss


@torch.no_grad()
def evaluate(run: Run) -> float:
    run.model.eval()
    total = count = 0.0
    for batch in run.val:
        loss = micro_batch_loss(run, batch)
        total += float(loss) * batch.shape[0]
        count += batch.shape[0]
    run.model.train()
    total, count = run.info.all_reduce_sum([total, count], run.device)
    return total / count


def save(run: Run, step: int) -> Path:
    meta = {"phase": run.optimizer.phase, "data": run.sampler.state_dict(), "identity": run.identity,
            "config": run.cfg.to_dict(), "first_val": run.first_val, "last_val": run.last_val,
            "tokenizer_dir": str(run.tokenizer_dir) if run.tokenizer_dir else None}
    log = run.log.message if run.log is not None else (lambda msg: log0(run.info, msg))
    run.last_ckpt = ckpt.save_checkpoint(run.cfg.run_dir, step, run.model, run.optimizer, meta, run.info,
                                         run.cfg.keep_last, log)
    return run.last_ckpt


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Reduce gradients across ranks only on the last micro-batch of a step (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``); a no-op with one process."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def grad_norm(run: Run) -> float:
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    max_norm = run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def train_loop(run: Run) -> Path:
    """Returns the final checkpoint.  The recipe is the first four lines inside the step loop."""
    cfg, info, log, opt = run.cfg, run.info, run.log, run.optimizer
    tokens_per_step = cfg.batch_size * cfg.grad_accum * info.world * cfg.seq_len
    nonfinite_in_a_row = 0
    step = run.start_step
    fp8_scales = None
    if cfg.fp8_all_gather and info.active:  # the FP8 all-gather scales from each weight's global amax
        from xkernels.fp8.fsdp import precompute_fp8_scales as fp8_scales

        fp8_scales(run.model)
    if step == 0 and cfg.eval_every:
        run.first_val = run.last_val = evaluate(run)
        log.eval(0, run.last_val)
    with StopSignal() as stop:
        while step < cfg.steps:
            if (cfg.decay_optimizer == "muon" and opt.phase == "adamw"
                    and step >= run.schedule.decay_start and run.schedule.decay > 0):  # the AdamW -> Muon switch
                moved = _switch(opt, cfg)
                log.event(step, "switch_to_muon", params=moved)
                log.message(f"step {step}: decay starts; {moved} hidden matrices switch AdamW -> Muon "
                            f"(embedding and norms stay on AdamW)")
            opt.set_lr(run.schedule.factor(step))  # WSD schedule

            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                with gradient_sync(run.model, micro == cfg.grad_accum - 1):
                    loss = micro_batch_loss(run, run.sampler.next_batch(cfg.batch_size, info.rank, info.world))
                    if step in cfg.inject_nonfinite_at:  # fault injection for tests
                        loss = loss * float("nan")
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
            norm = grad_norm(run)
            loss_value = info.all_reduce_sum([loss_sum / cfg.grad_accum], run.device)[0] / info.world
            finite = math.isfinite(loss_value) and math.isfinite(norm)
            fault_point("step", info.rank)  # crash tests: a kill -9 inside a step
            if finite:
                opt.step()
                nonfinite_in_a_row = 0
            if fp8_scales is not None:  # --fp8-all-gather: next step's weight scales, one all-reduce for all
                fp8_scales(run.model)
            opt.zero_grad()
            step += 1
            run.step = step

            log.train(step, loss_value, opt.lr_of("matrix"), opt.lr_of("embed"), norm,
                      step * tokens_per_step, tokens_per_step, run.schedule.phase(step - 1) + f"/{opt.phase}",
                      write=step % cfg.log_every == 0 or step == cfg.steps or not finite)
            if not finite:
                nonfinite_in_a_row += 1
                log.event(step, "nonfinite", loss=loss_value, grad_norm=norm, in_a_row=nonfinite_in_a_row)
                log.message(f"step {step}: non-finite loss/gradient (loss {loss_value}, grad norm {norm}); "
                            f"step skipped ({nonfinite_in_a_row} in a row)")
                if nonfinite_in_a_row >= cfg.max_nonfinite:
                    last_ckpt = run.last_ckpt
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingError(
                        f"{nonfinite_in_a_row} non-finite steps in a row (steps {step - nonfinite_in_a_row + 1}-"
                        f"{step}); stopping, {where}. Lower --lr/--lr-embed or check the data"
                    )
            else:
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    run.last_val = evaluate(run)
                    log.eval(step, run.last_val)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save(run, step)
            log.reset_clock()
            if info.any(stop.signum is not None, run.device):
                last_ckpt = save(run, step)
                name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                log.event(step, "stop", signal=name, checkpoint=str(last_ckpt))
                log.message(f"stopped by {name} after step {step}; checkpoint {last_ckpt}. "
                            "Run the same command again to resume.")
                return last_ckpt

    run.last_val = evaluate(run)
    log.eval(step, run.last_val)
    if run.first_val is None:
        run.first_val = run.last_val
    return save(run, step)


def describe(run: Run) -> str:
    cfg, mc, s = run.cfg, run.model_config, run.schedule
    lr = resolve_lr(cfg, mc.mup_width_multiplier)
    precision = ("bf16 autocast, fp32 master weights" if not isinstance(run.autocast, contextlib.nullcontext)
                 else "fp32") + (f", fp8 {cfg.fp8}{' (emulated)' if cfg.fp8_emulate else ''}" if cfg.fp8 else "")
    if cfg.fp8_all_gather:
        precision += ", weights all-gathered in FP8"
    parallel = f"{run.info.world} x {cfg.parallel}" if run.info.active else "1 process"
    if run.info.active and cfg.dp_replicate > 1:
        parallel += f" (HSDP: {cfg.dp_replicate} replicas x {run.info.world // cfg.dp_replicate} shards)"
    return "\n".join([
        f"model    {cfg.preset}{f' {cfg.model}' if cfg.model else ''}: {unwrap(run.model).num_parameters() / 1e6:.2f} M parameters, "
        f"{mc.num_hidden_layers} layers x {mc.hidden_size}, vocab {mc.vocab_size}, init {cfg.init}",
        f"data     {sum(src.num_windows for src in run.sampler.sources)} train sequences of {cfg.seq_len} "
        f"({', '.join(Path(src.name).name for src in run.sampler.sources)}); global batch "
        f"{cfg.batch_size * cfg.grad_accum * run.info.world} x {cfg.seq_len} tokens",
        f"schedule {cfg.steps} steps: warmup {s.warmup}, stable to {s.decay_start}, {cfg.decay_shape} decay over "
        f"{s.decay} to peak/{1 / cfg.min_lr_ratio:g} with {cfg.decay_optimizer.upper() if cfg.decay_optimizer == 'muon' else 'AdamW'}",
        f"optim    AdamW lr {lr:g} (embedding {cfg.lr_embed:g}), betas ({cfg.beta1}, {cfg.beta2}), wd "
        f"{cfg.weight_decay}, clip {cfg.grad_clip}",
        f"device   {run.device}{f' ({torch.get_num_threads()} thread(s))' if run.device.type == 'cpu' else ''}, "
        f"{precision}, {parallel}",
    ])


def _startup_error(exc: BaseException) -> BadInput:
    if isinstance(exc, OSError):
        return BadInput(ckpt.explain_os_error(exc, "starting the run"))
    return BadInput(str(exc))


def train(cfg: TrainConfig) -> int:
    """Run (or resume, or finish) the training ``cfg`` describes; returns 0.  Raises :class:`BadInput` for bad input
    found at startup, :class:`TrainingError` / :class:`xmodel.training.checkpoint.StorageError` /
    :class:`RunFailure` for a failure during the run (see :func:`main` for the exit statuses)."""
    t_start = time.perf_counter()
    try:
        run = setup(cfg)
    except (ValueError, OSError) as exc:  # bad input: nothing was written to the run directory
        raise _startup_error(exc) from None
    info = run.info
    run_dir = cfg.run_dir
    if run.start_step >= cfg.steps:
        return finish_completed(run, t_start)
    try:
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            tmp = run_dir / ".config.yaml.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, run_dir / "config.yaml")
        info.barrier()
        flops = run.model_config.flops_per_token(cfg.seq_len)
        run.log = MetricsLogger(run_dir if info.is_main else None, cfg.steps, run.start_step, info.is_main,
                                cfg.progress, flops, peak_flops(run.device, cfg.peak_flops),
                                append=run.resumed_from is not None)
    except OSError as exc:
        raise _startup_error(exc) from None
    hf_dir = None
    try:
        log0(info, describe(run))
        resumed = run.resumed_from
        if resumed is not None:
            run.log.event(run.start_step, "resume", checkpoint=str(resumed), phase=run.optimizer.phase)
            log0(info, f"resuming from {resumed} (step {run.start_step}, optimizer {run.optimizer.phase})")
        else:
            run.log.event(0, "start", config=cfg.to_dict(), init_from=cfg.init_from)
            if cfg.init_from:
                log0(info, f"initialised from {cfg.init_from} (weights and optimizer state, "
                             f"optimizer {run.optimizer.phase}); schedule and data start afresh")
        log0(info, f"run directory {run_dir} (resolved config: {run_dir / 'config.yaml'})")
        final = train_loop(run)
        stopped = final.name != f"step_{cfg.steps:08d}"
        if not stopped and cfg.export_hf:
            hf_dir = ckpt.export_hf(run.model, run.model_config, run_dir / "hf", run.tokenizer_dir, info)
        run.log.event(int(final.name.split("_")[1]), "end", wall_s=time.perf_counter() - t_start)
    except (TrainingError, ckpt.StorageError, KeyboardInterrupt):
        raise
    except Exception as exc:
        where = f"the last complete checkpoint is {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written"
        what = (ckpt.explain_os_error(exc, f"training (after step {run.step})") if isinstance(exc, OSError)
                else f"{type(exc).__name__} after step {run.step}: {exc}")
        raise RunFailure(f"the run failed: {what}; {where}. Fix the cause and run the same command again to "
                         "resume") from exc
    finally:
        run.log.close()
    if info.is_main and not stopped:
        write_summary(run, final, hf_dir, t_start)
    info.barrier()  # every rank leaves after rank 0 has written everything (a rank ending early cannot cut it short)
    return 0


def write_summary(run: Run, final: Path, hf_dir: Path | None, t_start: float) -> None:
    """``loss.png`` and ``summary.json`` (written last: a run directory with it is finished) and the closing lines."""
    cfg, run_dir = run.cfg, run.cfg.run_dir
    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png")
    summary = {"steps": cfg.steps, "first_val_loss": run.first_val, "final_val_loss": run.last_val,
               "wall_s": round(time.perf_counter() - t_start, 1), "checkpoint": str(final),
               "hf": str(hf_dir) if hf_dir else None}
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "summary.json")
    first = f"{run.first_val:.3f}" if run.first_val is not None else "?"
    last = f"{run.last_val:.3f}" if run.last_val is not None else "?"
    print(
        f"\ndone in {summary['wall_s']:.0f} s: val loss {first} -> {last}\n"
        f"  run directory  {run_dir}\n"
        f"  metrics        {run_dir / 'metrics.jsonl'}\n"
        f"  plot           {plot}\n"
        f"  checkpoint     {final}\n"
        + (f"  HF model       {hf_dir}  (Xmodel.from_pretrained / python -m xmodel.generate)\n" if hf_dir else "")
        + (f"  tokenizer      {run.tokenizer_dir / 'tokenizer.json'}" if run.tokenizer_dir else ""),
        flush=True,
    )


def finish_completed(run: Run, t_start: float) -> int:
    """The run's last checkpoint is at (or past) ``--steps``: finish what a crash may have left undone -- the HF
    export and the summary -- from that checkpoint (already loaded into the model), or say it is complete."""
    cfg, info, run_dir = run.cfg, run.info, run.cfg.run_dir
    final = run.resumed_from
    summary = run_dir / "summary.json"
    try:
        done = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    except (OSError, ValueError):
        done = {}
    current = Path(str(done.get("checkpoint"))).name == final.name  # the summary is of this checkpoint
    missing = []
    if not current:
        missing.append("summary")
    if cfg.export_hf and not (current and done.get("hf") and (run_dir / "hf" / "config.json").is_file()):
        missing.insert(0, "HF export")
    if not missing:
        log0(info, f"{run_dir} is already complete at step {run.start_step} (--steps {cfg.steps}); nothing to do. "
                   f"For more training raise --steps (the schedule of the steps already taken must stay the same; see "
                   f"--help) or start a new phase: --init-from {final} --name NEW")
        return 0
    log0(info, f"{run_dir} finished training at step {run.start_step} but its {' and '.join(missing)} "
               f"{'is' if len(missing) == 1 else 'are'} missing (interrupted?); completing from {final}")
    hf_dir = None
    if cfg.export_hf:
        hf_dir = ckpt.export_hf(run.model, run.model_config, run_dir / "hf", run.tokenizer_dir, info)
    if info.is_main:
        write_summary(run, final, hf_dir, t_start)
    info.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0 finished / already complete / stopped cleanly by a signal, 1 a failure
    during the run, 2 bad input found at startup, 130 a second Ctrl-C (see ``--help``)."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        cfg = parse_args(argv)
    except SystemExit as exc:  # --help
        print(exc.code)
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, ckpt.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RunFailure as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, OSError):  # a bug or an unexpected state: keep the trace
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (second Ctrl-C): no checkpoint written for the current step", file=sys.stderr)
        return 130
    finally:
        shutdown()


def cli() -> None:
    """The ``xmodel-train`` / ``python -m xmodel.train`` process: :func:`main`, then an exit that no gloo thread can
    outlive (see :func:`xmodel.training.distributed.exit_process`)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
