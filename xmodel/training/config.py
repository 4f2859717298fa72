"""Training configuration: one flat dataclass, YAML files and ``--key value`` overrides.

Precedence: dataclass defaults < YAML file (``--config path.yaml``) < command-line ``--key value``.
Keys use underscores in YAML and either underscores or dashes on the command line (``--lr-embed 0.01``).
Model-shape changes go through the ``model`` dict (YAML ``model: {hidden_size: 64}``, CLI ``--model.hidden_size 64``),
applied on top of the named ``preset`` of :class:`xmodel.config.XmodelConfig`.

Step counts that accept fractions (``warmup``, ``decay_start``, ``decay``): an ``int`` is a number of steps, a
``float`` in [0, 1] a fraction of ``steps`` (so ``0.1`` = 10 % of the run, ``100`` = 100 steps).

Validation: every field is converted and range-checked when a :class:`TrainConfig` is built (``__post_init__``),
so the command line, YAML files and code get the same checks before anything is written.  Numbers are accepted in
any spelling Python's ``float`` reads -- ``3e-4``, ``1E-8``, ``.5`` -- because YAML 1.1 (PyYAML) reads ``3e-4`` as
a *string*; ``nan`` and ``inf`` are refused everywhere (no option has a meaning for them).  Every error is a
:class:`ConfigError` (a ``ValueError``) whose message names the flag, the value and the accepted range, and says
which config file set it when one did.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DECAY_SHAPES = ("exp", "linear", "cosine", "sqrt")
PRECISIONS = ("auto", "fp32", "bf16")
FP8_RECIPES = ("delayed", "current", "row", "block")
PARALLELISMS = ("fsdp", "ddp")
RESUME_MODES = ("auto", "never")
MUON_DTYPES = ("auto", "bf16", "fp32")
MUON_ADJUST_LR = ("match_rms_adamw", "original", "spectral")
INITS = ("megatron", "hf")
DECAY_OPTIMIZERS = ("muon", "adamw")
BOS_MODES = ("auto", "always", "never")
DEFAULT_BPE_VOCAB = 4096  # ids of the default BPE when --vocab-size is not given
MIN_VOCAB = 256 + 3  # a byte-level BPE: 256 byte tokens + <|bos|> <|eos|> <|pad|>

# How a run ends (``python -m xmodel.train`` exit status); shown by --help and in README's Training section.
EXIT_CODES = """\
exit status:
  0  the run finished, was already complete, or stopped cleanly on SIGTERM/SIGINT (checkpoint written)
  1  the run failed after it started: non-finite steps, an I/O error (disk full, ...), any other error
     while training; the message names the last good checkpoint -- rerun the same command to resume
  2  bad input, found at startup before the run directory is written: an option, the data, the
     tokenizer, a directory that cannot be created, or no usable checkpoint for --resume
  130  a second Ctrl-C (no checkpoint for the current step)"""

RESUME_RULES = """\
resume (--resume auto, the default): the newest *valid* checkpoint in <out_dir>/<name>/checkpoints is used --
  complete (written to the end: every file present at the size recorded when it was saved), readable, and with
  finite weights; each newer one that fails is skipped with the reason printed.  --resume PATH forces one
  checkpoint (or the newest valid one of a run directory) and fails if it is unusable; --resume never refuses to
  touch a run directory that holds checkpoints.  The schedule (--steps, --warmup, --decay, --decay-start,
  --decay-shape, --min-lr-ratio, --decay-optimizer) may change on resume only where it does not rewrite the
  steps already taken (e.g. a longer run after an absolute --decay-start); otherwise the run refuses and says
  how to continue with --init-from.  A completed run whose HF export is missing is exported on the rerun."""


class ConfigError(ValueError):
    """A bad option.  ``key`` is the config key (``"lr"``, ``"model.hidden_size"``) or None."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


def flag(key: str) -> str:
    """``"lr_embed"`` -> ``"--lr-embed"``; ``"model.rms_norm_eps"`` -> ``"--model.rms_norm_eps"``."""
    return "--" + (key if key.startswith("model.") else key.replace("_", "-"))


