"""What a training step communicates: bytes of every collective per step and per rank, and Newton–Schulz FLOPs.

    python -m benchmarks.bench_comms --out benchmarks/results/comms-cpu-<date>   # writes <out>.json and <out>.md

(issue 22, item 4).  Three parts:

1. **Measured** (gloo on CPU, spawned processes, ``OMP_NUM_THREADS=1``): the trainer's own pieces -- model built on the
   meta device and initialised, ``fp8_convert``, ``wrap_model`` (FSDP2 per layer + root, HSDP with ``dp_replicate``),
   ``build_adamw`` / ``TrainOptimizer``, ``micro_batch_loss``, ``grad_norm``, the switch to Muon -- run one AdamW step
   and one Muon step of a scaled model (:data:`SCALED`) at world 1/2/4 for FSDP, HSDP 2x2, and FP8 (emulated,
   ``delayed`` = the paper's recipe with its amax all-reduces, ``current``, and ``current`` with the FP8 weight
   all-gather).  Each step is preceded by an uncounted
   warm-up step, and mirrors ``xmodel.train.train_loop``: forward, backward, the gradient norm (clip), the loss
   all-reduce, the optimizer step, ``precompute_fp8_scales`` (FP8 all-gather only) and the stop-flag all-reduce.
2. **Formula** (:func:`step_collectives`): the same collectives derived from the parameter shapes, the FSDP2 layout
   (dim-0 shards padded to ``ceil(d0/S)`` rows) and Muon's partition (:func:`muon_partition`, a copy of the
   arithmetic of ``xkernels.optim.muon._orthogonalize_fsdp``).  It is checked against part 1 op by op and phase by
   phase, exact bytes (the "validation" table); then it gives the 1.3B preset at 8/64/512 GPUs, where no run is
   possible here.  The one row no run measures (bf16 weight all-gather: ``wrap_model`` sets no
   ``MixedPrecisionPolicy``, so FSDP2 gathers the fp32 master weights) is marked "formula".
3. **Paper extrapolation**: bytes per GPU per step at 64 and 512 H100s, flat FSDP vs HSDP (FSDP in 8-GPU nodes,
   replicated across nodes), time at NVLink and InfiniBand bandwidths against the step's compute time.

How collectives are counted (:class:`CommCounter`): a ``TorchDispatchMode`` that sees the c10d dispatcher ops every
``torch.distributed`` call lowers to (``c10d._allgather_base_``, ``_reduce_scatter_base_``, ``allreduce_``,
``broadcast_``, ``alltoall_base_``, coalesced variants, ...) and the functional collectives DTensor issues
(``_c10d_functional.all_reduce``, ...; for an op on DTensors the mode returns ``NotImplemented`` so DTensor runs and
its collectives come back to the mode, as ``torch.distributed.tensor.debug.CommDebugMode`` does).  Why the
dispatcher and not wrapping ``torch.distributed`` functions: FSDP2 calls different Python entry points in different
torch versions (``all_gather_into_tensor`` on 2.11, ``all_gather_single`` on 2.13) but both lower to the same ops,
and DTensor's collectives never pass through those functions.  Checked on torch 2.11 and 2.13 with gloo and the
fake backend: every call the trainer makes (``all_reduce``, FSDP2's gathers and reduce-scatters, Muon's
``all_to_all_single`` sync and async, DTensor's norm reduction) shows up exactly once.

FP8 under FSDP2: ``wrap_model`` turns FP8Linear's weight cache off (``xkernels.fp8.fsdp.prepare_fp8_for_fsdp``; the
cache once made ranks issue different numbers of ``delayed`` amax all-reduces and hang), so every rank issues one
weight amax per forward.  FP8 weight all-gather (``TrainConfig.fp8_all_gather``, recipe ``current``): FSDP2 gathers
the FP8Linear weights as E4M3 codes, 1 byte per element, with one scale per weight from its world amax; the step
calls ``xkernels.fp8.fsdp.precompute_fp8_scales`` after the optimizer step (and once before the first step), as
``xmodel.train.train_loop`` does: one all-reduce (MAX) of all those amaxes (phase "fp8_scales").

Each record: op kind, process-group size ``W``, dtype, bytes in / out on this rank.  Two byte columns:

* **payload** ``S`` -- the full logical size of the collective: all-gather the gathered output, reduce-scatter the
  un-scattered input, all-reduce / broadcast / all-to-all the tensor this rank passes in;
* **bus** -- what each rank sends (= receives) on a ring / pairwise algorithm, the nccl-tests "busbw" convention:
  all-gather, reduce-scatter and all-to-all ``(W-1)/W · S``, all-reduce ``2(W-1)/W · S``, broadcast ``S``; 0 at W = 1.

Newton–Schulz FLOPs per rank: Muon gives matrix ``j`` of each shape bucket to shard rank ``j % S`` (chunks of
``chunk_numel`` elements); each orthogonalisation of an ``m x n`` matrix (``k = min``, ``N = max``) does 5 steps of
``A = X Xᵀ`` (2k²N), ``B = bA + cA·A`` (2k³), ``X ← aX + B X`` (2k²N): ``5 · (4k²N + 2k³)`` FLOPs (the dense count;
the GPU Gram kernel computes only the lower triangle of the two symmetric products).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# The scaled model of the measured runs: the 1.3B's structure (GQA, SwiGLU, tied embedding) with dimensions that do
# not divide 4 everywhere (vocab 1001: FSDP2 pads the embedding's dim 0), FP8-friendly widths (multiples of 16).
SCALED = dict(num_hidden_layers=2, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=208, vocab_size=1001, max_position_embeddings=64)
SEQ = 16  # tokens per sequence of the measured steps (comm volume does not depend on it)

# Paper figures for the extrapolation (stated in the report).
NVLINK_GBS = 450.0  # H100 SXM NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction per GPU
IB_GBS = 50.0  # 400 Gb/s InfiniBand NDR, one NIC per GPU: 50 GB/s per direction
H100_BF16_TFLOPS = 989.0  # dense bf16
MFU = 0.40
GPUS_PER_NODE = 8
CUDA_CHUNK_NUMEL = 1 << 26  # Muon's chunk_numel default on CUDA (2**21 on CPU)
NS_STEPS = 5

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast", "reduce", "gather", "scatter")

# c10d dispatcher ops -> (kind, layout): "out_in" = (outputs, inputs, group, ...), "inplace" = (tensors, group, ...)
_C10D_OPS = {
    "_allgather_base_": ("all_gather", "out_in"),
    "allgather_": ("all_gather", "out_in"),
    "allgather_coalesced_": ("all_gather", "out_in"),
    "allgather_into_tensor_coalesced_": ("all_gather", "out_in"),
    "_reduce_scatter_base_": ("reduce_scatter", "out_in"),
    "reduce_scatter_": ("reduce_scatter", "out_in"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "out_in"),
    "allreduce_": ("all_reduce", "inplace"),
    "allreduce_coalesced_": ("all_reduce", "inplace"),
    "alltoall_base_": ("all_to_all", "out_in"),
    "alltoall_": ("all_to_all", "out_in"),
    "broadcast_": ("broadcast", "inplace"),
    "reduce_": ("reduce", "inplace"),
    "gather_": ("gather", "out_in"),
    "scatter_": ("scatter", "out_in"),
}
# functional collectives (DTensor, funcol): first argument the input, the result the output
_FUNCOL_OPS = {
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
}


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _dtype(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).replace("torch.", "")
    if isinstance(x, (list, tuple)) and x:
        return _dtype(x[0])
    return "?"


def payload(kind: str, bytes_in: int, bytes_out: int) -> int:
    """The collective's full logical size ``S`` (see the module docstring)."""
    if kind == "all_gather":
        return bytes_out
    if kind in ("gather", "scatter"):
        return max(bytes_in, bytes_out)
    return bytes_in


