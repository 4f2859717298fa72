"""Training configuration: one flat dataclass, YAML files and ``--key value`` overrides.

Precedence: dataclass defaults < YAML file (``--config path.yaml``) < command-line ``--key value``.
Keys use underscores in YAML and either underscores or dashes on the command line (``--lr-embed 0.01``).
Model-shape changes go through the ``model`` dict (YAML ``model: {hidden_size: 64}``, CLI ``--model.hidden_size 64``),
applied on top of the named ``preset`` of :class:`xmodel.config.XmodelConfig`.

Step counts that accept fractions (``warmup``, ``decay_start``, ``decay``): an ``int`` is a number of steps, a
``float`` in [0, 1] a fraction of ``steps`` (so ``0.1`` = 10 % of the run, ``100`` = 100 steps).
"""

from __future__ import annotations

import dataclasses
import os
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
    resume: str = "auto"  # "auto": continue from the run directory's latest checkpoint; "never"; or a checkpoint path
    init_from: str | None = None  # start a new phase from a checkpoint: its weights + optimizer state, step 0, new data

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
    vocab_size: int = 4096  # vocabulary of the default tokenizer (specials <|bos|> <|eos|> <|pad|> = 0, 1, 2)
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
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; none on norms and biases
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    decay_optimizer: str = "muon"  # "muon": hidden matrices switch to Muon at decay start; "adamw": keep AdamW
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "match_rms_adamw"  # Muon lr scaling: 0.2*sqrt(max(A, B)) so its RMS matches AdamW's
    # dtype of Muon's Newton-Schulz products: "auto" = bf16 (the recipe's; fp32 on CPUs without native bf16 GEMMs),
    # "bf16" or "fp32".  fp32 makes runs that differ only in fp32 summation order (1 process vs FSDP2/DDP) agree
    # to ~1e-6 after the switch; bf16 rounding inside Newton-Schulz amplifies such differences ~30x.
    muon_dtype: str = "auto"

    # --- precision and speed -----------------------------------------------------------------------------
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    fp8: str | None = None  # None or an FP8 recipe: "delayed" (paper), "current", "row", "block"
    fp8_emulate: bool = False  # allow --fp8 without FP8 hardware (reference quantisation, slow; experiments only)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer in backward
    parallel: str = "fsdp"  # under torchrun: "fsdp" (FSDP2 fully_shard per layer) or "ddp"

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
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag to change."""
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"--{flag.replace('_', '-')}: {msg}")

        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "keep_last", "max_nonfinite",
                     "vocab_size", "muon_ns_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                 f"must be a positive integer, got {value!r}")
        for name in ("log_every", "eval_every", "save_every", "threads"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, name, f"must be an integer >= 0, got {value!r}")
        need(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
             f"must be a plain directory name, got {self.name!r}")
        need(self.lr_embed > 0, "lr_embed", f"must be positive, got {self.lr_embed}")
        need(self.lr is None or self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(0 < self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in (0, 1], got {self.min_lr_ratio}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        need(self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay",
             "eps must be > 0, weight_decay and grad_clip >= 0")
        need(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        need(self.corpus_max_mb > 0, "corpus_max_mb", "must be positive")
        need(self.decay_shape in DECAY_SHAPES, "decay_shape", f"must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        need(self.decay_optimizer in ("muon", "adamw"), "decay_optimizer",
             f"must be 'muon' or 'adamw', got {self.decay_optimizer!r}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.fp8 is None or self.fp8 in FP8_RECIPES, "fp8", f"must be one of {FP8_RECIPES}, got {self.fp8!r}")
        need(not self.fp8_emulate or self.fp8 is not None, "fp8_emulate", "only makes sense with --fp8 RECIPE")
        need(self.parallel in PARALLELISMS, "parallel", f"must be one of {PARALLELISMS}, got {self.parallel!r}")
        need(self.init in ("megatron", "hf"), "init", f"must be 'megatron' or 'hf', got {self.init!r}")
        need(self.muon_adjust_lr in ("match_rms_adamw", "original", "spectral"), "muon_adjust_lr",
             f"unknown lr adjustment {self.muon_adjust_lr!r}")
        need(self.muon_dtype in MUON_DTYPES, "muon_dtype", f"must be one of {MUON_DTYPES}, got {self.muon_dtype!r}")
        need(isinstance(self.model, dict), "model", "must be a mapping of XmodelConfig fields")
        need(isinstance(self.data, list) and isinstance(self.val_data, list), "data", "must be a list of sources")
        need(self.init_from is None or Path(self.init_from).is_dir(), "init_from",
             f"no such checkpoint directory {self.init_from!r}")
        need(self.resume in RESUME_MODES or Path(self.resume).exists(), "resume",
             f"must be 'auto', 'never' or an existing checkpoint path, got {self.resume!r}")
        warmup, start, length = self.warmup_steps, self.decay_start_step, self.decay_steps
        need(warmup <= start, "warmup", f"warmup ({warmup} steps) must end before the decay starts (step {start})")
        need(start <= self.steps, "decay_start", f"decay start (step {start}) is after the last step ({self.steps})")
        need(start + length <= self.steps or self.decay_start is not None, "decay",
             f"decay ({length} steps) is longer than the run ({self.steps} steps)")

    # ------------------------------------------------------------------------------------------ derived
    def _steps(self, value: float | None, flag: str) -> int:
        if isinstance(value, bool) or value is None:
            raise ValueError(f"--{flag}: must be a number of steps or a fraction, got {value!r}")
        if isinstance(value, float):
            if not 0 <= value <= 1:
                raise ValueError(f"--{flag}: a float is a fraction of --steps and must be in [0, 1], got {value}")
            return int(round(value * self.steps))
        if value < 0:
            raise ValueError(f"--{flag}: must be >= 0, got {value}")
        return int(value)

    @property
    def warmup_steps(self) -> int:
        return self._steps(self.warmup, "warmup")

    @property
    def decay_steps(self) -> int:
        return self._steps(self.decay, "decay")

    @property
    def decay_start_step(self) -> int:
        if self.decay_start is None:
            return self.steps - self.decay_steps
        return self._steps(self.decay_start, "decay-start")

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


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _parse_value(text: str) -> Any:
    """A command-line value: YAML scalar rules (``1`` int, ``0.1`` float, ``true``, ``null``, ``[a, b]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(key: str, value: Any) -> Any:
    """Fix the types YAML cannot know: str fields stay str, float fields accept ints, lists accept one item."""
    kind = _field_types()[key]
    if value is None:
        return None
    if kind.startswith("str"):
        return str(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool) and key not in ("warmup", "decay"):
        return float(value)
    if kind == "list" and not isinstance(value, list):
        return [value]
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"--{key.replace('_', '-')}: expected true/false, got {value!r}")
    return value


