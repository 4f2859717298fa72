"""FP8Linear: a drop-in ``nn.Linear`` whose forward and backward run three scaled FP8 GEMMs.

For ``y = x Wᵀ + b`` with ``x (M, K)``, ``W (N, K)`` (master weights stay in their high-precision dtype)::

    forward        y  = fp8_gemm(q(x),   q(W),   sx,   sw)  + b        E4M3 x E4M3
    input grad     dx = fp8_gemm(q(dy),  q(W)ᵀ,  sdy,  swᵀ)            E5M2 x E4M3 ("hybrid"; E4M3 with "e4m3")
    weight grad    dW = fp8_gemm(q(dy)ᵀ, q(x)ᵀ,  sdyᵀ, sxᵀ)            contraction over the M tokens
    bias grad      db = Σ_tokens dy                                    high precision

``q(x)ᵀ`` and ``q(dy)ᵀ`` come from the fused cast-transpose (:func:`xkernels.fp8.cast_transpose`), so the
forward saves fp8 ``xᵀ`` (not ``x``) for the weight gradient. In eager mode the FP8 copy of ``W`` (and ``Wᵀ``) is
cached and only remade when the weight changes (its version counter moves: an optimizer step or a load), so gradient-accumulation
micro-batches reuse one copy per step. Scaling follows the :class:`~xkernels.fp8.FP8Recipe`; the delayed-scaling
amax history and scales are buffers (``fp8_amax_history`` (3, L), ``fp8_scale`` (3,), ``fp8_num_updates`` (3,),
rows = input / weight / grad_output) and so are saved and restored with ``state_dict``.

Under ``torch.compile(fullgraph=True)`` the layer traces without graph breaks (forward and backward): the kernels are
custom ops and the history update is the ``xkernels::fp8_push_amax`` op (declared buffer mutations); the weight is
then re-quantised in-graph on every call. Accumulation: the forward GEMM uses Hopper's fast FP8 accumulation, the
two backward GEMMs promote to fp32 every 128 of K.

On CPU the same quantisation runs through the PyTorch reference (real fp8 codes with the kernels' scales,
dequantised, fp32 matmul): an FP8 *emulation*, numerically what the GPU kernels compute up to fp32 summation order.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from xkernels._checks import check_float
from xkernels.fp8.formats import fp8_max
from xkernels.fp8.gemm import fp8_gemm
from xkernels.fp8.quant import amax_ref, quantize_for_gemm, scale_from_amax
from xkernels.fp8.recipe import ROLES, FP8Recipe, amax_group_active, push_amax_op, reduce_amax

log = logging.getLogger("xkernels.fp8")

INPUT, WEIGHT, GRAD = 0, 1, 2
BACKENDS = ("auto", "triton", "torch", "scaled_mm", "te")
ALIGN = 16  # in/out features must be multiples of 16: they are the K of one GEMM and the N of another
_FP8_BUFFERS = ("fp8_amax_history", "fp8_scale", "fp8_num_updates")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """Output dtype: the autocast dtype when autocast is on for x's device (as nn.Linear would give), else x's."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except TypeError:  # torch without the per-device-type API
        pass
    return x.dtype