# ---------------------------------------------------------------------------------------------------------
# Value conversion: one function per kind; each raises ConfigError naming the flag, the value and the range.
# ---------------------------------------------------------------------------------------------------------
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("null", "none", "~", "")


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"> {lo:g}" if lo_open else f">= {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def to_float(key: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False, optional: bool = False, hint: str = "") -> float | None:
    """A finite float from a number or any string ``float()`` reads (``3e-4``, ``1E-8``, ``.5``)."""
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(key, f"{flag(key)}: needs a number, got nothing{hint}")
    x = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            x = None
    if x is None:
        raise ConfigError(key, f"{flag(key)}: expected a number such as 3e-4 or 0.5, got {value!r}{hint}")
    if not math.isfinite(x):
        raise ConfigError(key, f"{flag(key)}: must be a finite number, got {value!r}{hint}")
    if lo is not None and (x < lo or (lo_open and x == lo)) or hi is not None and (x > hi or (hi_open and x == hi)):
        raise ConfigError(key, f"{flag(key)}: must be {_interval(lo, hi, lo_open, hi_open)}, got {value!r}{hint}")
    return x


def to_int(key: str, value: Any, lo: int | None = None, hi: int | None = None, *, hint: str = "") -> int:
    """An int from an int, an integral float (``1e3`` = 1000) or a string of one."""
    x = None
    if isinstance(value, int) and not isinstance(value, bool):
        x = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        x = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d[\d_]*", text):
            x = int(text)
        else:
            try:
                f = float(text)
                x = int(f) if math.isfinite(f) and f.is_integer() else None
            except ValueError:
                x = None
    if x is None:
        raise ConfigError(key, f"{flag(key)}: expected an integer, got {value!r}{hint}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(key, f"{flag(key)}: must be an integer {rng}, got {value!r}{hint}")
    return x


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    name = flag(key)
    raise ConfigError(key, f"{name}: expected true or false, got {value!r} (on the command line {name} alone means "
                           f"true, --no-{name[2:]} false)")


def to_choice(key: str, value: Any, choices: tuple[str, ...], optional: bool = False) -> str | None:
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if isinstance(value, str) and value in choices:
        return value
    extra = " (or null for none)" if optional else ""
    raise ConfigError(key, f"{flag(key)}: must be one of {', '.join(choices)}{extra}; got {value!r}")


def to_steps(key: str, value: Any, optional: bool = False) -> int | float | None:
    """A step count (int >= 0) or a fraction of ``steps`` (float in [0, 1])."""
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        value = int(value)
    elif isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    what = "a number of steps (an integer such as 100) or a fraction of --steps (a float in [0, 1] such as 0.1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"{flag(key)}: expected {what}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"{flag(key)}: a number of steps must be >= 0, got {value}")
        return value
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(key, f"{flag(key)}: a float is a fraction of --steps and must be in [0, 1], got {value!r}; "
                               f"for a number of steps write an integer (e.g. {flag(key)} 100)")
    return value


def _resolve_steps(value: int | float, steps: int) -> int:
    return int(round(value * steps)) if isinstance(value, float) else int(value)


def to_text(key: str, value: Any, optional: bool = False) -> str | None:
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(key, f"{flag(key)}: needs a value")
    if isinstance(value, (dict, list)):
        raise ConfigError(key, f"{flag(key)}: expected a single value, got {value!r}")
    return str(value)


def check_device(value: Any) -> str:
    text = str(value)
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise ConfigError("device", f"--device: {value!r} is not a device this trainer runs on; use auto (CUDA when "
                                "available, else the CPU), cpu, cuda or cuda:N (N = the GPU index)")