def bus(kind: str, world: int, size: int) -> float:
    """Per-rank bus bytes of a collective of payload ``size`` over ``world`` ranks (nccl-tests convention)."""
    if world <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (world - 1) / world * size
    if kind in ("broadcast", "reduce"):
        return float(size)
    return (world - 1) / world * size


@dataclasses.dataclass
class Record:
    kind: str
    world: int
    dtype: str
    bytes_in: int
    bytes_out: int
    phase: str
    op: str
    group: str = ""  # formula records: "shard", "replicate" or "world" (which links the group spans)

    @property
    def payload(self) -> int:
        return payload(self.kind, self.bytes_in, self.bytes_out)

    @property
    def bus(self) -> float:
        return bus(self.kind, self.world, self.payload)


class CommCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every collective issued while active (see the module docstring).  ``phase`` labels the records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []
        self.phase = "-"

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def _record(self, kind: str, world: int, inp: Any, out: Any, op: str) -> None:
        self.records.append(Record(kind, int(world), _dtype(inp), _nbytes(inp), _nbytes(out), self.phase, op))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        api = sys.modules.get("torch.distributed.tensor._api")  # no DTensor can exist before it is imported
        if api is not None and any(issubclass(t, api.DTensor) for t in types):
            return NotImplemented  # let DTensor run: its collectives come back here on plain tensors
        ns, name = func.namespace, func._overloadpacket._qualified_op_name.split("::")[-1]
        out = func(*args, **kwargs)
        if ns == "c10d" and name in _C10D_OPS:
            kind, layout = _C10D_OPS[name]
            world = next(_pg_size(a) for a in args if _pg_size(a) is not None)
            if layout == "out_in":
                self._record(kind, world, args[1], args[0], name)
            else:
                self._record(kind, world, args[0], args[0], name)
        elif ns in ("_c10d_functional", "c10d_functional") and name in _FUNCOL_OPS:
            from torch.distributed.distributed_c10d import _resolve_process_group

            world = _resolve_process_group(args[-1]).size()  # the group name is the last argument
            self._record(_FUNCOL_OPS[name], world, args[0], out, name)
        return out

    # -- summaries
    def totals(self, by: tuple[str, ...] = ("kind",)) -> dict[tuple, dict[str, float]]:
        out: dict[tuple, dict[str, float]] = defaultdict(lambda: {"count": 0, "payload": 0, "bus": 0.0})
        for r in self.records:
            t = out[tuple(getattr(r, k) for k in by)]
            t["count"] += 1
            t["payload"] += r.payload
            t["bus"] += r.bus
        return dict(out)


def _pg_size(a: Any) -> int | None:
    """The size of a boxed ``ProcessGroup`` argument of a c10d op, else None."""
    if type(a).__name__ != "ScriptObject":
        return None
    try:
        from torch.distributed.distributed_c10d import ProcessGroup

        return ProcessGroup.unbox(a).size()
    except RuntimeError:  # another custom class (ReduceOp, ...)
        return None


# ---------------------------------------------------------------------------------------------------------
# The formula: per-rank collectives of one step from the parameter shapes
# ---------------------------------------------------------------------------------------------------------


def fsdp_groups(model_config) -> list[tuple[str, list[tuple[int, ...]]]]:
    """FSDP2 groups as ``wrap_model`` makes them: one per decoder layer, then the root (tied embedding + final
    norm), each a list of parameter shapes."""
    from xmodel.model import Xmodel

    with torch.device("meta"):
        model = Xmodel(model_config)
    groups = []
    for i, layer in enumerate(model.model.layers):
        groups.append((f"layer{i}", [tuple(p.shape) for p in layer.parameters()]))
    in_layers = {id(p) for layer in model.model.layers for p in layer.parameters()}
    groups.append(("root", [tuple(p.shape) for p in model.parameters() if id(p) not in in_layers]))
    return groups