class _FP8LinearFn(torch.autograd.Function):
    """The three GEMMs of FP8Linear. Operands arrive quantised (the module quantises x and W outside, where the
    delayed-scaling state lives); the backward quantises dy and, for delayed scaling, records its amax into the
    module's buffers through the ``xkernels::fp8_push_amax`` op (an in-graph mutation under torch.compile).

    Only tensors and plain constants cross ``apply`` (no module), so Dynamo traces it without a graph break.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, xq, sx, xtq, sxt, wq, sw, wtq, swt, history, scale, num_updates,
                out_dtype, backend, grad_dtype, grad_granularity, grad_use_history, grad_record, amax_algo, group):
        with torch.autocast(x2.device.type, enabled=False):
            # Forward: K = in_features (a few thousand) -- Hopper's fast accumulation is accurate enough here (as
            # torchao's default Float8Linear config does); both backward GEMMs below promote every 128 of K.
            out = fp8_gemm(xq, wq, sx, sw, out_dtype=out_dtype, bias=bias, backend=backend, fast_accum=True)
        ctx.save_for_backward(xtq, sxt, wtq, swt)
        # The history buffers are mutated (by later forwards and by this backward): kept on ctx, not saved, so
        # autograd's saved-tensor version check does not trip over a legitimate update.
        ctx.state = (history, scale, num_updates)
        ctx.cfg = (backend, grad_dtype, grad_granularity, grad_use_history, grad_record, amax_algo, group)
        ctx.x_dtype = x2.dtype
        ctx.w_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, dy):
        xtq, sxt, wtq, swt = ctx.saved_tensors
        history, scale, num_updates = ctx.state
        backend, grad_dtype, granularity, use_history, record, algo, group = ctx.cfg
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            # The first backward of a delayed recipe has no history yet: with an amax group its scale comes from
            # the world's amax (reduced before quantising), so every rank uses the scale one process would.
            first_amax = None
            if record and not use_history and amax_group_active(group):
                first_amax = reduce_amax(amax_ref(dy, "tensor"), group)
            first_scale = None if first_amax is None else scale_from_amax(first_amax, grad_dtype)
            dyq, sdy, dytq, sdyt, dy_amax = quantize_for_gemm(
                dy,
                grad_dtype,
                granularity,
                scale=scale[GRAD] if use_history else first_scale,
                transpose=need_dw,
                want_amax=record and first_amax is None,
            )
            # fast_accum=False: the weight gradient contracts over every token of the batch (K = tokens, 10^4..10^5)
            # and the input gradient over out_features; both promote to fp32 every 128 of K.
            if need_dx:
                dx = fp8_gemm(dyq, wtq, sdy, swt, out_dtype=ctx.x_dtype, backend=backend, fast_accum=False)
            if need_dw:
                dw = fp8_gemm(dytq, xtq, sdyt, sxt, out_dtype=ctx.w_dtype, backend=backend, fast_accum=False)
            if need_db:
                db = dy.float().sum(0).to(ctx.bias_dtype)
        if record:
            amax = first_amax if first_amax is not None else reduce_amax(dy_amax.float(), group)
            push_amax_op(history, scale, num_updates, amax, GRAD, fp8_max(grad_dtype), algo)
        return (dx, dw, db) + (None,) * 19


class FP8Linear(nn.Linear):
    """``nn.Linear`` with FP8 GEMMs (see the module docstring). ``in_features``/``out_features`` must be
    multiples of 16.

    Args:
        recipe: an :class:`FP8Recipe` (default: delayed scaling, hybrid format, history 128, ``max``).
        backend: ``"auto"`` (Triton kernels on CUDA, reference on CPU), ``"triton"``, ``"torch"`` (reference),
            ``"scaled_mm"`` (cuBLASLt GEMMs; tensor/row recipes) or ``"te"`` (Transformer Engine's ``te.Linear``
            with the same recipe; needs ``transformer_engine``).

    Attributes:
        weight_cache: reuse the FP8 weight until the weight's version counter or storage moves (default True).
            Turn it off when something rewrites the weight's values in place without moving its version counter:
            FSDP2's all-gather does exactly that (its unsharded parameter keeps one storage and version across
            steps), so under ``fully_shard`` a cached copy would be stale -- and, because whether the allocator
            hands back the same address differs between ranks, the delayed recipe's amax all-reduces would differ
            in number between ranks and hang. :func:`xkernels.fp8.fsdp.prepare_fp8_for_fsdp` turns it off.

    FP8 weight all-gather (:func:`xkernels.fp8.fsdp.enable_fp8_all_gather`, before ``fully_shard``): FSDP2 gathers
    E4M3 codes quantised with one scale from the weight's global amax, and the forward uses them as they are (the
    input gradient their transpose) -- bit for bit what quantising the gathered weight gives. Limits: the ``current``
    recipe only (``delayed`` takes the weight's scale from its amax history; ``row``/``block`` have no single
    scale), FSDP2 only, not ``backend="te"``, not under ``torch.compile`` (eager tensor subclasses), no FSDP2 CPU
    offload; call :func:`xkernels.fp8.fsdp.precompute_fp8_scales` after each optimizer step (one all-reduce for all
    weights; without it each weight all-reduces its own amax inside the all-gather hook).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: FP8Recipe | None = None,
        backend: str = "auto",
    ) -> None:
        recipe = FP8Recipe() if recipe is None else recipe
        if not isinstance(recipe, FP8Recipe):
            raise TypeError(f"recipe must be an FP8Recipe, got {type(recipe).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if in_features % ALIGN or out_features % ALIGN:
            raise ValueError(
                f"FP8Linear needs in_features and out_features to be multiples of {ALIGN} (FP8 GEMM alignment), "
                f"got {in_features} and {out_features}; keep this layer in nn.Linear"
            )
        if backend == "scaled_mm" and recipe.scaling == "block":
            raise ValueError("backend='scaled_mm' supports the delayed/current/row recipes, not 'block'")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.backend = backend
        self._init_fp8_state(self.weight.device)
        # Not registered as a submodule: it uses our Parameters, and state_dict keys stay those of nn.Linear.
        object.__setattr__(self, "_te", _make_te_linear(self) if backend == "te" else None)

    # --- state --------------------------------------------------------------------------------------------------

    def _init_fp8_state(self, device: Any) -> None:
        n = self.recipe.amax_history_len
        self.register_buffer("fp8_amax_history", torch.zeros(len(ROLES), n, device=device, dtype=torch.float32))
        self.register_buffer("fp8_scale", torch.ones(len(ROLES), device=device, dtype=torch.float32))
        self.register_buffer("fp8_num_updates", torch.zeros(len(ROLES), device=device, dtype=torch.int64))
        self._seen = [False] * len(ROLES)  # host mirror of fp8_num_updates > 0 (no device sync per step)
        self._w_cache: tuple | None = None
        if not hasattr(self, "weight_cache"):
            self.weight_cache = True

    def reset_fp8_state(self) -> None:
        """Forget the amax history and cached FP8 weight (e.g. after ``to_empty`` from the meta device)."""
        with torch.no_grad():
            self.fp8_amax_history.zero_()
            self.fp8_scale.fill_(1.0)
            self.fp8_num_updates.zero_()
        self._seen = [False] * len(ROLES)
        self._w_cache = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "fp8_scale"):
            self.reset_fp8_state()

    def _apply(self, fn, *args, **kwargs):
        was_meta = getattr(self, "fp8_scale", None) is not None and self.fp8_scale.is_meta
        super()._apply(fn, *args, **kwargs)
        # Keep the scaling state in fp32 through model.to(bfloat16) and friends.
        for name in ("fp8_amax_history", "fp8_scale"):
            buf = getattr(self, name, None)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        self._w_cache = None
        if was_meta and not self.fp8_scale.is_meta:  # to_empty() from the meta device: state is uninitialised
            self.reset_fp8_state()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        absent = [prefix + name for name in _FP8_BUFFERS if prefix + name not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in absent:  # a plain nn.Linear checkpoint: keep fresh FP8 state
            if key in missing_keys:
                missing_keys.remove(key)
        self._seen = [bool(c) for c in (self.fp8_num_updates > 0).tolist()]
        self._w_cache = None

    @property
    def _delayed(self) -> bool:
        return self.recipe.scaling == "delayed"

    @property
    def _gemm_backend(self) -> str:
        return "auto" if self.backend == "te" else self.backend

    def _first_amax(self, role: int, t: torch.Tensor) -> torch.Tensor | None:
        """The world's amax of ``t`` for the first quantisation of ``role`` under delayed scaling with an amax
        group (the history is empty, so the scale would otherwise come from this rank's amax alone and differ
        between ranks on step 0); None otherwise."""
        if not self._delayed or self._seen[role] or not amax_group_active(self.recipe.reduce_amax_group):
            return None
        return reduce_amax(amax_ref(t, "tensor"), self.recipe.reduce_amax_group)

    def _delayed_scale(self, role: int) -> torch.Tensor | None:
        """The history's scale for ``role``, or None (current scaling) off delayed or before its first amax."""
        if not self._delayed or not self._seen[role]:
            return None
        return self.fp8_scale[role]

    def _record(self, role: int, amax: torch.Tensor, reduced: bool = False) -> None:
        """Push ``amax`` into the history of ``role`` (in-graph under torch.compile: ``xkernels::fp8_push_amax``),
        all-reduced over the recipe's amax group first unless ``reduced``."""
        if not reduced:
            amax = reduce_amax(amax.detach().float(), self.recipe.reduce_amax_group)
        fmax = fp8_max(self.recipe.dtype(ROLES[role]))
        push_amax_op(self.fp8_amax_history, self.fp8_scale, self.fp8_num_updates, amax, role, fmax,
                     self.recipe.amax_compute_algo)
        self._seen[role] = True

    def _weight_fp8(self, weight: torch.Tensor):
        """``(W_fp8, sw, Wᵀ_fp8, swᵀ)``; in eager mode remade only when the weight's version or storage changes.

        Under torch.compile the weight is quantised in-graph on every call (as torchao does): the cache key
        (version counter, data pointer) is not traceable, and the cast is fused into the compiled graph. With
        delayed scaling a weight amax is then pushed per training forward instead of per weight update. The same
        holds with ``weight_cache = False`` (set for FSDP2, whose all-gather rewrites the unsharded weight in place
        without moving its version counter: the key cannot see the new values there).
        """
        if getattr(weight, "_fp8_gathered", False):
            # FSDP2 all-gathered FP8 codes quantised with the global-amax scale (xkernels.fp8.fsdp): used as they
            # are -- the same codes quantising the gathered high-precision weight would give -- and their transpose
            # (tensor-wise: the same codes, the same scale) for the input gradient.
            wq, sw = weight._data, weight._scale.reshape(())
            return wq, sw, wq.t().contiguous(), sw.clone()
        cacheable = self.weight_cache and not torch.compiler.is_compiling()
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device) if cacheable else None
        if key is not None and self._w_cache is not None and self._w_cache[0] == key:
            return self._w_cache[1]
        w_dtype = self.recipe.dtype("weight")
        first = self._first_amax(WEIGHT, weight.detach()) if self.training else None
        wq, sw, wtq, swt, w_amax = quantize_for_gemm(
            weight.detach(),
            w_dtype,
            self.recipe.granularity("weight"),
            scale=self._delayed_scale(WEIGHT) if first is None else scale_from_amax(first, w_dtype),
            transpose=True,
            want_amax=self._delayed and first is None,
        )
        if self._delayed and self.training:
            self._record(WEIGHT, w_amax if first is None else first, reduced=first is not None)
        if key is not None:
            self._w_cache = (key, (wq, sw, wtq, swt))
        return wq, sw, wtq, swt

    # --- forward ------------------------------------------------------------------------------------------------

    # torch.compile traces this forward (and the backward) without graph breaks: the kernels are custom ops
    # (xkernels::fp8_cast_transpose, xkernels::fp8_gemm), the delayed-scaling history is updated by
    # xkernels::fp8_push_amax (declared buffer mutations). The only Python-side state is ``_seen`` (has a role
    # got its first amax yet): Dynamo guards on it, so the first training step compiles once more (step 0 scales
    # from the current amax, later steps from the history).
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._te is not None:
            return _te_forward(self, x)
        check_float("x", x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has last dim {x.shape[-1]}, expected in_features = {self.in_features}")
        out_dtype = _autocast_dtype(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=out_dtype)
        recipe = self.recipe
        need_wgrad = torch.is_grad_enabled() and self.weight.requires_grad  # else skip the transposed copy of x
        with torch.autocast(x2.device.type, enabled=False):
            first = self._first_amax(INPUT, x2.detach()) if self.training else None
            xq, sx, xtq, sxt, x_amax = quantize_for_gemm(
                x2.detach(),
                recipe.dtype("input"),
                recipe.granularity("input"),
                scale=self._delayed_scale(INPUT) if first is None else scale_from_amax(first, recipe.dtype("input")),
                transpose=need_wgrad,
                want_amax=self._delayed and first is None,
            )
            wq, sw, wtq, swt = self._weight_fp8(self.weight)
        if self._delayed and self.training:
            self._record(INPUT, x_amax if first is None else first, reduced=first is not None)
        # The gradient's scale: from its history once a backward has recorded one. The backward itself cannot
        # flip this host-side flag under torch.compile, so the forward does, assuming its backward runs (a
        # training forward whose backward never runs leaves the gradient history at its initial scale 1).
        grad_use_history = self._delayed and self._seen[GRAD]
        grad_record = self._delayed and torch.is_grad_enabled()
        if grad_record:
            self._seen[GRAD] = True
        # Tensorwise recipes hand back one scale tensor for an operand and its transpose; Dynamo cannot trace
        # autograd.Function.apply with a tensor passed twice, so the transpose gets its own (scalar) copy.
        sxt = sxt.clone() if sxt is sx else sxt
        swt = swt.clone() if swt is sw else swt
        out = _FP8LinearFn.apply(
            x2, self.weight, self.bias, xq, sx, xtq, sxt, wq, sw, wtq, swt,
            self.fp8_amax_history, self.fp8_scale, self.fp8_num_updates,
            out_dtype, self._gemm_backend, recipe.dtype("grad_output"), recipe.granularity("grad_output"),
            grad_use_history, grad_record, recipe.amax_compute_algo, recipe.reduce_amax_group,
        )
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        r = self.recipe
        return f"{super().extra_repr()}, recipe={r.scaling}/{r.format}, backend={self.backend}"

    # --- conversion ---------------------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe | None = None, backend: str = "auto") -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameters (same Parameter objects: optimizer state stays valid)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if backend == "te":
            new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                      device=linear.weight.device, dtype=linear.weight.dtype, recipe=recipe, backend=backend)
            with torch.no_grad():
                new.weight.copy_(linear.weight)
                if linear.bias is not None:
                    new.bias.copy_(linear.bias)
            return new
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                  recipe=recipe, backend=backend)
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_fp8_state(linear.weight.device)
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (for export); FP8 state is dropped."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin


# --- model conversion -----------------------------------------------------------------------------------------------

DEFAULT_SKIP = ("lm_head", "*embed*")


def _skip_reason(name: str, module: nn.Linear, skip, tied: set[int]) -> str | None:
    if callable(skip):
        verdict = skip(name, module)
        if verdict:
            return verdict if isinstance(verdict, str) else "excluded by the skip callable"
    else:
        leaf = name.rsplit(".", 1)[-1]
        for pattern in skip:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(leaf, pattern):
                return f"matches skip pattern {pattern!r}"
    if id(module.weight) in tied:
        return "weight is tied to an embedding (kept in high precision with it)"
    if module.in_features % ALIGN or module.out_features % ALIGN:
        return (
            f"in_features={module.in_features}, out_features={module.out_features} are not multiples of {ALIGN} "
            "(FP8 GEMM alignment)"
        )
    return None


def convert_to_fp8(
    model: nn.Module,
    recipe: FP8Recipe | None = None,
    skip: Iterable[str] | Callable[[str, nn.Module], bool | str] = DEFAULT_SKIP,
    backend: str = "auto",
) -> nn.Module:
    """Swap eligible ``nn.Linear`` modules of ``model`` for :class:`FP8Linear` in place; returns ``model``.

    Kept in high precision, each with a logged reason (logger ``xkernels.fp8``, INFO): names matching ``skip``
    (fnmatch patterns tested against the dotted name and its last part; default: the LM head ``lm_head`` and
    anything named like an embedding), Linears whose weight is tied to an ``nn.Embedding``, and Linears whose
    dims are not multiples of 16. ``skip`` may instead be a callable ``(name, module) -> bool | reason``.
    Parameters are shared, not copied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    recipe = FP8Recipe() if recipe is None else recipe
    if isinstance(skip, str):
        skip = (skip,)
    if not callable(skip):
        skip = tuple(skip)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    converted = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, FP8Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            reason = _skip_reason(name, child, skip, tied)
            if reason is not None:
                log.info("convert_to_fp8: keeping %s in high precision: %s", name, reason)
                continue
            setattr(parent, child_name, FP8Linear.from_linear(child, recipe, backend))
            converted += 1
    log.info("convert_to_fp8: %d nn.Linear -> FP8Linear (recipe %s/%s)", converted, recipe.scaling, recipe.format)
    return model


def convert_from_fp8(model: nn.Module) -> nn.Module:
    """Swap every :class:`FP8Linear` back to ``nn.Linear`` (sharing parameters), in place; returns ``model``."""
    if isinstance(model, FP8Linear):
        return model.to_linear()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FP8Linear):
                setattr(parent, child_name, child.to_linear())
    return model


# --- Transformer Engine backend (optional) --------------------------------------------------------------------------


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA/TE install raising at import
        return False
    return True


def _make_te_linear(mod: FP8Linear):
    """A ``te.Linear`` using ``mod``'s parameters (TE's own are replaced by ours, so state_dict keys stay)."""
    if not te_available():
        raise ImportError(
            "FP8Linear(backend='te') needs Transformer Engine (pip install 'transformer-engine[pytorch]'), "
            "which does not import here"
        )
    if mod.recipe.scaling == "row":
        raise ValueError("Transformer Engine has no row-wise FP8 recipe; use backend='auto' for scaling='row'")
    import transformer_engine.pytorch as te

    lin = te.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                    params_dtype=mod.weight.dtype, device=mod.weight.device)
    lin.weight = mod.weight
    if mod.bias is not None:
        lin.bias = mod.bias
    return lin


def te_recipe(recipe: FP8Recipe):
    """The Transformer Engine recipe object matching ``recipe``."""
    from transformer_engine.common import recipe as ter

    fmt = ter.Format.HYBRID if recipe.format == "hybrid" else ter.Format.E4M3
    if recipe.scaling == "delayed":
        return ter.DelayedScaling(
            fp8_format=fmt,
            amax_history_len=recipe.amax_history_len,
            amax_compute_algo=recipe.amax_compute_algo,
            reduce_amax=recipe.reduce_amax_group is not None,
        )
    if recipe.scaling == "current" and hasattr(ter, "Float8CurrentScaling"):
        return ter.Float8CurrentScaling(fp8_format=fmt)
    if recipe.scaling == "block" and hasattr(ter, "Float8BlockScaling"):
        return ter.Float8BlockScaling(fp8_format=fmt)
    raise ValueError(f"this Transformer Engine has no recipe for scaling={recipe.scaling!r}")


def _te_forward(mod: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    import transformer_engine.pytorch as te

    group = mod.recipe.reduce_amax_group
    with te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(mod.recipe), fp8_group=None if group in (None, True) else group):
        return mod._te(x)