def model_overrides(model: Any) -> dict[str, Any]:
    """``--model.FIELD`` values converted by the XmodelConfig field's type; unknown names get a suggestion."""
    from xmodel.config import XmodelConfig

    if not isinstance(model, dict):
        raise ConfigError("model", f"--model: must be a mapping of XmodelConfig fields, got {model!r}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(XmodelConfig) if f.name != "extra"}
    out = {}
    for name, value in model.items():
        key = f"model.{name}"
        if name not in kinds:
            close = difflib.get_close_matches(str(name), list(kinds), n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(key, f"--model.{name}: XmodelConfig has no field {name!r}; {hint}"
                                   f"its fields: {', '.join(kinds)}")
        kind = kinds[name]
        if kind == "int":
            value = to_int(key, value)
        elif kind == "int | None":
            value = None if value is None else to_int(key, value)
        elif kind == "float":
            value = to_float(key, value)
        elif kind == "bool":
            value = to_bool(key, value)
        elif kind == "str":
            value = to_text(key, value)
        out[str(name)] = value
    return out


@dataclass
class TrainConfig:
    """Everything a run needs.  Defaults: the CPU default run (the recipe's shape in miniature)."""

    # --- run ---------------------------------------------------------------------------------------------
    name: str = "cpu-default"  # run name; the run directory is <out_dir>/<name>
    out_dir: str = "runs"  # parent of run directories
    seed: int = 0  # seeds init, data mixture order and every RNG
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    # CPU threads for torch; 0 = auto: 1 when training on the CPU (measured on a shared 2-core box: the default run
    # took 128 s on 1 thread and ran 3-4x slower on 2, whose threads wait on each other), torch's default on a GPU
    threads: int = 0
    # "auto": continue from the newest valid checkpoint of the run directory (damaged ones are skipped, with the
    # reason); "never": refuse if the run directory holds checkpoints; or a checkpoint/run directory to force one
    resume: str = "auto"
    init_from: str | None = None  # start a new phase from a checkpoint: its weights + optimizer state, step 0, new data
    # resuming at another world size keeps the global batch (batch_size * grad_accum * world): a checkpoint whose
    # global batch differs is refused (exit 2) unless this is set (the data position and schedule carry over as they are)
    allow_batch_change: bool = False

    # --- model -------------------------------------------------------------------------------------------
    preset: str = "cpu-default"  # XmodelConfig preset (xmodel.config.PRESETS)
    model: dict = field(default_factory=dict)  # XmodelConfig field overrides on top of the preset
    init: str = "megatron"  # weight init scheme: "megatron" (what the paper trained with) or "hf"

    # --- data --------------------------------------------------------------------------------------------
    # Training sources: [] = the default corpus (stdlib source + pydoc topics).  Each entry is a path/glob string
    # or {path: ..., weight: ..., text_field: ...}; .txt files/dirs/globs, .jsonl, .parquet, or .bin token shards.
    data: list = field(default_factory=list)
    val_data: list = field(default_factory=list)  # validation sources (same forms); [] = held-out tail of `data`
    val_fraction: float = 0.01  # share of each training source held out for validation when val_data is empty
    tokenizer: str | None = None  # a tokenizer.json (or its directory); None = train/load the default BPE
    # ids of the default BPE trained when no --tokenizer is given (specials <|bos|> <|eos|> <|pad|> = 0, 1, 2);
    # None = 4096.  Not for --tokenizer: the model's vocabulary then follows the tokenizer (see --model.vocab_size)
    vocab_size: int | None = None
    # documents are framed [BOS] + text + EOS: "auto" = BOS when the tokenizer_config.json beside the tokenizer says
    # add_bos_token: true (as the released pipeline did), "always", "never"
    bos: str = "auto"
    # validation set size in tokens (rounded up to whole sequences): held out from --data (instead of --val-fraction)
    # or taken from --val-data, every sequence evaluated once; None = --val-fraction and --eval-batches
    val_tokens: int | None = None
    prepare_workers: int = 0  # processes tokenising text inputs (0 = one per CPU core); see python -m xmodel.prepare
    cache_dir: str | None = None  # corpus/tokenizer/shard cache; None = $XMODEL_CACHE or ~/.cache/xmodel
    corpus_max_mb: float = 6.0  # size cap of the default corpus' training split (MB of text)

    # --- batch and length --------------------------------------------------------------------------------
    seq_len: int = 256  # tokens per sequence (inputs; each sample reads seq_len + 1 tokens)
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * world)
    steps: int = 200  # optimizer steps in this run (phase)

    # --- schedule (WSD) ----------------------------------------------------------------------------------
    warmup: float = 0.1  # linear warmup 0 -> peak: steps (int) or fraction of `steps` (float)
    decay: float = 0.3  # decay length: steps or fraction of `steps`
    decay_start: float | None = None  # first decay step: steps or fraction; None = steps - decay (decay ends the run)
    decay_shape: str = "exp"  # "exp" (Megatron 2*0.5^(t/T)-1), "linear", "cosine", "sqrt" (1 - sqrt(t/T))
    min_lr_ratio: float = 1 / 16  # decay floor as a fraction of the peak (paper: peak/16)

    # --- optimizer (μP groups) -------------------------------------------------------------------------------
    lr_embed: float = 0.01  # peak lr of the tied embedding (paper 0.01)
    lr: float | None = None  # peak lr of everything else; None = lr_embed / (hidden_size / mup_base_width) (μP)
    beta1: float = 0.9  # AdamW β1, in [0, 1) (paper 0.9)
    beta2: float = 0.95  # AdamW β2, in [0, 1) (paper 0.95)
    eps: float = 1e-8  # AdamW epsilon, > 0 (paper 1e-8)
    weight_decay: float = 0.1  # decoupled; none on norms and biases
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    decay_optimizer: str = "muon"  # "muon": hidden matrices switch to Muon at decay start; "adamw": keep AdamW
    muon_momentum: float = 0.95  # Muon momentum, in [0, 1) (paper 0.95)
    muon_nesterov: bool = True  # Nesterov momentum for Muon (paper: on)
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon step (paper 5)
    muon_adjust_lr: str = "match_rms_adamw"  # Muon lr scaling: 0.2*sqrt(max(A, B)) so its RMS matches AdamW's
    # dtype of Muon's Newton-Schulz products: "auto" = bf16 (the recipe's; fp32 on CPUs without native bf16 GEMMs),
    # "bf16" or "fp32".  fp32 makes runs that differ only in fp32 summation order (1 process vs FSDP2/DDP) agree
    # to ~1e-6 after the switch; bf16 rounding inside Newton-Schulz amplifies such differences ~30x.
    muon_dtype: str = "auto"

    # --- precision and speed -----------------------------------------------------------------------------
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    fp8: str | None = None  # None or an FP8 recipe: "delayed" (paper), "current", "row", "block"
    fp8_emulate: bool = False  # allow --fp8 without FP8 hardware (reference quantisation, slow; experiments only)
    # FSDP2 all-gathers the FP8Linear weights as FP8 codes (1 byte/element) quantised with one scale per weight from
    # its global amax (one all-reduce per step for all weights); needs --fp8 current, --parallel fsdp, torchrun
    fp8_all_gather: bool = False
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer in backward
    parallel: str = "fsdp"  # under torchrun: "fsdp" (FSDP2 fully_shard per layer) or "ddp"
    # FSDP2 as HSDP: shard over world / R ranks, replicate R times (R groups of consecutive ranks are one replica
    # each, e.g. one node); 1 = plain FSDP2 over the whole world
    dp_replicate: int = 1

    # --- logging, eval, checkpoints ----------------------------------------------------------------------
    log_every: int = 1  # write a metrics.jsonl line every N steps
    eval_every: int = 25  # validation every N steps (and at the end); 0 = only at the end
    eval_batches: int = 4  # micro-batches per validation
    save_every: int = 50  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_last: int = 2  # checkpoints kept in <run>/checkpoints
    export_hf: bool = True  # write the final model as an HF checkpoint to <run>/hf
    max_nonfinite: int = 5  # stop after this many consecutive non-finite steps
    peak_flops: float | None = None  # accelerator peak FLOP/s for MFU; None = look up known GPUs
    progress: bool = True  # tqdm progress bar
    inject_nonfinite_at: list = field(default_factory=list)  # testing only: steps whose loss is made NaN


    # ------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._convert()
        self.validate()

    def _convert(self) -> None:
        """Convert every field to its type and check its range (see the module docstring)."""
        f, i, b = to_float, to_int, to_bool
        self.name = to_text("name", self.name)
        self.out_dir = to_text("out_dir", self.out_dir)
        self.seed = i("seed", self.seed, 0, 2**63 - 1)
        self.device = check_device(self.device)
        self.threads = i("threads", self.threads, 0)
        self.resume = to_text("resume", self.resume)
        self.init_from = to_text("init_from", self.init_from, optional=True)
        self.preset = to_text("preset", self.preset)
        self.model = model_overrides(self.model)
        self.init = to_choice("init", self.init, INITS)
        self.data = _as_list("data", self.data)
        self.val_data = _as_list("val_data", self.val_data)
        self.val_fraction = f("val_fraction", self.val_fraction, 0, 1, hi_open=True)
        self.tokenizer = to_text("tokenizer", self.tokenizer, optional=True)
        if self.vocab_size is not None and not (isinstance(self.vocab_size, str)
                                                and self.vocab_size.strip().lower() in _NONE):
            self.vocab_size = i("vocab_size", self.vocab_size, MIN_VOCAB,
                                hint=f" (a byte-level BPE needs {MIN_VOCAB} ids: 256 bytes and 3 specials)")
        else:
            self.vocab_size = None
        self.bos = to_choice("bos", self.bos, BOS_MODES)
        if self.val_tokens is not None and not (isinstance(self.val_tokens, str)
                                                and self.val_tokens.strip().lower() in _NONE):
            self.val_tokens = i("val_tokens", self.val_tokens, 1, hint=" (tokens of validation data, e.g. 262144)")
        else:
            self.val_tokens = None
        self.prepare_workers = i("prepare_workers", self.prepare_workers, 0, hint=" (0 = one per CPU core)")
        self.cache_dir = to_text("cache_dir", self.cache_dir, optional=True)
        self.corpus_max_mb = f("corpus_max_mb", self.corpus_max_mb, 0, lo_open=True)
        for name in ("seq_len", "batch_size", "grad_accum", "steps"):
            setattr(self, name, i(name, getattr(self, name), 1))
        self.warmup = to_steps("warmup", self.warmup)
        self.decay = to_steps("decay", self.decay)
        self.decay_start = to_steps("decay_start", self.decay_start, optional=True)
        self.decay_shape = to_choice("decay_shape", self.decay_shape, DECAY_SHAPES)
        self.min_lr_ratio = f("min_lr_ratio", self.min_lr_ratio, 0, 1, lo_open=True,
                              hint=" (the decay floor as a fraction of the peak; the paper decays to 1/16)")
        self.lr_embed = f("lr_embed", self.lr_embed, 0, lo_open=True, hint=" (the paper uses 0.01)")
        self.lr = f("lr", self.lr, 0, lo_open=True, optional=True,
                    hint=" (or null: lr_embed / width multiplier, the μP rule)")
        self.beta1 = f("beta1", self.beta1, 0, 1, hi_open=True, hint=" (the paper uses 0.9)")
        self.beta2 = f("beta2", self.beta2, 0, 1, hi_open=True, hint=" (the paper uses 0.95)")
        self.eps = f("eps", self.eps, 0, lo_open=True, hint=" (the paper uses 1e-8)")
        self.weight_decay = f("weight_decay", self.weight_decay, 0, hint=" (the paper uses 0.1)")
        self.grad_clip = f("grad_clip", self.grad_clip, 0, hint=" (0 turns clipping off; the paper uses 1.0)")
        self.decay_optimizer = to_choice("decay_optimizer", self.decay_optimizer, DECAY_OPTIMIZERS)
        self.muon_momentum = f("muon_momentum", self.muon_momentum, 0, 1, hi_open=True,
                               hint=" (the share of the previous momentum kept each step; the paper uses 0.95)")
        self.muon_nesterov = b("muon_nesterov", self.muon_nesterov)
        self.muon_ns_steps = i("muon_ns_steps", self.muon_ns_steps, 1, 100, hint=" (the paper uses 5)")
        self.muon_adjust_lr = to_choice("muon_adjust_lr", self.muon_adjust_lr, MUON_ADJUST_LR)
        self.muon_dtype = to_choice("muon_dtype", self.muon_dtype, MUON_DTYPES)
        self.precision = to_choice("precision", self.precision, PRECISIONS)
        self.fp8 = to_choice("fp8", self.fp8, FP8_RECIPES, optional=True)
        for name in ("fp8_emulate", "fp8_all_gather", "compile", "activation_checkpointing", "export_hf", "progress"):
            setattr(self, name, b(name, getattr(self, name)))
        self.parallel = to_choice("parallel", self.parallel, PARALLELISMS)
        self.dp_replicate = i("dp_replicate", self.dp_replicate, 1, hint=" (1 = plain FSDP2)")
        self.allow_batch_change = b("allow_batch_change", self.allow_batch_change)
        self.log_every = i("log_every", self.log_every, 1, hint=" (1 = a metrics line every step)")
        self.eval_every = i("eval_every", self.eval_every, 0, hint=" (0 = only at the end)")
        self.eval_batches = i("eval_batches", self.eval_batches, 1)
        self.save_every = i("save_every", self.save_every, 0, hint=" (0 = only at the end)")
        self.keep_last = i("keep_last", self.keep_last, 1)
        self.max_nonfinite = i("max_nonfinite", self.max_nonfinite, 1)
        self.peak_flops = f("peak_flops", self.peak_flops, 0, lo_open=True, optional=True)
        self.inject_nonfinite_at = [i("inject_nonfinite_at", s, 0)
                                    for s in _as_list("inject_nonfinite_at", self.inject_nonfinite_at)]

    def validate(self) -> None:
        """Checks between fields (each field's own range is checked by :meth:`_convert`)."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(key, f"{flag(key)}: {msg}")

        need(self.name not in ("", ".", "..") and "/" not in self.name and os.sep not in self.name, "name",
             f"must be a plain directory name (the run directory is <out_dir>/<name>), got {self.name!r}")
        need(bool(self.out_dir), "out_dir", "must not be empty")
        need(self.resume in RESUME_MODES or Path(self.resume).exists(), "resume",
             f"must be 'auto', 'never' or an existing checkpoint or run directory, got {self.resume!r}")
        need(self.init_from is None or Path(self.init_from).is_dir(), "init_from",
             f"no such checkpoint directory {self.init_from!r}")
        need(not self.fp8_emulate or self.fp8 is not None, "fp8_emulate", "only makes sense with --fp8 RECIPE")
        if self.fp8_all_gather:
            need(self.fp8 == "current", "fp8_all_gather",
                 "needs --fp8 current (the weight's FP8 scale comes from its global amax, one tensor-wise scale); "
                 + (f"--fp8 {self.fp8} has " + ("a scale per row or block" if self.fp8 in ("row", "block") else
                                                 "weight scales from an amax history")
                    if self.fp8 else "no --fp8 was given")
                 + ". Use --fp8 current --fp8-all-gather, or drop --fp8-all-gather")
            need(self.parallel == "fsdp", "fp8_all_gather",
                 f"needs --parallel fsdp (FSDP2 all-gathers the weights; --parallel {self.parallel} has no weight "
                 "all-gather to make smaller): use --parallel fsdp, or drop --fp8-all-gather")
            need(not self.compile, "fp8_all_gather",
                 "does not work with --compile yet (the FP8 all-gather weights are eager-only tensor subclasses; "
                 "compiled, a world-2 run computed wrong gradients); drop one of them")
        need(self.vocab_size is None or self.tokenizer is None, "vocab_size",
             f"{self.vocab_size} sizes the default BPE, which --tokenizer {self.tokenizer} replaces; drop "
             "--vocab-size (the model's vocabulary follows the tokenizer: its size rounded up to a multiple of 128, "
             "or the preset's if larger) or set the model's explicitly with --model.vocab_size")
        model_config = self.model_config()
        need(self.seq_len <= model_config.max_position_embeddings, "seq_len",
             f"{self.seq_len} exceeds the model's max_position_embeddings {model_config.max_position_embeddings} "
             "(raise --model.max_position_embeddings or shorten --seq-len)")
        warmup, start, length = self.warmup_steps, self.decay_start_step, self.decay_steps
        need(warmup <= start, "warmup", f"warmup ({warmup} steps) must end before the decay starts (step {start})")
        need(start <= self.steps, "decay_start", f"decay start (step {start}) is after the last step ({self.steps})")
        need(start + length <= self.steps or self.decay_start is not None, "decay",
             f"decay ({length} steps) is longer than the run ({self.steps} steps)")

    def model_config(self):
        """The :class:`xmodel.config.XmodelConfig` of ``preset`` + ``model`` (errors name the ``--model.`` field)."""
        from xmodel.config import PRESETS, XmodelConfig

        if self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, list(PRESETS), n=1)
            raise ConfigError("preset", f"--preset: unknown preset {self.preset!r}"
                                        f"{f' (did you mean {close[0]}?)' if close else ''}; "
                                        f"choose one of {', '.join(PRESETS)}")
        try:
            return XmodelConfig.from_preset(self.preset, **self.model)
        except (ValueError, TypeError) as exc:
            text = str(exc)
            named = [n for n in self.model if re.search(rf"\b{n}\b", text)]
            key = f"model.{named[0]}" if named else "model"
            where = flag(key) if named else "--preset/--model.*"
            raise ConfigError(key, f"{where}: {text} (preset {self.preset!r} with overrides {self.model})") from None

    # ------------------------------------------------------------------------------------------ derived
    @property
    def warmup_steps(self) -> int:
        return _resolve_steps(self.warmup, self.steps)

    @property
    def decay_steps(self) -> int:
        return _resolve_steps(self.decay, self.steps)

    @property
    def decay_start_step(self) -> int:
        if self.decay_start is None:
            return self.steps - self.decay_steps
        return _resolve_steps(self.decay_start, self.steps)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("XMODEL_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "xmodel"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)



def _as_list(key: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, dict) and key in ("data", "val_data"):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and key == "inject_nonfinite_at":
        parsed = _parse_value(value)
        return list(parsed) if isinstance(parsed, list) else [parsed]
    return [value]


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


_TEXT_KINDS = ("str", "str | None")


def _parse_value(text: str) -> Any:
    """A command-line value: YAML scalar rules (``1`` int, ``0.1`` float, ``true``, ``null``, ``[a, b]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply(values: dict[str, Any], sources: dict[str, str], key: str, value: Any, source: str,
           raw: bool = False) -> None:
    """Set ``key`` from ``source``; ``raw`` values are command-line text (text fields keep it as typed, so
    ``--name 007`` stays "007"; other fields are read as YAML scalars / lists and converted by TrainConfig)."""
    key = key.replace("-", "_") if not key.startswith("model.") else key
    if key.startswith("model."):
        name = key[len("model."):]
        values["model"] = {**values.get("model", {}), name: _parse_value(value) if raw else value}
        sources[key] = source
        return
    kinds = _field_types()
    if key not in kinds:
        close = difflib.get_close_matches(key, list(kinds), n=3)
        hint = f"; did you mean {', '.join(flag(c) for c in close)}?" if close else ""
        raise ConfigError(None, f"unknown config key {key!r} in {source}{hint} (python -m xmodel.train --help "
                                "lists every key)")
    if raw and kinds[key] not in _TEXT_KINDS:
        value = _parse_value(value)
    if key == "model" and not isinstance(value, dict):
        raise ConfigError("model", f"'model' in {source} must be a mapping of XmodelConfig fields, got {value!r}")
    if key == "model":
        value = {**values.get("model", {}), **value}
    values[key] = value
    sources[key] = source


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"--config: no such file {path} (a path, or a shipped config name: "
                                    f"{', '.join(sorted(p.stem for p in shipped_config('x').parent.glob('*.yaml')))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"--config: {path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"--config: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"--config: {path} must hold a mapping of keys to values")
    return data


def shipped_config(name: str) -> Path:
    """Path of a config shipped in ``xmodel/configs`` (``"paper-stable"`` -> ``.../paper-stable.yaml``)."""
    return Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"


def parse_args(argv: list[str] | None) -> TrainConfig:
    """``[--config FILE] [--key value | --flag | --no-flag]...`` -> a validated :class:`TrainConfig`.

    ``--config`` takes a path or the name of a shipped config (``--config paper-decay``).  A bool flag alone means
    true (``--compile``), ``--no-compile`` false.  ``-h`` / ``--help`` prints every key with its default.
    Errors name the flag; a value that came from a config file names the file too.
    """
    argv = list(argv or [])
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    pairs: list[tuple[str, Any, bool]] = []  # (key, value, raw command-line text?)
    bools = {k for k, t in _field_types().items() if t == "bool"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(usage())
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(None, f"unexpected argument {arg!r}; options look like --key value (see --help)")
        key, eq, inline = arg[2:].partition("=")
        norm = key.replace("-", "_")
        if eq:
            pairs.append((key, inline, True))
            i += 1
        elif norm in bools and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            pairs.append((key, True, False))
            i += 1
        elif norm.startswith("no_") and norm[3:] in bools:
            pairs.append((norm[3:], False, False))
            i += 1
        else:
            if i + 1 == len(argv):
                raise ConfigError(key, f"--{key} needs a value")
            pairs.append((key, argv[i + 1], True))
            i += 2
    for key, path, _ in pairs:
        if key != "config":
            continue
        path = str(path)
        if not Path(path).exists() and shipped_config(path).is_file():
            path = str(shipped_config(path))
        for k, v in load_yaml(path).items():
            _apply(values, sources, str(k), v, path)
    for k, v, raw in pairs:
        if k != "config":
            _apply(values, sources, k, v, "the command line", raw=raw)
    try:
        return TrainConfig(**values)
    except ConfigError as exc:
        origin = sources.get(exc.key or "")
        if origin is not None and origin != "the command line":
            raise ConfigError(exc.key, f"{exc} (set in {origin})") from None
        raise


def _field_docs() -> dict[str, str]:
    """The comment of each TrainConfig field (trailing ``# ...`` or the comment lines just above it)."""
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(TrainConfig).splitlines():
        stripped = line.strip()
        m = re.match(r"(\w+): [^=]+=.*?(?:#\s*(.*))?$", stripped)
        if stripped.startswith("# ---"):
            above = []
        elif stripped.startswith("#"):
            above.append(stripped[1:].strip())
        elif m and m.group(1) in _field_types():
            docs[m.group(1)] = m.group(2) or " ".join(above)
            above = []
        else:
            above = []
    return docs


def usage() -> str:
    docs = _field_docs()
    lines = ["usage: python -m xmodel.train [--config FILE|NAME] [--key value]...", "",
             "keys (default) -- numbers in any spelling (3e-4, 1E-8, .5); --flag / --no-flag for true/false:"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        head = f"  --{f.name.replace('_', '-'):<24} {default!r:<18} "
        text = textwrap.wrap(docs.get(f.name, ""), 118 - len(head)) or [""]
        lines.append((head + text[0]).rstrip())
        lines += [" " * len(head) + more for more in text[1:]]
    lines.append("  --model.FIELD VALUE          override an XmodelConfig field of the preset (xmodel/config.py)")
    lines += ["", EXIT_CODES, "", RESUME_RULES]
    return "\n".join(lines)


def resolve_lr(cfg: TrainConfig, width_multiplier: float) -> float:
    """Peak lr of the non-embedding parameters: ``--lr`` or the μP rule ``lr_embed / width_multiplier``."""
    return cfg.lr if cfg.lr is not None else cfg.lr_embed / width_multiplier