def hidden_matrices(model_config) -> list[tuple[int, int]]:
    """Shapes of the matrices Muon takes (``is_hidden_matrix``: 2-D, not the embedding), in model order."""
    groups = fsdp_groups(model_config)
    return [s for name, shapes in groups if name != "root" for s in shapes if len(s) == 2]


def shard_numel(shape: tuple[int, ...], shards: int) -> int:
    """FSDP2's per-rank shard of a parameter: dim 0 padded to ``ceil(d0 / shards)`` rows per rank."""
    rows = -(-shape[0] // shards)
    return rows * math.prod(shape[1:])


def ns_flops(shape: tuple[int, int], steps: int = NS_STEPS) -> int:
    """Dense FLOPs of one Newton–Schulz orthogonalisation of an ``m x n`` matrix."""
    k, n = min(shape), max(shape)
    return steps * (4 * k * k * n + 2 * k ** 3)


def muon_partition(shapes: list[tuple[int, int]], shards: int, chunk_numel: int, grad_bytes: int, ns_bytes: int):
    """Muon's FSDP2 path over a shard group of ``shards`` ranks: the all-to-all payloads (one record per
    all-to-all: ``(in bytes, out bytes)``, gather in the gradient dtype then return in the compute dtype) and the
    Newton–Schulz FLOPs of every rank.  Buckets by shape in first-appearance order; matrix ``j`` of a chunk goes to
    rank ``j % shards``."""
    buckets: dict[tuple[int, int], int] = {}
    for s in shapes:
        buckets[s] = buckets.get(s, 0) + 1
    a2a: list[tuple[int, int]] = []
    flops = [0] * shards
    for (m, n), count in buckets.items():
        if shards == 1:
            flops[0] += count * ns_flops((m, n))
            continue
        rows = -(-m // shards)
        per_chunk = max(1, chunk_numel // (m * n)) * shards
        for start in range(0, count, per_chunk):
            length = min(per_chunk, count - start)
            slots = -(-length // shards)
            numel = shards * slots * rows * n
            a2a.append((numel * grad_bytes, numel * grad_bytes))
            a2a.append((numel * ns_bytes, numel * ns_bytes))
            for j in range(length):
                flops[j % shards] += ns_flops((m, n))
    return a2a, flops


def step_collectives(model_config, world: int, replicate: int = 1, optimizer: str = "adamw",
                     gather_bytes: int = 4, grad_bytes: int = 4, ns_bytes: int = 4,
                     chunk_numel: int = 1 << 21, fp8_linears: int = 0, fp8_amax: bool = False,
                     fp8_gather: bool = False) -> list[Record]:
    """The collectives of one trainer step on one rank (as :class:`Record` s, ``op`` = "formula").

    ``gather_bytes``: bytes per element of the weight all-gather (4 = fp32, what ``wrap_model`` does today: no
    ``MixedPrecisionPolicy``; 2 = bf16 param_dtype).  ``fp8_gather`` (``--fp8-all-gather``): the FP8 linears'
    weights -- every 2-D parameter of a decoder layer -- gathered as 1 byte per element (the norms in
    ``gather_bytes``, in the same buffer), and after the optimizer step ``precompute_fp8_scales``: one all-reduce
    over the world of ``fp8_linears`` fp32 amaxes (4 bytes each).  ``fp8_amax``: delayed
    scaling's amax all-reduces over the world (input + weight in the forward, grad_output in the backward, per FP8
    linear).  The gradient norm (``grad_norm``: ``clip_grad_norm_`` on the DTensor gradients) is one all-reduce of
    one fp32 value per parameter tensor over the shard group (measured: the per-parameter partial norms, stacked)."""
    if world % replicate:
        raise ValueError(f"replicate={replicate} must divide world={world}")
    shards = world // replicate
    recs: list[Record] = []

    def add(kind, w, nin, nout, phase, dtype, group="world"):
        if w > 1:
            recs.append(Record(kind, w, dtype, nin, nout, phase, "formula", group))

    dname = {4: "float32", 2: "bfloat16", 1: "float8"}
    groups = fsdp_groups(model_config)

    def gathered(name, shapes):  # (per-rank shard bytes, dtype name) of one group's all-gather
        if fp8_gather and name != "root":  # the layer's matrices are its FP8 linears, the norms stay in gather_bytes
            return (sum(shard_numel(s, shards) * (1 if len(s) == 2 else gather_bytes) for s in shapes), "float8")
        return sum(shard_numel(s, shards) for s in shapes) * gather_bytes, dname[gather_bytes]

    for name, shapes in groups:
        shard, dtype = gathered(name, shapes)
        add("all_gather", shards, shard, shard * shards, "forward", dtype, "shard")
    if fp8_amax:
        for _ in range(fp8_linears):
            add("all_reduce", world, 4, 4, "forward", "float32")
            add("all_reduce", world, 4, 4, "forward", "float32")
    for name, shapes in reversed(groups):
        if name != "root":  # the root is not resharded after the forward: no second gather
            shard, dtype = gathered(name, shapes)
            add("all_gather", shards, shard, shard * shards, "backward", dtype, "shard")
    if fp8_amax:
        for _ in range(fp8_linears):
            add("all_reduce", world, 4, 4, "backward", "float32")
    for name, shapes in reversed(groups):
        shard = sum(shard_numel(s, shards) for s in shapes) * grad_bytes
        add("reduce_scatter", shards, shard * shards, shard, "backward", dname[grad_bytes], "shard")
        add("all_reduce", replicate, shard, shard, "backward", dname[grad_bytes], "replicate")
    n_params = sum(len(shapes) for _, shapes in groups)
    add("all_reduce", shards, 4 * n_params, 4 * n_params, "clip", "float32", "shard")
    add("all_reduce", world, 8, 8, "trainer", "float64")  # the loss (xmodel.train: info.all_reduce_sum)
    if optimizer == "muon":
        a2a, _ = muon_partition(hidden_matrices(model_config), shards, chunk_numel, grad_bytes, ns_bytes)
        for nin, nout in a2a:
            add("all_to_all", shards, nin, nout, "optimizer", "?", "shard")
    if fp8_gather:  # precompute_fp8_scales: the next step's weight scales, one all-reduce (MAX) for all
        add("all_reduce", world, 4 * fp8_linears, 4 * fp8_linears, "fp8_scales", "float32")
    add("all_reduce", world, 4, 4, "trainer", "float32")  # the stop flag (info.any)
    return recs


# ---------------------------------------------------------------------------------------------------------
# Measured runs (gloo, spawned processes)
# ---------------------------------------------------------------------------------------------------------

# (name, world, dp_replicate, fp8 recipe or None, FP8 weight all-gather)
CONFIGS = [
    ("fsdp", 1, 1, None, False),
    ("fsdp", 2, 1, None, False),
    ("fsdp+fp8-delayed", 2, 1, "delayed", False),
    ("fsdp+fp8-current-ag", 2, 1, "current", True),
    ("fsdp", 4, 1, None, False),
    ("fsdp+fp8-delayed", 4, 1, "delayed", False),
    ("fsdp+fp8-current", 4, 1, "current", False),
    ("fsdp+fp8-current-ag", 4, 1, "current", True),
    ("hsdp-2x2", 4, 2, None, False),
    ("hsdp-2x2+fp8-delayed", 4, 2, "delayed", False),
    ("hsdp-2x2+fp8-current-ag", 4, 2, "current", True),
]


def _train_config(fp8: str | None, dp_replicate: int, fp8_all_gather: bool):
    from xmodel.training.config import TrainConfig

    return TrainConfig(fp8=fp8, fp8_emulate=fp8 is not None, fp8_all_gather=fp8_all_gather,
                       dp_replicate=dp_replicate, device="cpu", threads=1)


def _one_config(name: str, dp_replicate: int, fp8: str | None, fp8_all_gather: bool, info, device) -> dict:
    """One AdamW step and one Muon step (each after an uncounted warm-up step) of the scaled model, counted."""
    from types import SimpleNamespace

    from xmodel.config import XmodelConfig
    from xmodel.model import Xmodel
    from xmodel.train import _switch, grad_norm, micro_batch_loss
    from xmodel.training.distributed import wrap_model
    from xmodel.training.optim import TrainOptimizer, build_adamw
    from xmodel.training.prepare import fp8_convert

    cfg = _train_config(fp8, dp_replicate, fp8_all_gather)
    mc = XmodelConfig(**SCALED)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Xmodel(mc)
    model.to_empty(device=device)
    model.init_weights(scheme=cfg.init, generator=torch.Generator(device=device).manual_seed(0))
    n_fp8 = 0
    if fp8:
        fp8_convert(model, cfg, device, info)
        from xkernels.fp8.linear import FP8Linear

        n_fp8 = sum(isinstance(m, FP8Linear) for m in model.modules())
    model = wrap_model(model, "fsdp", device, info, dp_replicate if info.active else 1, fp8_all_gather)
    opt = TrainOptimizer(build_adamw(model, 1e-3, 1e-2), model)
    fp8_scales = None
    if fp8_all_gather:  # as train_loop: the scales once before the first step, then after every optimizer step
        from xkernels.fp8.fsdp import precompute_fp8_scales as fp8_scales

        fp8_scales(model)
    run = SimpleNamespace(model=model, device=device, autocast=contextlib.nullcontext(), optimizer=opt, cfg=cfg)
    gen = torch.Generator().manual_seed(1000 + info.rank)
    counter = CommCounter()
    steps: dict[str, Any] = {}

    def step(counted: bool):  # xmodel.train.train_loop's order, one micro-batch
        batch = torch.randint(0, mc.vocab_size, (1, SEQ + 1), generator=gen)
        ctx = counter if counted else contextlib.nullcontext()
        with ctx:
            with counter.in_phase("forward"):
                loss = micro_batch_loss(run, batch)
            with counter.in_phase("backward"):
                loss.backward()
            with counter.in_phase("clip"):
                grad_norm(run)
            with counter.in_phase("trainer"):
                info.all_reduce_sum([float(loss.detach())], device)
            with counter.in_phase("optimizer"):
                opt.step()
            if fp8_scales is not None:
                with counter.in_phase("fp8_scales"):
                    fp8_scales(model)
            opt.zero_grad()
            with counter.in_phase("trainer"):
                info.any(False, device)

    for phase in ("adamw", "muon"):
        if phase == "muon":
            _switch(opt, cfg)
        step(False)
        counter.records.clear()
        step(True)
        steps[phase] = [dataclasses.asdict(r) for r in counter.records]
    from xkernels.newton_schulz import default_compute_dtype

    return {"name": name, "world": info.world, "dp_replicate": dp_replicate, "fp8": fp8, "fp8_linears": n_fp8,
            "fp8_all_gather": fp8_all_gather,
            "ns_dtype": str(default_compute_dtype(device)).replace("torch.", ""), "rank": info.rank,
            "steps": steps}


def worker(out_dir: Path, configs: list[tuple]) -> None:
    """One rank (started by :func:`measure` with torchrun's environment variables): every config in turn."""
    from xmodel.training.distributed import init_distributed

    torch.set_num_threads(1)
    info, device = init_distributed("cpu")
    results = [_one_config(n, r, f, ag, info, device) for n, _, r, f, ag in configs]
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(results))
    info.barrier()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # gloo threads outlive destroy_process_group: see xmodel.training.distributed.exit_process


def check_1p3b(world: int, replicate: int) -> dict:
    """Count one AdamW and one Muon step of the real 1.3B shapes as rank 0 of ``world`` on torch's fake process group
    (collectives are dispatched, no data moves; one process) and compare with :func:`step_collectives`.

    FSDP2 refuses parameters left on the meta device, so the sharded model is materialised on the CPU (zeros: the
    values do not matter, and uninitialised memory can hold slow denormals); Newton–Schulz is replaced by a cast
    (the gathered matrices and the returned shards keep their shapes, so the all-to-alls are unchanged) -- its
    FLOPs are counted by :func:`muon_partition`.  The gradient norm and the trainer's two scalars are left out
    (``float()`` of a fake all-reduce is meaningless; they are validated by the gloo runs).  Measured: ~80 s and
    ~9 GB per call at world 64 (2-core Xeon)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import xkernels.optim.muon as muon_module
    from xmodel.config import XmodelConfig
    from xmodel.model import Xmodel
    from xmodel.train import _switch
    from xmodel.training.config import TrainConfig
    from xmodel.training.distributed import DistInfo, wrap_model
    from xmodel.training.optim import TrainOptimizer, build_adamw

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mc = XmodelConfig.from_preset("xmodel-2.5")
    with torch.device("meta"):
        model = Xmodel(mc)
    model = wrap_model(model, "fsdp", torch.device("cpu"), DistInfo(rank=0, world=world), replicate)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    muon_module._ns_batch = lambda X, ns: X.to(ns.dtype)  # this process only: shapes kept, no FLOPs spent
    opt = TrainOptimizer(build_adamw(model, 1e-3, 1e-2), model)
    out = {"world": world, "replicate": replicate}
    for optimizer in ("adamw", "muon"):
        if optimizer == "muon":
            _switch(opt, TrainConfig(muon_dtype="bf16"))
        with CommCounter() as counter:
            with counter.in_phase("forward"):
                loss = model(torch.zeros(1, 8, dtype=torch.long)).logits.sum()
            with counter.in_phase("backward"):
                loss.backward()
            with counter.in_phase("optimizer"):
                opt.step()
        opt.zero_grad()
        want = [r for r in step_collectives(mc, world, replicate, optimizer, ns_bytes=2)
                if r.phase not in ("trainer", "clip")]
        got_t, want_t = _key_totals(counter.records), _key_totals(want)
        out[optimizer] = {"measured_count": len(counter.records), "formula_count": len(want),
                          "measured_payload": sum(r.payload for r in counter.records),
                          "formula_payload": sum(r.payload for r in want), "exact": got_t == want_t,
                          "diffs": {k: [got_t.get(k), want_t.get(k)] for k in sorted(set(got_t) | set(want_t))
                                    if got_t.get(k) != want_t.get(k)}}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, configs: list[tuple], timeout: float = 300) -> list[list[dict]]:
    """Run ``configs`` (all of this world size) in ``world`` spawned processes; returns each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "XKERNELS_BACKEND": "torch"}
        env.pop("TRITON_INTERPRET", None)
        spec = json.dumps({"configs": configs, "out": tmp})
        logs = [open(Path(tmp) / f"rank{r}.log", "w+") for r in range(world)]  # files: a full pipe would block
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_comms", "--worker", spec],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                                  stdout=logs[r], stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        errors = []
        deadline = time.monotonic() + timeout
        for r, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                    q.wait()
                raise RuntimeError(f"world {world}: rank {r} did not finish in {timeout} s") from None
            if p.returncode != 0:
                logs[r].seek(0)
                errors.append(f"rank {r} exit {p.returncode}: {logs[r].read()[-2000:]}")
        for f in logs:
            f.close()
        if errors:
            raise RuntimeError(f"world {world}: " + "\n".join(errors))
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def run_measured() -> list[dict]:
    """Every config of :data:`CONFIGS` (world 1 in this process, 2 and 4 spawned); one entry per (config, rank)."""
    out = []
    for world in sorted({c[1] for c in CONFIGS}):
        configs = [c for c in CONFIGS if c[1] == world]
        if world == 1:
            from xmodel.training.distributed import DistInfo

            with _threads(1):
                out.extend(_one_config(n, r, f, ag, DistInfo(), torch.device("cpu")) for n, _, r, f, ag in configs)
        else:
            for per_rank in zip(*measure(world, configs)):
                out.extend(per_rank)
    return out


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Validation, extrapolation, report
# ---------------------------------------------------------------------------------------------------------


def _key_totals(records: list[Record]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "payload": 0, "bus": 0.0})
    for r in records:
        t = out[f"{r.phase}/{r.kind}@{r.world}"]
        t["count"] += 1
        t["payload"] += r.payload
        t["bus"] += r.bus
    return dict(sorted(out.items()))


def formula_for(entry: dict, optimizer: str) -> list[Record]:
    from xmodel.config import XmodelConfig

    ns_bytes = torch.empty((), dtype=getattr(torch, entry["ns_dtype"])).element_size()
    return step_collectives(XmodelConfig(**SCALED), entry["world"], entry["dp_replicate"], optimizer,
                            ns_bytes=ns_bytes, fp8_linears=entry["fp8_linears"],
                            fp8_amax=entry["fp8"] == "delayed", fp8_gather=entry["fp8_all_gather"])


def validate(measured: list[dict]) -> list[dict]:
    """Measured vs formula, per (config, rank, optimizer): exact bytes and counts per phase/op/group size."""
    rows = []
    for entry in measured:
        for optimizer, recs in entry["steps"].items():
            got = [Record(**r) for r in recs]
            want = formula_for(entry, optimizer)
            g, w = _key_totals(got), _key_totals(want)
            diffs = {k: (g.get(k), w.get(k)) for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k)}
            rows.append({"config": entry["name"], "world": entry["world"], "rank": entry["rank"],
                         "optimizer": optimizer, "measured_count": len(got), "formula_count": len(want),
                         "measured_payload": sum(r.payload for r in got),
                         "formula_payload": sum(r.payload for r in want),
                         "measured_bus": sum(r.bus for r in got), "formula_bus": sum(r.bus for r in want),
                         "exact": not diffs, "diffs": {k: list(v) for k, v in diffs.items()}})
    return rows


