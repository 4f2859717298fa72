"""Muon (MomentUm Orthogonalized by Newton–Schulz) with batched orthogonalisation, plus the AdamW hybrid.

Per 2-D parameter ``W`` (shape ``A × B``) with gradient ``g``, momentum ``μ`` and learning rate ``γ``
(the update rule of ``torch.optim.Muon``, whose momentum buffer is an EMA of the gradients)::

    m ← μ·m + (1 − μ)·g                       (m.lerp_(g, 1 − μ))
    u ← (1 − μ)·g + μ·m  if nesterov else m    (g.lerp(m, μ))
    O ← NewtonSchulz(u)                        (xkernels.newton_schulz: bf16, ‖u‖_F + eps, transposed if A > B)
    W ← W·(1 − γ·λ)                            (decoupled weight decay with the *unadjusted* lr)
    W ← W − γ'·O,   γ' = adjust_lr(γ, A, B)

``adjust_lr_fn``: ``"original"`` (default, Keller Jordan) ``γ·√max(1, A/B)``; ``"match_rms_adamw"``
(Moonlight, arXiv 2502.16982, the Xmodel-2.5 recipe) ``γ·0.2·√max(A, B)``; ``"spectral"`` ``γ·√(A/B)``
(= √(fan_out/fan_in) for an ``nn.Linear`` weight).  Moonlight writes the momentum as ``m ← μm + g`` and
Nesterov ``g + μm``; that is the EMA form scaled by ``1/(1 − μ)``, which the Frobenius normalisation removes
(up to ``eps``), so the step is the same.  The EMA form has the units of AdamW's ``exp_avg``, which is why
:func:`switch_adamw_to_muon` can seed the buffer from it.

Batching: within a parameter group, updates are bucketed by shape and dtype, stacked into ``(b, m, n)``
chunks of at most ``chunk_numel`` elements (the Nesterov combination written straight into the stack) and
orthogonalised by one batched call: Triton kernels on CUDA (tall matrices transposed to their small side),
the ``baddbmm`` reference on CPU (tall matrices kept as they are, ``XᵀX`` form).  Each chunk's update is
applied before the next chunk is built, so the extra memory stays bounded.

Distributed (decided per step; ``distributed=None`` means "when a process group of size > 1 is
initialised"):

* plain tensors (DDP, replicated parameters and all-reduced gradients): every rank updates every momentum
  buffer (elementwise, cheap, so every rank's state is complete), orthogonalises a contiguous share of each
  bucket and the results are all-gathered (``all_gather_into_tensor``).  Pass ``distributed=False`` when
  each rank optimises its own independent model.
* DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2 ``fully_shard``): momentum stays sharded (every
  rank keeps and checkpoints its own shard).  Matrix ``j`` of a bucket is owned by rank ``j % W``; one
  ``all_to_all`` gathers every owner's matrices whole (in the gradient dtype, so the normalisation sees
  exactly the single-process numbers), the owner orthogonalises them batched, and a second ``all_to_all``
  returns the shards (in the compute dtype).  The next chunk's gather is issued before the current chunk is
  orthogonalised, overlapping communication and compute.  DTensors replicated over a 1-D mesh are handled
  like DDP.  HSDP (FSDP2 on a 2-D mesh: ``Shard(0)`` on the shard dimension, ``Replicate`` on the replica
  dimension): as FSDP2 within each replica group (its shard ranks split the Newton–Schulz work), every replica
  group orthogonalising each matrix once on identical inputs.  Other placements raise ``NotImplementedError``.

Public API (used by the trainer, ``xmodel.training``)::

    from xkernels.optim import Muon, MuonWithAuxAdamW, muon_param_groups, switch_adamw_to_muon

    opt = MuonWithAuxAdamW(muon_param_groups(model, lr=1.667e-3, embed_lr=1e-2, weight_decay=0.1),
                           adjust_lr_fn="match_rms_adamw")            # hybrid from the start
    opt = switch_adamw_to_muon(adamw, model, momentum_init="zero")     # at the decay phase
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from xkernels.dispatch import use_triton
from xkernels.newton_schulz import (
    _normalise,
    default_compute_dtype,
    orthogonalize_batched,
    resolve_coefficients,
)

__all__ = [
    "Muon",
    "MuonWithAuxAdamW",
    "adjust_lr",
    "is_hidden_matrix",
    "muon_param_groups",
    "switch_adamw_to_muon",
]

ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral")
_EMBEDDING_NAME_PARTS = ("embed", "lm_head", "wte", "wpe")
_MUON_DEFAULT_COEFFS = "muon"


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """The per-matrix learning rate γ' of a ``(A, B)`` weight (see the module docstring)."""
    a, b = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    if adjust_lr_fn == "spectral":
        return lr * math.sqrt(a / b)
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (same storage: in-place updates reach the DTensor), else ``t``."""
    cls = _dtensor_cls()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, batched over equal shapes; single device, DDP or FSDP2 (see the module docs).

    Args (the first eight as in ``torch.optim.Muon``):
        params: 2-D floating tensors or param-group dicts.  Anything else raises ``ValueError`` pointing
            to :class:`MuonWithAuxAdamW` / :func:`muon_param_groups`.
        lr: γ (default 1e-3; a 0-d tensor is used on the device, never read on the host).  weight_decay: λ,
            decoupled (default 0.1).  momentum: μ (default 0.95).
        nesterov: Nesterov momentum (default True).
        ns_coefficients: one ``(a, b, c)`` used at every step (``torch.optim.Muon``'s argument) or one per
            step; overrides ``coefficients``.
        eps: Newton–Schulz normaliser epsilon (default 1e-7).  ns_steps: iterations (default 5).
        adjust_lr_fn: ``None``/``"original"``, ``"match_rms_adamw"`` or ``"spectral"``.
        coefficients: ``"muon"`` (default) or ``"polar_express"`` (see :mod:`xkernels.newton_schulz`).
        compute_dtype: dtype of the Newton–Schulz products; ``None`` = bf16 (fp32 on CPUs without native
            bf16 GEMMs, see :func:`xkernels.newton_schulz.default_compute_dtype`).
        chunk_numel: largest number of matrix elements orthogonalised in one batched call (per rank); bounds
            the extra memory of a step to a few times this many elements.  ``None``: 2**26 on CUDA (large
            batches fill the GPU), 2**21 on CPU, where a chunk must stay cache-sized: 96 matrices 256×640 in one
            bf16 batch take 203 ms, in chunks of 8 123 ms, one at a time 146 ms (1 core, measured).
        distributed: ``None`` (auto), ``True`` or ``False``: whether plain tensors are DDP replicas.
        process_group: the group for plain (DDP) tensors (default: the world).
        use_kernels: ``None``: the Triton kernels for CUDA tensors, the ``baddbmm`` reference on CPU -- even
            under ``TRITON_INTERPRET=1``, where interpreted Newton–Schulz costs ~2.6 s per step for a 2-layer
            64-wide model (measured); ``True``: the kernels wherever :func:`xkernels.dispatch.use_triton` allows
            (interpreted on CPU); ``False``: always the reference.  ``XKERNELS_BACKEND=torch`` /
            :func:`xkernels.force_backend` still force the reference.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Sequence[float] | Sequence[Sequence[float]] | None = None,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        coefficients: str | Sequence[Sequence[float]] = _MUON_DEFAULT_COEFFS,
        compute_dtype: torch.dtype | None = None,
        chunk_numel: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        use_kernels: bool | None = None,
        **extra_defaults: Any,
    ) -> None:
        if chunk_numel is not None and (
            isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1
        ):
            raise ValueError(f"chunk_numel must be a positive int or None, got {chunk_numel!r}")
        if compute_dtype not in (None, torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise TypeError(f"compute_dtype must be bf16, fp16, fp32, fp64 or None, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        self.chunk_numel = chunk_numel
        self.distributed = distributed
        self.process_group = process_group
        self.use_kernels = use_kernels
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            coefficients=coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            use_muon=True,
            **extra_defaults,
        )
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    _allows_adamw_groups = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not param_group.get("use_muon", True):
            if not self._allows_adamw_groups:
                raise ValueError("Muon takes Muon groups only; for AdamW groups (use_muon=False) use MuonWithAuxAdamW")
            for key in ("betas", "eps"):
                if key not in param_group and f"adamw_{key}" in self.defaults:
                    param_group[key] = self.defaults[f"adamw_{key}"]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_scalar("lr", group["lr"])
        _check_scalar("weight_decay", group["weight_decay"])
        for p in group["params"]:
            if torch.is_complex(p) or not p.is_floating_point():
                raise TypeError(f"Muon/AdamW parameters must be real floating tensors, got dtype {p.dtype}")
        if group["use_muon"]:
            self._check_muon_group(group)
        else:
            _check_adamw_group(group)

    def _check_muon_group(self, group: dict[str, Any]) -> None:
        m = group["momentum"]
        if not 0.0 <= m < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {m}")
        if not isinstance(group["eps"], (int, float)) or group["eps"] < 0:
            raise ValueError(f"eps must be a number >= 0, got {group['eps']!r}")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
        _group_coefficients(group)  # validates ns_steps and the coefficient lists
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(
                    f"Muon only optimises 2-D matrices, got a parameter of shape {tuple(p.shape)}; route "
                    "embeddings, norms and biases to AdamW with xkernels.optim.MuonWithAuxAdamW("
                    "muon_param_groups(model, ...))"
                )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimisation step over every group (Muon groups batched; AdamW groups for the hybrid)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group)
            else:
                _adamw_group_step(self, group)
        return loss

    def _dist_mode(self, p: torch.Tensor) -> tuple[str, Any]:
        """``("local", None)``, ``("ddp", group)`` or ``("fsdp", group)`` for one parameter."""
        cls = _dtensor_cls()
        if cls is not None and isinstance(p, cls):
            from torch.distributed.tensor import Replicate, Shard

            mesh, placements = p.device_mesh, tuple(p.placements)
            if mesh.ndim > 1:
                # HSDP (FSDP2 on a 2-D mesh): sharded on dim 0 over one mesh dimension, replicated over the others.
                # The replicas hold the same shards (gradients are averaged over the whole world), so each replica
                # group orthogonalises every matrix once, its Newton-Schulz work split over its shard ranks as FSDP.
                shard_dims = [d for d, pl in enumerate(placements) if pl == Shard(0)]
                if len(shard_dims) != 1 or not all(isinstance(pl, Replicate) for d, pl in enumerate(placements)
                                                   if d != shard_dims[0]):
                    raise NotImplementedError(
                        f"Muon supports DTensors on a multi-dimensional mesh as HSDP only (Shard(0) on one mesh "
                        f"dimension, Replicate on the others), got placements {placements}")
                d = shard_dims[0]
                return ("fsdp", mesh.get_group(d)) if mesh.size(d) > 1 else ("local", None)
            if placements[0] == Shard(0):
                return ("fsdp", mesh.get_group(0)) if mesh.size() > 1 else ("local", None)
            if isinstance(placements[0], Replicate):
                return ("ddp", mesh.get_group(0)) if mesh.size() > 1 else ("local", None)
            raise NotImplementedError(
                f"Muon supports DTensors sharded on dim 0 (FSDP2) or replicated, got {placements}"
            )
        use = self.distributed
        if use is None:
            use = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1
        return ("ddp", self.process_group) if use else ("local", None)

    def _muon_group_step(self, group: dict[str, Any]) -> None:
        lr = _lr(group)
        wd = float(group["weight_decay"])
        mu = float(group["momentum"])
        coeffs, safety = _group_coefficients(group)
        eps = float(group["eps"])
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(_local(p.grad))
            bufs.append(_local(state["momentum_buffer"]))
        if not params:
            return
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)

        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            mode, pg = self._dist_mode(p)
            shape = tuple(p.shape)  # global shape for DTensors
            # id(None) is not traceable by torch 2.11's dynamo: key local buckets by None itself
            group_key = None if pg is None else id(pg)
            buckets.setdefault((mode, group_key, shape, bufs[i].dtype, bufs[i].device), []).append(i)

        for (mode, _, _, _, device), idx in buckets.items():
            pg = self._dist_mode(params[idx[0]])[1]
            dtype = self.compute_dtype or default_compute_dtype(device)
            # interpreted kernels on CPU only on request: they cost seconds per step even for tiny models
            use_kernel = device.type == "cuda" if self.use_kernels is None else self.use_kernels
            ns = _NS(coeffs, safety, eps, dtype, use_kernel and use_triton(bufs[idx[0]]))
            ups = _Updates([grads[i] for i in idx], [bufs[i] for i in idx], mu, group["nesterov"])
            chunk_numel = self.chunk_numel or (1 << 26 if device.type == "cuda" else 1 << 21)
            if mode == "local":
                chunks = _orthogonalize_local(ups, ns, chunk_numel)
            elif mode == "ddp":
                chunks = _orthogonalize_ddp(ups, ns, chunk_numel, pg)
            else:
                chunks = _orthogonalize_fsdp(ups, tuple(params[idx[0]].shape), ns, chunk_numel, pg)
            for members, outs in chunks:  # applied chunk by chunk: the orthogonalised copies never pile up
                _apply(group, [params[idx[j]] for j in members], outs, lr, wd)


def _lr(group: dict[str, Any]) -> float | torch.Tensor:
    """The group's lr: a Python float, or kept as a tensor when it is one (a 0-d lr tensor -- as torch.optim
    accepts for compiled / CUDA-graph steps -- is used on the device: no host read of it)."""
    lr = group["lr"]
    return lr if isinstance(lr, torch.Tensor) else float(lr)


def _apply(group: dict[str, Any], params: list[torch.Tensor], outs: list[torch.Tensor], lr, wd: float) -> None:
    """``W ← W(1 − γλ) − γ'·O`` with foreach ops, one ``add`` per distinct lr adjustment (orientation).

    A tensor ``lr`` stays a tensor: the update is scaled by ``−γ'`` as a device scalar (``O`` times ``−γ'`` in
    ``O``'s dtype, then added), so the step never reads the lr on the host."""
    local = [_local(p) for p in params]
    if wd != 0.0:
        torch._foreach_mul_(local, 1.0 - lr * wd)
    # a tensor lr groups by the adjustment factor (adjust_lr of 1) and multiplies on the device
    key_lr = 1.0 if isinstance(lr, torch.Tensor) else lr
    by_lr: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for p, lp, o in zip(params, local, outs):
        ps, os_ = by_lr.setdefault(adjust_lr(key_lr, group["adjust_lr_fn"], p.shape), ([], []))
        ps.append(lp)
        os_.append(o)  # bf16 into fp32 weights: the add casts on the fly
    for adjusted, (ps, os_) in by_lr.items():
        if isinstance(lr, torch.Tensor):
            torch._foreach_add_(ps, torch._foreach_mul(os_, -(lr * adjusted)))
        else:
            torch._foreach_add_(ps, os_, alpha=-adjusted)