def _apply(values: dict[str, Any], key: str, value: Any, source: str) -> None:
    key = key.replace("-", "_")
    if key.startswith("model."):
        values.setdefault("model", {})
        values["model"] = {**values["model"], key[len("model."):]: value}
        return
    if key not in _field_types():
        known = ", ".join(sorted(_field_types()))
        raise ValueError(f"unknown config key {key!r} in {source}; known keys: {known}")
    if key == "model" and not isinstance(value, dict):
        raise ValueError(f"'model' in {source} must be a mapping of XmodelConfig fields")
    values[key] = _coerce(key, value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of keys to values")
    return data


def shipped_config(name: str) -> Path:
    """Path of a config shipped in ``xmodel/configs`` (``"paper-stable"`` -> ``.../paper-stable.yaml``)."""
    return Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"


def parse_args(argv: list[str] | None) -> TrainConfig:
    """``[--config FILE] [--key value | --flag | --no-flag]...`` -> a validated :class:`TrainConfig`.

    ``--config`` takes a path or the name of a shipped config (``--config paper-decay``).  A bool flag alone means
    true (``--compile``), ``--no-compile`` false.  ``-h`` / ``--help`` prints every key with its default.
    """
    argv = list(argv or [])
    values: dict[str, Any] = {}
    pairs: list[tuple[str, Any]] = []
    bools = {k for k, t in _field_types().items() if t == "bool"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(usage())
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}; options look like --key value (see --help)")
        key, eq, inline = arg[2:].partition("=")
        norm = key.replace("-", "_")
        if eq:
            pairs.append((key, _parse_value(inline)))
            i += 1
        elif norm in bools and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            pairs.append((key, True))
            i += 1
        elif norm.startswith("no_") and norm[3:] in bools:
            pairs.append((norm[3:], False))
            i += 1
        else:
            if i + 1 == len(argv):
                raise ValueError(f"--{key} needs a value")
            pairs.append((key, _parse_value(argv[i + 1])))
            i += 2
    config_files = [v for k, v in pairs if k == "config"]
    for path in config_files:
        path = str(path)
        if not Path(path).exists() and shipped_config(path).is_file():
            path = str(shipped_config(path))
        for k, v in load_yaml(path).items():
            _apply(values, str(k), v, path)
    for k, v in pairs:
        if k != "config":
            _apply(values, k, v, "the command line")
    return TrainConfig(**values)


def usage() -> str:
    lines = ["usage: python -m xmodel.train [--config FILE|NAME] [--key value]...", "", "keys (default):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name.replace('_', '-'):<26} {default!r}")
    lines.append("  --model.FIELD VALUE          override an XmodelConfig field of the preset")
    return "\n".join(lines)


def resolve_lr(cfg: TrainConfig, width_multiplier: float) -> float:
    """Peak lr of the non-embedding parameters: ``--lr`` or the μP rule ``lr_embed / width_multiplier``."""
    return cfg.lr if cfg.lr is not None else cfg.lr_embed / width_multiplier