AG_FP32 = "fp32 (today)"
AG_FP8 = "fp8 (--fp8-all-gather)"
FP8_AG_NOTE = (
    "FP8 weight all-gather (`--fp8 current --fp8-all-gather`; measured above as `*-fp8-current-ag`, formula exact): "
    "the FP8 linears' weights travel as 1 byte per element -- 1/4 of today's fp32 gather (`wrap_model` sets no "
    "MixedPrecisionPolicy, so FSDP2 gathers the fp32 master weights; the forward casts under bf16 autocast on GPU), "
    "1/2 of a bf16 gather -- while the embedding and the norms still go as fp32; plus one all-reduce (MAX) of 336 "
    "fp32 amaxes (1,344 bytes) per step, `precompute_fp8_scales`. Gradients (reduce-scatter) stay fp32: the bytes "
    "saved are in the all-gathers only. The 'bf16 (formula)' rows are not measured (no MixedPrecisionPolicy yet).")


def scenarios_1p3b() -> list[dict]:
    """The 1.3B preset (formula): per GPU per step at 8 / 64 / 512 GPUs, flat FSDP vs HSDP (8-GPU nodes)."""
    from xmodel.config import XmodelConfig

    mc = XmodelConfig.from_preset("xmodel-2.5")
    n_fp8 = len(hidden_matrices(mc))  # the decoder layers' linears (7 per layer) are the FP8Linears
    rows = []
    for world in (8, 64, 512):
        layouts = [("FSDP", 1)] + ([("HSDP 8/node", world // GPUS_PER_NODE)] if world > GPUS_PER_NODE else [])
        for layout, rep in layouts:
            # (label, all-gather bytes per element, FP8 weight gather, FP8 delayed amax all-reduces)
            for ag, gb, fp8g, amax in ((AG_FP32, 4, False, False), ("fp32 + FP8 delayed amax", 4, False, True),
                                       (AG_FP8, 4, True, False), ("bf16 (formula)", 2, False, False)):
                for optimizer in ("adamw", "muon"):
                    recs = step_collectives(mc, world, rep, optimizer, gather_bytes=gb, grad_bytes=4, ns_bytes=2,
                                            chunk_numel=CUDA_CHUNK_NUMEL, fp8_linears=n_fp8, fp8_amax=amax,
                                            fp8_gather=fp8g)
                    rows.append(_time_row(mc, world, layout, rep, ag, optimizer, recs))
    return rows


def _time_row(mc, world: int, layout: str, rep: int, ag: str, optimizer: str, recs: list[Record]) -> dict:
    shards = world // rep
    # which link a collective crosses: a group inside one node -> NVLink; spanning nodes -> InfiniBand
    def in_node(r: Record) -> bool:
        return world <= GPUS_PER_NODE or (r.group == "shard" and shards <= GPUS_PER_NODE)

    intra = sum(r.bus for r in recs if in_node(r))
    inter = sum(r.bus for r in recs if not in_node(r))
    seq = 3776 if optimizer == "muon" else 3712
    batch = 960 if optimizer == "muon" else 480
    tokens = batch * seq
    compute_s = mc.flops_per_token(seq) * tokens / world / (MFU * H100_BF16_TFLOPS * 1e12)
    comm_s = intra / (NVLINK_GBS * 1e9) + inter / (IB_GBS * 1e9)
    _, flops = muon_partition(hidden_matrices(mc), shards, CUDA_CHUNK_NUMEL, 4, 2) if optimizer == "muon" \
        else (None, [0])
    ns_s = max(flops) / (MFU * H100_BF16_TFLOPS * 1e12)
    return {"world": world, "layout": layout, "weight_all_gather": ag, "optimizer": optimizer, "batch": batch,
            "seq": seq, "collectives": len(recs), "payload_gb": sum(r.payload for r in recs) / 1e9,
            "bus_intra_gb": intra / 1e9, "bus_inter_gb": inter / 1e9, "comm_s": comm_s, "compute_s": compute_s,
            "comm_fraction": comm_s / compute_s, "ns_tflop_max_rank": max(flops) / 1e12,
            "ns_tflop_min_rank": min(flops) / 1e12, "ns_s_max_rank": ns_s}


def ns_table(model_config, worlds=(1, 2, 4, 8, 64, 512), chunk_numel: int = CUDA_CHUNK_NUMEL) -> list[dict]:
    shapes = hidden_matrices(model_config)
    rows = []
    for s in worlds:
        _, flops = muon_partition(shapes, s, chunk_numel, 4, 2)
        owned = _owned(shapes, s, chunk_numel)
        rows.append({"shard_group": s, "matrices": len(shapes), "max_matrices_per_rank": max(owned),
                     "min_matrices_per_rank": min(owned), "tflop_max_rank": max(flops) / 1e12,
                     "tflop_min_rank": min(flops) / 1e12, "tflop_total": sum(flops) / 1e12})
    return rows


def _owned(shapes, shards: int, chunk_numel: int) -> list[int]:
    counts = [0] * shards
    buckets: dict[tuple, int] = {}
    for s in shapes:
        buckets[s] = buckets.get(s, 0) + 1
    for (m, n), c in buckets.items():
        per_chunk = max(1, chunk_numel // (m * n)) * shards
        for start in range(0, c, per_chunk):
            for j in range(min(per_chunk, c - start)):
                counts[j % shards] += 1
    return counts


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f}" if x >= 1e6 else f"{x / 1e9:.6f}"


def _gather_table(measured: list[dict]) -> list[str]:
    """Measured weight all-gather bytes of one step, fp32 gather vs FP8 gather (rank 0, AdamW step; Muon's are
    the same), split into the root group (tied embedding + final norm: fp32 in both, gathered once) and the layers."""
    from xmodel.config import XmodelConfig

    root = next(shapes for name, shapes in fsdp_groups(XmodelConfig(**SCALED)) if name == "root")
    gathers = {}
    for e in measured:
        if e["rank"] == 0 and (e["fp8"] is None or e["fp8_all_gather"]):
            recs = [r for r in e["steps"]["adamw"] if r["kind"] == "all_gather"]
            gathers[(e["world"], e["dp_replicate"], e["fp8_all_gather"])] = recs
    lines = ["## Weight all-gather bytes, measured: fp32 gather vs FP8 gather (rank 0, one step)", "",
             ("Payload bytes of every all-gather of the step (forward + backward); root = tied embedding + final "
              "norm (fp32 in both, gathered once), layers = the decoder layers (gathered twice). FP8 gather: "
              "`--fp8 current --fp8-all-gather`; fp32 gather: the same world without FP8."), "",
             "| W | replicas | gathers | fp32 gather: all / layers | FP8 gather: all / layers | FP8 / fp32: all / "
             "layers |", "|---|---|---|---|---|---|"]
    for (world, rep, ag), recs in sorted(gathers.items()):
        base = gathers.get((world, rep, False))
        if not ag or base is None:
            continue
        shards = world // rep
        root_bytes = sum(shard_numel(s, shards) for s in root) * 4 * shards
        a, b = sum(r["bytes_out"] for r in base), sum(r["bytes_out"] for r in recs)
        lines.append(f"| {world} | {rep} | {len(recs)} | {a:,} / {a - root_bytes:,} | {b:,} / {b - root_bytes:,} | "
                     f"{b / a:.3f} / {(b - root_bytes) / (a - root_bytes):.3f} |")
    return lines + [""]


def render(result: dict) -> str:
    from xmodel.config import XmodelConfig

    lines = [f"# What a training step communicates (issue 22, item 4) — {result['date']}", "",
             f"`{result['command']}` ({result['wall_s']:.0f} s; torch {result['versions']['torch']}, gloo on CPU, "
             f"OMP_NUM_THREADS=1). Scaled model: {result['scaled']} (batch 1 x {SEQ}).", "",
             "Columns: **payload** = the collective's full size S (all-gather: gathered output; reduce-scatter: "
             "input; all-reduce / all-to-all: the tensor passed in); **bus** = bytes each rank sends on a ring / "
             "pairwise algorithm (nccl-tests busbw): (W-1)/W·S for all-gather, reduce-scatter, all-to-all; "
             "2(W-1)/W·S for all-reduce; 0 at W = 1. Per rank, per step.", "",
             "## Measured (scaled model, rank 0), per op", "",
             "| config | W | optimizer | phase | op @ group size | count | payload bytes | bus bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in result["measured"]:
        if entry["rank"] != 0:
            continue
        for optimizer, recs in entry["steps"].items():
            totals = _key_totals([Record(**r) for r in recs])
            if not totals:
                lines.append(f"| {entry['name']} | {entry['world']} | {optimizer} | - | (none) | 0 | 0 | 0 |")
            for key, t in totals.items():
                phase, op = key.split("/")
                lines.append(f"| {entry['name']} | {entry['world']} | {optimizer} | {phase} | {op} | {t['count']} | "
                             f"{t['payload']:,} | {t['bus']:,.0f} |")
    lines += ["", "## Validation: measured vs formula (every rank, exact bytes per phase / op / group size)", "",
              "| config | W | rank | optimizer | collectives (measured / formula) | payload bytes (measured / "
              "formula) | bus bytes (measured / formula) | exact |", "|---|---|---|---|---|---|---|---|"]
    for v in result["validation"]:
        lines.append(f"| {v['config']} | {v['world']} | {v['rank']} | {v['optimizer']} | {v['measured_count']} / "
                     f"{v['formula_count']} | {v['measured_payload']:,} / {v['formula_payload']:,} | "
                     f"{v['measured_bus']:,.0f} / {v['formula_bus']:,.0f} | {'yes' if v['exact'] else 'NO'} |")
    bad = [v for v in result["validation"] if not v["exact"]]
    lines += ["", f"{len(result['validation']) - len(bad)} of {len(result['validation'])} (config, rank, optimizer) "
              "cases match exactly." + (" Differences: " + "; ".join(
                  f"{v['config']} W{v['world']} r{v['rank']} {v['optimizer']}: {v['diffs']}" for v in bad)
                  if bad else ""), ""]
    lines += _gather_table(result["measured"])
    if result.get("check_1p3b"):
        lines += ["## The 1.3B shapes counted (fake process group, rank 0) vs formula", "",
                  "One process plays rank 0 of W (torch's fake backend: collectives dispatched, no data moved), the "
                  "real 1.3B model sharded by `wrap_model`, forward + backward + optimizer step (Newton–Schulz "
                  "replaced by a cast of the same shape; gradient norm and trainer scalars left out, see "
                  "`check_1p3b`).", "",
                  "| W | replicas | optimizer | collectives (measured / formula) | payload bytes (measured / formula) "
                  "| exact |", "|---|---|---|---|---|---|"]
        for c in result["check_1p3b"]:
            for o in ("adamw", "muon"):
                v = c[o]
                lines.append(f"| {c['world']} | {c['replicate']} | {o} | {v['measured_count']} / "
                             f"{v['formula_count']} | {v['measured_payload']:,} / {v['formula_payload']:,} | "
                             f"{'yes' if v['exact'] else 'NO ' + str(v['diffs'])} |")
        lines.append("")
    mc = XmodelConfig.from_preset("xmodel-2.5")
    lines += ["## Newton–Schulz FLOPs per rank, 1.3B preset (formula: Muon's partition, chunk 2**26 as on CUDA)", "",
              f"{len(hidden_matrices(mc))} hidden matrices, 5 steps, dense count 5·(4k²N + 2k³) per matrix. With HSDP "
              "the shard group is the node (8): every replica group repeats the same work.", "",
              "| shard group S | matrices per rank (max / min) | TFLOP max rank | TFLOP min rank | TFLOP all ranks |",
              "|---|---|---|---|---|"]
    for r in result["ns_1p3b"]:
        lines.append(f"| {r['shard_group']} | {r['max_matrices_per_rank']} / {r['min_matrices_per_rank']} | "
                     f"{r['tflop_max_rank']:.2f} | {r['tflop_min_rank']:.2f} | {r['tflop_total']:.2f} |")
    lines += ["", "## 1.3B preset per GPU per step (formula, validated above) and paper time estimates", "",
              f"PAPER ESTIMATES. Links: NVLink {NVLINK_GBS:.0f} GB/s per direction per GPU (H100 SXM), InfiniBand "
              f"{IB_GBS:.0f} GB/s per GPU (400 Gb/s NDR, one NIC per GPU); a group within one 8-GPU node uses "
              "NVLink, a group spanning nodes is bound by IB. Compute: 6·N·tokens (`flops_per_token`, attention "
              f"included) at {MFU:.0%} MFU of {H100_BF16_TFLOPS:.0f} TFLOP/s bf16 dense. AdamW rows: stable phase, "
              "batch 480 x 3712; Muon rows: decay, 960 x 3776; one micro-batch per GPU per step (no gradient "
              "accumulation; each extra micro-batch repeats the all-gathers; at 512 GPUs batch 480 is under one "
              "sequence per GPU, counted fractionally). Time is bytes over bandwidth only: no per-collective latency "
              "(the FP8 delayed rows differ from fp32 by 3 x 336 four-byte all-reduces -- latency, not bytes). "
              "The FP8 all-gather rows come from the same formula, checked exact against the measured "
              "`*-fp8-current-ag` runs. "
              "No overlap assumed: comm/compute is "
              "the share of a step if nothing overlapped (FSDP2 overlaps the all-gathers with compute).", "",
              "| GPUs | layout | weight all-gather | optimizer | collectives | payload GB | bus GB NVLink | "
              "bus GB IB | comm ms | compute ms | comm/compute | NS TFLOP (max rank) | NS ms (max rank) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["scenarios_1p3b"]:
        lines.append(f"| {r['world']} | {r['layout']} | {r['weight_all_gather']} | {r['optimizer']} | "
                     f"{r['collectives']} | {r['payload_gb']:.2f} | {r['bus_intra_gb']:.2f} | "
                     f"{r['bus_inter_gb']:.2f} | "
                     f"{r['comm_s'] * 1e3:.1f} | {r['compute_s'] * 1e3:.1f} | {r['comm_fraction']:.1%} | "
                     f"{r['ns_tflop_max_rank']:.2f} | {r['ns_s_max_rank'] * 1e3:.1f} |")
    lines += ["", FP8_AG_NOTE, "", "## Summary (paper estimates, AdamW stable phase)", ""]
    pick = {(r["world"], r["layout"], r["weight_all_gather"]): r for r in result["scenarios_1p3b"]
            if r["optimizer"] == "adamw"}
    for world in (64, 512):
        parts = []
        for layout in ("FSDP", "HSDP 8/node"):
            today, fp8 = pick[(world, layout, AG_FP32)], pick[(world, layout, AG_FP8)]
            parts.append(f"{layout}: {today['bus_intra_gb']:.1f} GB NVLink + {today['bus_inter_gb']:.1f} GB IB bus "
                         f"bytes per GPU, {today['comm_s'] * 1e3:.0f} ms vs {today['compute_s'] * 1e3:.0f} ms compute "
                         f"({today['comm_fraction']:.0%}; FP8 all-gather {fp8['comm_fraction']:.0%})")
        lines.append(f"- {world} GPUs: " + "; ".join(parts) + ".")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="path stem: writes <out>.json and <out>.md (default: print the markdown)")
    p.add_argument("--check-1p3b", nargs="*", default=[], metavar="W:R",
                   help="also count the real 1.3B shapes as rank 0 of W ranks (R replicas; HSDP when R > 1) on the "
                        "fake process group, one process each (~80 s and ~9 GB per entry at W = 64)")
    p.add_argument("--check-worker", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check_worker:
        world, rep = (int(v) for v in args.check_worker.split(":"))
        print("RESULT " + json.dumps(check_1p3b(world, rep)), flush=True)
        os._exit(0)
    if args.worker:
        spec = json.loads(args.worker)
        worker(Path(spec["out"]), [tuple(c) for c in spec["configs"]])
        return 0
    t0 = time.perf_counter()
    measured = run_measured()
    validation = validate(measured)
    checks = []
    for spec in args.check_1p3b:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "XKERNELS_BACKEND": "torch"}
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_comms", "--check-worker", spec], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"--check-1p3b {spec}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        checks.append(json.loads(line[len("RESULT "):]))
    from benchmarks.conftest import versions
    from xmodel.config import XmodelConfig

    cmd = "python -m benchmarks.bench_comms" + (f" --out {args.out}" if args.out else "") + \
        (" --check-1p3b " + " ".join(args.check_1p3b) if args.check_1p3b else "")
    result = {"date": time.strftime("%Y-%m-%d"), "command": cmd, "versions": versions(), "scaled": SCALED,
              "measured": measured, "validation": validation, "check_1p3b": checks,
              "ns_1p3b": ns_table(XmodelConfig.from_preset("xmodel-2.5")),
              "scenarios_1p3b": scenarios_1p3b(), "fp8_all_gather_note": FP8_AG_NOTE,
              "paper_figures": {"nvlink_gbs": NVLINK_GBS, "ib_gbs": IB_GBS, "h100_bf16_tflops": H100_BF16_TFLOPS,
                                "mfu": MFU, "gpus_per_node": GPUS_PER_NODE}}
    result["wall_s"] = time.perf_counter() - t0
    md = render(result)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        Path(args.out + ".md").write_text(md)
        print(f"wrote {args.out}.json and {args.out}.md")
    else:
        print(md)
    ok = all(v["exact"] for v in validation) and all(c[o]["exact"] for c in checks for o in ("adamw", "muon"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