def _check_scalar(name: str, v: Any) -> None:
    value = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _group_coefficients(group: dict[str, Any]):
    spec = group["ns_coefficients"] if group["ns_coefficients"] is not None else group["coefficients"]
    if (
        group["ns_coefficients"] is not None
        and len(group["ns_coefficients"]) == 3
        and all(isinstance(v, (int, float)) for v in group["ns_coefficients"])
    ):
        spec = [tuple(group["ns_coefficients"])]  # torch.optim.Muon's single (a, b, c)
    return resolve_coefficients(spec, group["ns_steps"])


# ---------------------------------------------------------------------------------------------------------
# Orthogonalisation of a bucket: single device, DDP share + all-gather, FSDP2 owner gather/scatter
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NS:
    """Newton–Schulz settings of one group and bucket."""

    coeffs: tuple[tuple[float, float, float], ...]
    safety: float
    eps: float
    dtype: torch.dtype
    use_kernel: bool


class _Updates:
    """The matrices of one bucket to orthogonalise, built a chunk at a time so the extra memory stays bounded:
    the Nesterov combination ``g.lerp(m, μ)`` of gradient and momentum, or the momentum itself."""

    def __init__(self, grads: list[torch.Tensor], bufs: list[torch.Tensor], mu: float, nesterov: bool):
        self.grads, self.bufs, self.mu, self.nesterov = grads, bufs, mu, nesterov
        self.device, self.dtype = bufs[0].device, bufs[0].dtype

    def __len__(self) -> int:
        return len(self.bufs)

    def shape(self, i: int) -> torch.Size:
        return self.bufs[i].shape

    def get(self, i: int) -> torch.Tensor:
        return self.grads[i].lerp(self.bufs[i], self.mu) if self.nesterov else self.bufs[i]

    def write(self, i: int, out: torch.Tensor) -> None:
        """``out ← get(i)`` without a temporary."""
        if self.nesterov:
            torch.lerp(self.grads[i], self.bufs[i], self.mu, out=out)
        else:
            out.copy_(self.bufs[i])


def _ns_batch(X: torch.Tensor, ns: _NS) -> torch.Tensor:
    """Normalise and orthogonalise a stacked ``(b, m, n)`` batch; returns ``(b, m, n)`` in ``ns.dtype`` (a
    transposed view when the kernels needed tall matrices on their small side)."""
    X, transposed = _normalise(X, ns.eps, ns.safety, ns.dtype, orient=ns.use_kernel)
    O = orthogonalize_batched(X, ns.coeffs, use_kernel=ns.use_kernel)
    return O.mT if transposed else O


def _ns_stack(ups: _Updates, indices: Sequence[int], ns: _NS) -> torch.Tensor:
    """:func:`_ns_batch` of bucket members, the Nesterov combination written straight into the stack."""
    X = torch.empty((len(indices), *ups.shape(indices[0])), dtype=ups.dtype, device=ups.device)
    for j, i in enumerate(indices):
        ups.write(i, X[j])
    return _ns_batch(X, ns)


# Each of the three yields ``(bucket indices, orthogonalised matrices or local shards)`` one chunk at a time.
Chunks = Iterator[tuple[range, list[torch.Tensor]]]


def _orthogonalize_local(ups: _Updates, ns: _NS, chunk_numel) -> Chunks:
    per_call = max(1, chunk_numel // ups.shape(0).numel())
    for s in range(0, len(ups), per_call):
        chunk = range(s, min(s + per_call, len(ups)))
        O = _ns_stack(ups, chunk, ns)
        yield chunk, list(O)


def _orthogonalize_ddp(ups: _Updates, ns: _NS, chunk_numel, pg) -> Chunks:
    """Rank r orthogonalises matrices ``[r·c, (r+1)·c)`` of each chunk, then one all-gather shares them."""
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    m, n = ups.shape(0)
    per_rank = max(1, chunk_numel // (m * n))
    for s in range(0, len(ups), per_rank * world):
        chunk = range(s, min(s + per_rank * world, len(ups)))
        c = -(-len(chunk) // world)
        mine = chunk[rank * c : (rank + 1) * c]
        send = torch.zeros((c, m, n), dtype=ns.dtype, device=ups.device)
        if len(mine):
            send[: len(mine)] = _ns_stack(ups, mine, ns)
        recv = torch.empty((world * c, m, n), dtype=ns.dtype, device=send.device)
        dist.all_gather_into_tensor(recv, send, group=pg)
        yield chunk, list(recv[: len(chunk)])


def _orthogonalize_fsdp(ups: _Updates, shape, ns: _NS, chunk_numel, pg) -> Chunks:
    """``ups`` are the local dim-0 shards (torch.chunk layout: ``ceil(m/W)`` rows per rank, the last ranks
    fewer or none) of matrices of global ``shape``.  Matrix ``j`` is owned by rank ``j % W`` (slot ``j // W``).
    Returns this rank's shard of every orthogonalised matrix."""
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    m, n = shape
    rows = -(-m // world)
    slots_per_chunk = max(1, chunk_numel // (m * n))

    def gather(chunk: range):  # async all_to_all: every owner receives its matrices whole (padded rows)
        slots = -(-len(chunk) // world)
        send = torch.zeros((world, slots, rows, n), dtype=ups.dtype, device=ups.device)
        for j, i in enumerate(chunk):
            send[j % world, j // world, : ups.shape(i)[0]] = ups.get(i)
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=pg, async_op=True)
        return chunk, slots, recv, work

    per_chunk = slots_per_chunk * world
    starts = list(range(0, len(ups), per_chunk))
    pending = gather(range(0, min(per_chunk, len(ups))))
    returns = []
    for ci in range(len(starts)):
        chunk, slots, recv, work = pending
        work.wait()
        if ci + 1 < len(starts):  # overlap the next chunk's gather with this chunk's Newton–Schulz
            nxt = starts[ci + 1]
            pending = gather(range(nxt, min(nxt + per_chunk, len(ups))))
        owned = sum(1 for j in range(len(chunk)) if j % world == rank)
        result = torch.zeros((slots, world * rows, n), dtype=ns.dtype, device=ups.device)
        if owned:
            full = recv[:, :owned].permute(1, 0, 2, 3).reshape(owned, world * rows, n)[:, :m]
            result[:owned, :m] = _ns_batch(full, ns)
        send_back = result.reshape(slots, world, rows, n).permute(1, 0, 2, 3).contiguous()
        back = torch.empty_like(send_back)
        returns.append((chunk, back, dist.all_to_all_single(back, send_back, group=pg, async_op=True)))
    for chunk, back, work in returns:
        work.wait()
        yield chunk, [back[j % world, j // world, : ups.shape(i)[0]] for j, i in enumerate(chunk)]


# ---------------------------------------------------------------------------------------------------------
# AdamW for the auxiliary groups (torch.optim.AdamW's update and state keys)
# ---------------------------------------------------------------------------------------------------------


def _check_adamw_group(group: dict[str, Any]) -> None:
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
    if group["eps"] < 0:
        raise ValueError(f"AdamW eps must be >= 0, got {group['eps']}")


def _adamw_group_step(opt: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """AdamW as ``torch.optim.AdamW`` (no amsgrad), with ``torch._foreach`` ops over the parameters that share
    device and dtype.  State keys ``exp_avg``, ``exp_avg_sq`` and an fp32 ``step`` tensor, so states move
    freely between this and ``torch.optim.AdamW``.

    No host reads: ``step`` lives on the parameter's device (as in AdamW's ``capturable`` mode; a CPU step,
    e.g. from a ``torch.optim.AdamW`` state, is moved there once) and the bias corrections are tensor math::

        t ← t + 1;   c1 = 1 − β1^t;   c2 = √(1 − β2^t)
        W ← W(1 − γλ);   m ← lerp(m, g, 1 − β1);   v ← β2·v + (1 − β2)·g²
        W ← W − γ · m / (c1 · (√v / c2 + ε))

    so the step never waits for the device, can be captured in a CUDA graph and traces under torch.compile
    without a break (``float(step)`` would be both a host read and a graph break).  Equal to the
    non-capturable formula ``W − (γ/c1)·m/(√v/c2 + ε)`` up to fp32 rounding of the product."""
    lr, wd, eps = _lr(group), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = group["betas"]
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("AdamW groups do not support sparse gradients")
        state = opt.state[p]
        param = _local(p)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != param.device:  # e.g. a torch.optim.AdamW state (CPU step): moved once
            state["step"] = state["step"].to(param.device, torch.float32)
        lists = buckets.setdefault((param.device, param.dtype), [[], [], [], [], []])
        tensors = (param, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), state["step"])
        for lst, t in zip(lists, tensors):
            lst.append(t)
    for params, grads, exp_avgs, exp_avg_sqs, steps in buckets.values():
        torch._foreach_add_(steps, 1.0)
        c1 = torch._foreach_pow(beta1, steps)  # β1^t -> 1 − β1^t
        torch._foreach_neg_(c1)
        torch._foreach_add_(c1, 1.0)
        c2 = torch._foreach_pow(beta2, steps)  # β2^t -> √(1 − β2^t)
        torch._foreach_neg_(c2)
        torch._foreach_add_(c2, 1.0)
        torch._foreach_sqrt_(c2)
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, c2)
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, c1)
        if isinstance(lr, torch.Tensor):  # W − m / (denom / γ): the lr tensor stays on the device
            torch._foreach_div_(denom, lr)
            torch._foreach_addcdiv_(params, exp_avgs, denom, value=-1.0)
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


class MuonWithAuxAdamW(Muon):
    """One optimizer (one ``state_dict``, one ``param_groups`` list for LR schedulers) for a whole model:
    groups with ``use_muon=True`` run :class:`Muon`, groups with ``use_muon=False`` run AdamW (identical to
    ``torch.optim.AdamW``, state keys ``exp_avg``/``exp_avg_sq``/``step``; any shape allowed).

    ``param_groups`` must be dicts with a ``use_muon`` key (build them with :func:`muon_param_groups`).
    Keyword defaults are those of :class:`Muon` plus ``betas`` (0.9, 0.95) and ``adamw_eps`` (1e-8) for the
    AdamW groups (an AdamW group's own ``eps``/``betas`` keys take precedence).
    """

    _allows_adamw_groups = True

    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        **muon_kwargs: Any,
    ) -> None:
        groups = list(param_groups)
        for g in groups:
            if not isinstance(g, dict) or "use_muon" not in g:
                raise ValueError(
                    "MuonWithAuxAdamW takes param-group dicts with a 'use_muon' key; build them with "
                    "xkernels.optim.muon_param_groups(model, ...)"
                )
        super().__init__(
            groups, lr=lr, weight_decay=weight_decay, adamw_betas=tuple(betas), adamw_eps=adamw_eps, **muon_kwargs
        )


# ---------------------------------------------------------------------------------------------------------
# Routing helpers and the AdamW -> Muon switch
# ---------------------------------------------------------------------------------------------------------


def _unique_named_parameters(model: torch.nn.Module) -> list[tuple[str, list[str], torch.nn.Parameter]]:
    """``(first name, all names, param)`` once per Parameter object (tied weights appear once)."""
    by_id: dict[int, tuple[str, list[str], torch.nn.Parameter]] = {}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            by_id[id(p)][1].append(name)
        else:
            by_id[id(p)] = (name, [name] + (["<nn.Embedding>"] if id(p) in embedding_ids else []), p)
    return list(by_id.values())


def is_hidden_matrix(names: Sequence[str] | str, p: torch.Tensor) -> bool:
    """The routing rule: a 2-D parameter none of whose names (tied aliases included) mentions an embedding
    or the LM head (``embed``, ``lm_head``, ``wte``, ``wpe``) and that is not an ``nn.Embedding`` weight."""
    names = [names] if isinstance(names, str) else names
    if p.ndim != 2:
        return False
    return not any(part in name or name == "<nn.Embedding>" for name in names for part in _EMBEDDING_NAME_PARTS)


def muon_param_groups(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    embed_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    is_muon: Callable[[Sequence[str], torch.Tensor], bool] = is_hidden_matrix,
) -> list[dict[str, Any]]:
    """Param groups for :class:`MuonWithAuxAdamW`; each trainable parameter appears exactly once.

    * ``"muon"``: hidden 2-D matrices (``is_muon(names, p)``), lr ``lr``, weight decay ``weight_decay``.
    * ``"embed"``: the other ≥2-D parameters (embeddings; the tied ``lm_head`` is the same object and is
      counted once), AdamW, lr ``embed_lr`` (default ``adamw_lr``), weight decay ``adamw_weight_decay``
      (default ``weight_decay``).
    * ``"no_decay"``: 0-D/1-D parameters (norm weights, biases), AdamW, lr ``adamw_lr`` (default ``lr``), no
      weight decay.

    Empty groups are omitted.  Every group has a ``name`` key.
    """
    adamw_lr = lr if adamw_lr is None else adamw_lr
    embed_lr = adamw_lr if embed_lr is None else embed_lr
    adamw_wd = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    muon, embed, no_decay = [], [], []
    for _, names, p in _unique_named_parameters(model):
        if not p.requires_grad:
            continue
        if is_muon(names, p):
            muon.append(p)
        elif p.ndim >= 2:
            embed.append(p)
        else:
            no_decay.append(p)
    groups = [
        dict(name="muon", params=muon, use_muon=True, lr=lr, weight_decay=weight_decay),
        dict(name="embed", params=embed, use_muon=False, lr=embed_lr, weight_decay=adamw_wd),
        dict(name="no_decay", params=no_decay, use_muon=False, lr=adamw_lr, weight_decay=0.0),
    ]
    return [g for g in groups if g["params"]]


_ADAMW_ONLY_KEYS = frozenset(
    {
        "params",
        "betas",
        "eps",
        "amsgrad",
        "maximize",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "decoupled_weight_decay",
        "use_muon",
    }
)


def switch_adamw_to_muon(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    *,
    momentum_init: str = "zero",
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "muon",
    adjust_lr_fn: str | None = "match_rms_adamw",
    eps: float = 1e-7,
    is_muon: Callable[[Sequence[str], torch.Tensor], bool] = is_hidden_matrix,
    **muon_kwargs: Any,
) -> MuonWithAuxAdamW:
    """Turn an AdamW-trained model over to Muon for its hidden matrices (Xmodel-2.5's decay phase).

    ``optimizer`` is a ``torch.optim.AdamW`` (or a :class:`MuonWithAuxAdamW` with AdamW groups).  Each of its
    groups is split in two: the parameters ``is_muon`` selects go to a Muon group named ``"<name>.muon"`` that
    keeps the group's ``lr``, ``weight_decay``, ``initial_lr`` and any other user key ("every other
    hyper-parameter unchanged"), the rest stay in an AdamW group (same name, ``betas`` and ``eps`` too) whose
    AdamW state is taken over (``exp_avg``/``exp_avg_sq`` tensors as is, ``step`` as a CPU copy), so they continue
    exactly.
    A group without a ``name`` is called ``"group<i>"``.

    ``momentum_init``: ``"zero"`` starts each Muon momentum buffer at zero; ``"exp_avg"`` copies AdamW's
    first moment (an EMA of gradients, the same units as Muon's EMA buffer).  Parameters AdamW never stepped
    start at zero either way.  Returns a new optimizer; attach a new LR scheduler to it (the old one holds
    the old optimizer).
    """
    if momentum_init not in ("zero", "exp_avg"):
        raise ValueError(f"momentum_init must be 'zero' or 'exp_avg', got {momentum_init!r}")
    names_of = {id(p): names for _, names, p in _unique_named_parameters(model)}
    new_groups: list[dict[str, Any]] = []
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("use_muon", False):
            raise ValueError("optimizer already has a Muon group; switch_adamw_to_muon expects AdamW groups")
        if group.get("amsgrad", False) or group.get("maximize", False):
            raise ValueError("switch_adamw_to_muon supports plain AdamW groups (amsgrad=False, maximize=False)")
        muon_ps, aux_ps = [], []
        for p in group["params"]:
            if id(p) not in names_of:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} in optimizer group {gi} is not in the model")
            (muon_ps if is_muon(names_of[id(p)], p) else aux_ps).append(p)
        # carry every user key (name, initial_lr, a trainer's own tags...) but not torch.optim.AdamW's flags
        carried = {k: v for k, v in group.items() if k not in _ADAMW_ONLY_KEYS}
        base_name = group.get("name", f"group{gi}")
        if muon_ps:
            new_groups.append(dict(carried, name=f"{base_name}.muon", params=muon_ps, use_muon=True))
        if aux_ps:
            aux = dict(carried, betas=group.get("betas", (0.9, 0.999)), eps=group.get("eps", 1e-8))
            new_groups.append(dict(aux, name=base_name, params=aux_ps, use_muon=False))
    new = MuonWithAuxAdamW(
        new_groups,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        coefficients=coefficients,
        adjust_lr_fn=adjust_lr_fn,
        eps=eps,
        **muon_kwargs,
    )
    for group in new.param_groups:
        for p in group["params"]:
            old = optimizer.state.get(p, {})
            if not group["use_muon"]:
                if old:
                    new.state[p] = {k: old[k] for k in ("exp_avg", "exp_avg_sq") if k in old}
                    # the hybrid keeps step on the parameter's device (no host read in its step)
                    new.state[p]["step"] = old["step"].detach().to(p.device, torch.float32).clone()
            elif momentum_init == "exp_avg" and "exp_avg" in old:
                new.state[p] = {"momentum_buffer": old["exp_avg"].detach().clone()}
    return new
