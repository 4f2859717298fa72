"""Cross-entropy on ready logits, and linear + cross-entropy without materialising the ``(tokens, vocab)``
logits (Liger-style chunking), with the options trainers expect (Liger-Kernel's keyword names).

Math, per token ``i`` with raw logits ``l_i`` (V,) (``l_i = W h_i + b`` for the linear op), target ``t_i``,
``s = logit_scale`` (muP's ``mup_output_scale / width_mult``; 1 for :func:`cross_entropy`), optional soft cap
``c`` (Gemma 2), class weights ``w`` (V,) (1 when absent), label smoothing ``eps`` and z-loss scale ``lam``::

    u_i    = s * l_i                                    # scaled logits
    z_i    = c * tanh(u_i / c)   (or u_i without a cap)  # the logits the softmax sees
    lse_i  = log(sum_v exp(z_iv))                       # fp32
    ce_i   = (1 - eps) w[t_i] (lse_i - z_i[t_i]) + (eps / V) sum_v w[v] (lse_i - z_iv)
    zl_i   = lam * lse_i^2                              # z-loss (PaLM)
    loss_i = ce_i + zl_i                                # 0 where t_i == ignore_index

``ce_i`` is exactly ``F.cross_entropy(z, t, weight=w, label_smoothing=eps, reduction="none")``.  Reductions:
``"sum"`` sums; ``"mean"`` divides the summed ``ce`` by the sum of the target weights ``sum_i w[t_i]`` over
non-ignored tokens (the token count without class weights; torch's definition, smoothing term included) and the
summed z-loss by the count of non-ignored tokens (the z-loss is a regulariser on every token, not a class-weighted
term); when that denominator is 0 (every target ignored) the mean is 0 with zero gradients (torch gives NaN).
``"none"`` returns ``loss_i`` in the targets' shape.  Losses are fp32 whatever the input dtype.

A target outside ``[0, V)`` that is not ``ignore_index`` makes that token's loss and the gradient of its logits
NaN (so a mean or sum is NaN): loud, with no host sync.  :func:`xkernels.check_inputs` instead raises a
``ValueError`` before any work (one host sync per call).

Gradient with respect to the raw logits, ``p = softmax(z_i)``, ``B = (eps / V) sum_v w[v]``, ``a = (1 - eps) w[t_i]``,
``g_ce`` / ``g_z`` the reduction's fp32 factors (``1 / sum w[t]`` and ``1 / n`` for "mean", 1 for "sum", the
incoming per-token gradient for "none")::

    dz_i = g_ce (p (a + B) - a onehot(t_i) - (eps / V) w) + g_z 2 lam lse_i p
    dl_i = s * dz_i * (1 - (z_i / c)^2)     (the last factor only with a cap)

The factors are applied in fp32 before ``dl`` is rounded to the input dtype (a bf16-rounded ``1/n`` would bias
every gradient by up to 0.2%, always in one direction); the upstream gradient of a scalar loss multiplies the stored
gradients in fp32 too.  For the linear op ``dh_i = dl_i W``, ``dW = sum_i dl_i^T h_i``, ``db = sum_i dl_i``.

Linear op: the tokens are processed in chunks of ``C`` rows: for each chunk the logits ``(C, V)`` are formed by
one matmul, a row kernel computes the loss and overwrites the logits with ``dl`` in place (a Triton kernel on GPU
/ under the interpreter, PyTorch on CPU), then ``dh`` for the chunk and the chunk's contribution to ``dW`` (and
``db``; accumulated in fp32) are formed by two more matmuls.  For the scalar reductions all of this runs in the
forward pass and the backward only scales the stored gradients by ``grad_output``; so peak extra memory is one
logits chunk plus ``dW`` and ``dh``, with every option.  For ``"none"`` the per-token ``grad_output`` is only
known in the backward, which therefore recomputes the chunks (one more pass of matmuls).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from xkernels._checks import check_float, check_nonempty, check_same_device, check_tensor, checking_inputs
from xkernels._compat import ADDMM_OUT_DTYPE
from xkernels.dispatch import compiling, launch_on, triton_available, use_triton

REDUCTIONS = ("mean", "sum", "none")
# vocab rows per slab when a half-precision dW product is added into the fp32 accumulator: big enough
# for an efficient GEMM (16384 x H x chunk), small enough that the temporary is ~1/8 of a 129k-row dW
_DW_SLAB = 16384
# a chunk holds at least this many logits (see default_chunk_size)
_MIN_CHUNK_LOGITS = 1 << 22
# elements per slab when a stored half-precision gradient is multiplied by grad_output in fp32 (eager):
# the fp32 temporary stays 64 MiB instead of a full fp32 copy of dW
_SCALE_SLAB = 1 << 24
# rows per slice of the torch path's soft-cap gradient (its (rows, V) fp32 derivative is a second temporary)
_CAP_ROWS = 256


class CEOptions(NamedTuple):
    """The scalar options of one call (``softcap`` 0.0 = no cap), in the order the kernels take them."""

    logit_scale: float = 1.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float = 0.0
    lse_square_scale: float = 0.0


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (unfused: materialises the logits; tests and benchmarks compare against it)
# ----------------------------------------------------------------------------------------------------


def cross_entropy_ref(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    weight: torch.Tensor | None = None,
    return_z_loss: bool = False,
    logit_scale: float = 1.0,
):
    """The module docstring's loss, computed the plain way in fp32 (float64 for float64 inputs), differentiable
    by autograd.  ``logits`` ``(..., V)``, ``target`` ``(...)``.  The CE part is ``F.cross_entropy`` itself (so
    weights, smoothing and their "mean" follow torch exactly), except: "mean" over zero non-ignored targets is 0
    (not NaN), and an out-of-range target gives a NaN loss for its token (torch raises or reads out of bounds)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab).to(acc) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab))
    safe_t = torch.where(valid & ~bad, t, torch.full_like(t, ignore_index))
    w = weight.to(acc) if weight is not None else None
    ce = F.cross_entropy(z, safe_t, weight=w, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    nan = torch.full_like(ce, float("nan"))
    ce = torch.where(bad, nan, ce)
    lse = torch.logsumexp(z, dim=-1)
    zl = torch.where(valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
    zl = torch.where(bad, nan, zl)
    if reduction == "none":
        loss, z_loss = (ce + zl).reshape(target.shape), zl.reshape(target.shape)
    elif reduction == "sum":
        loss, z_loss = ce.sum() + zl.sum(), zl.sum()
    else:
        wt = w.gather(0, torch.where(valid, t, 0).clamp(0, vocab - 1)) if w is not None else torch.ones_like(ce)
        den_ce = torch.where(valid, wt, torch.zeros_like(wt)).sum()
        den_ce = torch.where(den_ce == 0, torch.ones_like(den_ce), den_ce)
        den_z = valid.sum().clamp_min(1).to(acc)
        z_loss = zl.sum() / den_z
        loss = ce.sum() / den_ce + z_loss
    return (loss, z_loss) if return_z_loss else loss


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    *,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
):
    """:func:`cross_entropy_ref` of ``hidden @ weight.T + bias`` (formed in fp32, or float64 for float64 inputs)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.reshape(-1, hidden.shape[-1]).to(acc)
    logits = h @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    out = cross_entropy_ref(
        logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        softcap=softcap, lse_square_scale=lse_square_scale + z_loss, weight=ce_weight, return_z_loss=True,
        logit_scale=logit_scale,
    )  # fmt: skip
    if reduction == "none":
        out = (out[0].reshape(targets.shape), out[1].reshape(targets.shape))
    return out if return_z_loss else out[0]


def unfused_cross_entropy(hidden, weight, targets, logit_scale=1.0, ignore_index=-100, reduction="mean"):
    """The baseline everybody writes: ``F.cross_entropy((hidden @ weight.T) * logit_scale, targets)``
    (full logits in the input dtype).  Used as the memory/time comparison point."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()) * logit_scale
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def _ce_chunk_torch(logits, targets, class_w, scales, opts, compute_grad, row_grad=None):
    """PyTorch twin of :func:`_ce_chunk_kernel`: per-row ``(ce, z-loss)`` of one chunk (fp32) and, when
    ``compute_grad``, ``dl`` written into ``logits`` in place, times the fp32 factors ``scales = (g_ce, g_z)``
    (and ``row_grad`` per row when given).

    The chunk is scratch (fp32 logits are modified even without ``compute_grad``); the log-sum-exp is done in
    place (max, subtract, exp, sum) so at most one fp32 copy of the chunk exists (two with a soft cap and a
    gradient: the cap's derivative is kept, so then the rows go in slices of ``_CAP_ROWS``)."""
    s, ignore_index, eps, cap, lam = opts
    n_rows = logits.shape[0]
    if cap and compute_grad and n_rows > _CAP_ROWS:
        parts = [
            _ce_chunk_torch(
                logits[i : i + _CAP_ROWS], targets[i : i + _CAP_ROWS], class_w, scales, opts, True,
                row_grad[i : i + _CAP_ROWS] if row_grad is not None else None,
            )
            for i in range(0, n_rows, _CAP_ROWS)
        ]  # fmt: skip
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n_cols = logits.shape[1]
    z = logits if logits.dtype == torch.float32 else logits.float()
    if s != 1.0:  # (x * 1.0 == x exactly: skipping it saves a pass over the chunk, numerics unchanged)
        z = z.mul_(s)
    cap_grad = None
    if cap:
        z = z.div_(cap).tanh_()
        if compute_grad:
            cap_grad = z.square().neg_().add_(1.0)  # d(c tanh(u / c)) / du = 1 - tanh^2 (one chunk-sized temporary)
        z = z.mul_(cap)
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= n_cols))
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).clamp_(0, n_cols - 1)
    z_t = z.gather(1, safe_t[:, None]).squeeze(1)
    w_t = class_w.gather(0, safe_t) if class_w is not None else torch.ones_like(z_t)
    a = (1.0 - eps) * w_t
    if eps:
        smooth_dot = z @ class_w if class_w is not None else z.sum(dim=-1)  # sum_v w[v] z_v
        w_sum = class_w.sum() if class_w is not None else torch.tensor(float(n_cols), device=z.device)
    m = z.amax(dim=-1)
    e = z.sub_(m[:, None]).exp_()  # exp(z - max), in z's storage
    total = e.sum(dim=-1)
    lse = m + torch.log(total)
    ce = a * (lse - z_t)
    if eps:
        ce = ce + (eps / n_cols) * (w_sum * lse - smooth_dot)
    zl = lam * lse * lse
    zero, nan = torch.zeros_like(ce), torch.full_like(ce, float("nan"))
    ce = torch.where(bad, nan, torch.where(valid, ce, zero))
    zl = torch.where(bad, nan, torch.where(valid, zl, zero))
    if compute_grad:
        # p (g_ce (a + B) + g_z 2 lam lse) - g_ce a onehot(t) - g_ce (eps / V) w, then x cap' x s:
        # one pass scales exp(z - max) by the softmax coefficient / sum, then the target and smoothing terms
        g = valid.float() if row_grad is None else valid.float() * row_grad.float()
        g_ce, g_z = g * scales[0], g * scales[1]
        coef_p = g_ce * (a + (eps / n_cols) * w_sum if eps else a) + g_z * (2.0 * lam) * lse
        p = e.mul_((coef_p / total)[:, None])
        p.scatter_add_(1, safe_t[:, None], -(g_ce * a)[:, None])
        if eps:
            smooth = (g_ce * (eps / n_cols))[:, None]
            if class_w is not None:
                p.addcmul_(smooth, class_w[None, :], value=-1.0)  # broadcast in place: no (C, V) temporary
            else:
                p.sub_(smooth)
        if cap_grad is not None:
            p.mul_(cap_grad)
        if s != 1.0:
            p.mul_(s)
        p.masked_fill_(bad[:, None], float("nan"))
        if p.data_ptr() != logits.data_ptr():
            logits.copy_(p)
    return ce, zl


# ----------------------------------------------------------------------------------------------------
# Triton kernel: loss and in-place logits gradient of one chunk
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap(u, cap):
        """``cap * tanh(u / cap)`` with tanh as ``1 - 2 / (exp(2x) + 1)`` (exact limits +-1 when exp over/underflows).
        Approximate divides (``tl.fdiv``, ~2 ulp): the IEEE ones' slow-path calls spilled on sm_90a."""
        return cap * (1.0 - tl.fdiv(2.0, tl.exp(2.0 * tl.fdiv(u, cap)) + 1.0))

    @triton.jit
    def _ce_chunk_kernel(
        LOGITS,  # (C, V) raw logits of the chunk, last dim contiguous; overwritten with dl when COMPUTE_GRAD
        TARGETS,  # (C,) int64 targets
        CLASS_W,  # (V,) fp32 class weights (read only when HAS_WEIGHT)
        LOSS,  # (C,) fp32 per-row cross-entropy part (output)
        ZLOSS,  # (C,) fp32 per-row z-loss part (output)
        SCALES,  # (2,) fp32 gradient factors (g_ce, g_z) of the reduction (read only when COMPUTE_GRAD)
        ROW_GRAD,  # (C,) per-row incoming gradient (read only when HAS_ROW_GRAD)
        stride_l,  # row stride of LOGITS in elements
        n_cols,  # V
        ignore_index,
        logit_scale,
        label_smoothing,
        softcap,
        lse_square_scale,
        COMPUTE_GRAD: tl.constexpr,
        HAS_ROW_GRAD: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        SMOOTH: tl.constexpr,  # label_smoothing > 0
        SOFTCAP: tl.constexpr,  # softcap given
        BLOCK: tl.constexpr,
    ):
        """One program per row.  Pass 1: online max / sum-exp over ``z = cap(s * l)`` in fp32 -> ``lse``
        (and ``sum_v w[v] z_v``, ``sum_v w[v]`` for smoothing); the module docstring's ``ce`` and ``zl``.
        Pass 2 (COMPUTE_GRAD): overwrite the row with the module docstring's ``dl`` (times ``ROW_GRAD[row]``),
        0 for ignored rows.

        Ordering: the target logit ``z[t]`` is read FIRST, before pass 1, and a barrier separates pass 1
        from pass 2.  Pass 2 overwrites the row in place, and the threads of one program run ahead of
        each other: a read of ``z[t]`` after pass 1 could see another warp's ``dl`` already stored there.
        A target outside ``[0, V)`` (not ignore_index) is clamped for the loads (no out-of-bounds access) and
        its row's loss and gradient are NaN."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l
        t = tl.load(TARGETS + row)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n_cols))
        safe_t = tl.minimum(tl.maximum(tl.where(valid, t, 0), 0), n_cols - 1)
        z_t = tl.load(ptr + safe_t).to(tl.float32) * logit_scale
        if SOFTCAP:
            z_t = _softcap(z_t, softcap)

        m = tl.full([], float("-inf"), tl.float32)
        d = tl.full([], 0.0, tl.float32)
        s_dot = tl.full([], 0.0, tl.float32)  # sum_v w[v] z_v (SMOOTH)
        w_sum = tl.full([], 0.0, tl.float32)  # sum_v w[v] (SMOOTH and HAS_WEIGHT)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            # load with other=0 then mask in fp32 (-inf as a bf16 `other` is unreliable in the interpreter)
            z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            if SOFTCAP:
                z = _softcap(z, softcap)
            if SMOOTH:
                if HAS_WEIGHT:
                    wc = tl.load(CLASS_W + cols, mask=mask, other=0.0)
                    s_dot += tl.sum(tl.where(mask, z * wc, 0.0), axis=0)
                    w_sum += tl.sum(wc, axis=0)
                else:
                    s_dot += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        w_t = 1.0
        if HAS_WEIGHT:
            w_t = tl.load(CLASS_W + safe_t)
        a = (1.0 - label_smoothing) * w_t
        ce = a * (lse - z_t)
        b_sum = 0.0
        if SMOOTH:
            if not HAS_WEIGHT:
                w_sum = n_cols * 1.0
            b_sum = label_smoothing / n_cols * w_sum
            ce += label_smoothing / n_cols * (w_sum * lse - s_dot)
        zl = lse_square_scale * lse * lse
        ce = tl.where(valid, ce, 0.0)
        zl = tl.where(valid, zl, 0.0)
        tl.store(LOSS + row, tl.where(bad, float("nan"), ce))
        tl.store(ZLOSS + row, tl.where(bad, float("nan"), zl))

        if COMPUTE_GRAD:
            g = tl.where(valid, 1.0, 0.0)
            if HAS_ROW_GRAD:
                g = g * tl.load(ROW_GRAD + row).to(tl.float32)
            g_ce = g * tl.load(SCALES)
            g_z = g * tl.load(SCALES + 1)
            coef_p = g_ce * (a + b_sum) + g_z * 2.0 * lse_square_scale * lse
            coef_t = g_ce * a
            coef_s = g_ce * label_smoothing / n_cols
            out_scale = tl.where(bad, float("nan"), logit_scale)
            tl.debug_barrier()  # every thread has read the row (and z[t]) before any overwrites it
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
                if SOFTCAP:
                    z = _softcap(z, softcap)
                dz = tl.exp(z - lse) * coef_p - tl.where(cols == safe_t, coef_t, 0.0)
                if SMOOTH:
                    if HAS_WEIGHT:
                        dz -= coef_s * tl.load(CLASS_W + cols, mask=mask, other=0.0)
                    else:
                        dz -= coef_s
                if SOFTCAP:
                    zc = tl.fdiv(z, softcap)
                    dz = dz * (1.0 - zc * zc)
                tl.store(ptr + cols, (dz * out_scale).to(LOGITS.dtype.element_ty), mask=mask)

    def _launch_config(n_cols: int, dtype: torch.dtype, heavy: bool) -> tuple[int, int]:
        """``(BLOCK, num_warps)``: 4096 elements per block (16 per thread at 8 warps), fewer for tiny vocabularies.
        fp32 logits with class weights or a soft cap take 1024 at 4 warps: at 4096 (8 warps) that variant spilled
        16 B on sm_90a with Triton 3.9, at 2048 still 8 B with Triton 3.6
        (``python -m benchmarks.aot --arch sm_90a --kernels _ce_chunk``)."""
        if heavy and dtype == torch.float32:
            return min(1024, triton.next_power_of_2(n_cols)), 4
        block = min(4096, triton.next_power_of_2(n_cols))
        return block, 8 if block >= 4096 else 4

    def _ce_chunk_triton(logits, targets, class_w, scales, opts, compute_grad, row_grad=None):
        n_rows, n_cols = logits.shape
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        zl = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        s, ignore_index, eps, cap, lam = opts
        block, num_warps = _launch_config(n_cols, logits.dtype, class_w is not None or bool(cap))
        with launch_on(logits):  # the launch goes to logits's GPU, not the current one
            _ce_chunk_kernel[(n_rows,)](
                logits,
                targets,
                class_w if class_w is not None else loss,
                loss,
                zl,
                scales if scales is not None else loss,
                row_grad if row_grad is not None else loss,
                logits.stride(0),
                n_cols,
                ignore_index,
                float(s),
                float(eps),
                float(cap) if cap else 1.0,
                float(lam),
                COMPUTE_GRAD=compute_grad,
                HAS_ROW_GRAD=row_grad is not None,
                HAS_WEIGHT=class_w is not None,
                SMOOTH=eps > 0,
                SOFTCAP=bool(cap),
                BLOCK=block,
                num_warps=num_warps,
            )
        return loss, zl


# ----------------------------------------------------------------------------------------------------
# Shared pieces: reduction factors, fp32 gradient scaling
# ----------------------------------------------------------------------------------------------------


def _step(use_kernel: bool):
    return _ce_chunk_triton if use_kernel else _ce_chunk_torch


def _reduction_scales(t1, class_w, ignore_index, reduction, vocab):
    """fp32 ``(g_ce, g_z)`` on the device (no sync): ``1 / sum_i w[t_i]`` and ``1 / n`` over non-ignored
    tokens for "mean" (a zero denominator counts as 1: the numerator is then 0 too), ones otherwise."""
    if reduction != "mean":
        return torch.ones(2, dtype=torch.float32, device=t1.device)
    valid = t1 != ignore_index
    n = valid.sum().to(torch.float32)
    if class_w is not None:
        w_t = class_w.gather(0, torch.where(valid, t1, 0).clamp(0, vocab - 1))
        den_ce = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
    else:
        den_ce = n
    den = torch.stack([den_ce, n])
    return 1.0 / torch.where(den == 0, torch.ones_like(den), den)


def _reduce(ce, zl, scales, reduction):
    """(loss, z_loss) of the per-row parts: "none" per row, else the scaled sums (all fp32)."""
    if reduction == "none":
        return ce + zl, zl
    z_total = zl.sum() * scales[1]
    return ce.sum() * scales[0] + z_total, z_total


def _times_grad(x, grad_out, inplace=False):
    """``x * grad_output`` in fp32, rounded once to ``x``'s dtype: a new tensor (the graph may run again), or
    ``x`` itself scaled in place when ``inplace`` (eager only).

    A half-precision ``grad_output`` (or one rounded to ``x``'s dtype by type promotion) would bias every
    gradient by up to 2^-9; eager works in slabs so the fp32 temporary stays small, under torch.compile the
    one expression fuses into a single kernel."""
    if x is None:
        return None
    g = grad_out.to(torch.float32)
    if inplace and x.dtype == torch.float32:
        return x.mul_(g)
    if (x.dtype == torch.float32 or compiling()) and not inplace:
        return (x.float() * g).to(x.dtype)
    out = x if inplace else torch.empty_like(x)
    flat_x, flat_o = x.reshape(-1), out.reshape(-1)
    for i in range(0, flat_x.numel(), _SCALE_SLAB):
        flat_o[i : i + _SCALE_SLAB].copy_(flat_x[i : i + _SCALE_SLAB].float() * g)
    return out


# ----------------------------------------------------------------------------------------------------
# Cross-entropy on ready logits
# ----------------------------------------------------------------------------------------------------


def _ce_forward(logits, t1, class_w, opts, reduction, compute_grad, inplace, use_kernel):
    """``(loss, z_loss, dlogits)`` over 2-D ``logits (N, V)``: fp32 losses (per row for "none") and, for the
    scalar reductions when ``compute_grad``, the gradient for ``grad_output = 1`` in the logits' dtype --
    written into ``logits`` itself when ``inplace`` (else into a copy).  "none" forms no gradient here."""
    scales = _reduction_scales(t1, class_w, opts.ignore_index, reduction, logits.shape[1])
    grad = compute_grad and reduction != "none"
    # the torch step uses its input as scratch; the kernel writes only when it forms the gradient
    buf = logits if (inplace and grad) or (use_kernel and not grad) else logits.clone()
    ce, zl = _step(use_kernel)(buf, t1, class_w, scales, opts, grad)
    if inplace and grad and use_kernel:
        torch.autograd.graph.increment_version(logits)  # a saved-tensor check elsewhere now sees the overwrite
    loss, z_loss = _reduce(ce, zl, scales, reduction)
    return loss, z_loss, (buf if grad else None)


def _ce_backward_none(logits, t1, class_w, grad, opts, use_kernel):
    """dlogits for reduction "none": the rows recomputed with the per-row ``grad`` folded in (fresh buffer)."""
    buf = logits.clone()
    ones = torch.ones(2, dtype=torch.float32, device=logits.device)
    _step(use_kernel)(buf, t1, class_w, ones, opts, True, grad.reshape(-1).contiguous())
    return buf


class _CrossEntropyFunction(torch.autograd.Function):
    """Over 2-D ``logits (N, V)`` and 1-D ``t1 (N,)``; returns the fp32 ``(loss, z_loss)`` (z_loss not
    differentiable)."""

    @staticmethod
    def forward(ctx, logits, t1, class_w, opts, reduction, inplace, use_kernel):
        loss, z_loss, dlogits = _ce_forward(logits, t1, class_w, opts, reduction, True, inplace, use_kernel)
        ctx.args = (opts, reduction, use_kernel)
        ctx.inplace = inplace and dlogits is not None and dlogits.data_ptr() == logits.data_ptr()
        ctx.save_for_backward(*((logits, t1, class_w) if reduction == "none" else (dlogits,)))
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        opts, reduction, use_kernel = ctx.args
        if reduction == "none":
            logits, t1, class_w = ctx.saved_tensors
            grad = _ce_backward_none(logits, t1, class_w, grad_out, opts, use_kernel)
            return grad, None, None, None, None, None, None
        (dlogits,) = ctx.saved_tensors
        # in place: the gradient is scaled in the logits' storage (no second (N, V) buffer); that bumps its version,
        # so a second backward fails autograd's saved-tensor check instead of scaling twice
        return _times_grad(dlogits, grad_out, ctx.inplace), None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy driver and autograd
# ----------------------------------------------------------------------------------------------------


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: ``next_pow2(hidden)`` clamped to [256, 4096], raised so that a chunk holds at least
    ``_MIN_CHUNK_LOGITS`` logits (4M: 16 MiB in fp32) and at most ``n_tokens``.

    Why: every chunk adds its ``(V, H)`` weight-gradient product into the fp32 ``dW`` buffer, i.e. about
    three passes over a ``(V, H)`` matrix per chunk; with ``C`` rows per chunk that traffic costs ~``C/3``
    FLOPs per byte of the ``dW`` GEMM, so ``C`` must reach the high hundreds to keep the GEMMs compute-bound
    (Liger's ``N / ceil(V / H)`` rule gives 256 rows at 16k x 129k x 1536, too few for fp32 accumulation).
    ``C ~ H`` makes a logits chunk about the size of the weight, so the extra memory stays
    ``~3 x weight`` (logits chunk, fp32 ``dW``) whatever the number of tokens.  For small vocabularies
    (e.g. 4096 x 256) that chunk is tiny: below 16 MiB a smaller chunk saves no memory that matters and only
    adds chunk-loop passes and smaller GEMMs (1024 instead of 256 rows at 1024 x 4096 x 256 is ~5% faster on CPU).
    """
    chunk = min(4096, max(256, 1 << max(0, math.ceil(math.log2(max(1, hidden))))))
    chunk = max(chunk, _MIN_CHUNK_LOGITS // max(1, vocab))
    return max(1, min(n_tokens, chunk))


def _chunked(h2, weight, bias, t1, class_w, scales, opts, chunk, step, need, row_grad=None):
    """Run all chunks.  ``need = (dh, dW, db)`` flags.  Returns per-token fp32 ``(ce, zl)`` (N,), ``dh`` (N, H),
    ``dW`` fp32 (V, H), ``db`` fp32 (V,) (None when not needed).  ``row_grad`` (N,) multiplies each token's
    ``dl`` (reduction "none"); ``scales`` are the reduction's fp32 factors."""
    need_dh, need_dw, need_db = need
    n = h2.shape[0]
    compute_grad = need_dh or need_dw or need_db
    ce = torch.empty(n, dtype=torch.float32, device=h2.device)
    zl = torch.empty(n, dtype=torch.float32, device=h2.device)
    dh = torch.empty_like(h2) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
    wt = weight.t()
    # one logits buffer for all chunks: a fresh (c, V) product per chunk would hold two chunks at once
    # (the next product is allocated before the previous one is released)
    buf = torch.empty(min(chunk, n), weight.shape[0], dtype=h2.dtype, device=h2.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = h2[start:end]
        out = buf[: end - start]
        # (c, V), input dtype, fp32 accumulation inside the GEMM
        logits = torch.mm(h_c, wt, out=out) if bias is None else torch.addmm(bias, h_c, wt, out=out)
        rg = row_grad[start:end] if row_grad is not None else None
        ce[start:end], zl[start:end] = step(logits, t1[start:end], class_w, scales, opts, compute_grad, rg)
        if need_dh:
            torch.mm(logits, weight, out=dh[start:end])
        if need_dw:
            _accumulate_dw(dw, logits, h_c)
        if need_db:
            db += logits.sum(dim=0, dtype=torch.float32)
    return ce, zl, dh, dw, db


def _accumulate_dw(dw: torch.Tensor, dl: torch.Tensor, h_c: torch.Tensor, fused: bool | None = None) -> None:
    """``dw += dl.T @ h_c`` with ``dw`` fp32.

    fp32 inputs: one in-place ``addmm_``.  CUDA half precision: ``addmm(..., out_dtype=float32, out=dw)``,
    so the GEMM reads ``dw`` in its epilogue and accumulates in fp32 -- no half-precision ``(V, H)``
    product written then re-read (at vocab 129k x H 1536 that was ~19 GB of traffic per 16k-token step).
    Elsewhere (CPU has no ``out_dtype`` GEMM; older torch) the half-precision product is summed into
    fp32 in slabs of ``_DW_SLAB`` vocab rows, so the temporary is ``(_DW_SLAB, H)``, not a second ``(V, H)``.
    """
    if h_c.dtype == torch.float32:
        dw.addmm_(dl.t(), h_c)
    elif fused if fused is not None else (dl.device.type == "cuda" and ADDMM_OUT_DTYPE):
        torch.addmm(dw, dl.t(), h_c, out_dtype=torch.float32, out=dw)
    else:
        for v in range(0, dw.shape[0], _DW_SLAB):
            dw[v : v + _DW_SLAB] += dl[:, v : v + _DW_SLAB].t() @ h_c


def _cast(x, like):
    return x.to(like.dtype) if x is not None else None


def _lce_forward(h2, weight, bias, t1, class_w, opts, reduction, chunk, need, use_kernel):
    """``(loss, z_loss, dh, dw, db)``: the reduced fp32 losses (per-token for "none") and, for the scalar
    reductions, the gradients for ``grad_output = 1`` (in the input dtypes; None when not needed).  For "none"
    no gradient is formed here (see :func:`_lce_backward_none`)."""
    scales = _reduction_scales(t1, class_w, opts.ignore_index, reduction, weight.shape[0])
    if reduction == "none":
        need = (False, False, False)
    ce, zl, dh, dw, db = _chunked(h2, weight, bias, t1, class_w, scales, opts, chunk, _step(use_kernel), need)
    loss, z_loss = _reduce(ce, zl, scales, reduction)
    return loss, z_loss, dh, _cast(dw, weight), _cast(db, weight)


def _lce_backward_none(h2, weight, bias, t1, class_w, grad, opts, chunk, need, use_kernel):
    """Gradients for reduction "none": the chunks are recomputed with the per-token ``grad`` folded into ``dl``."""
    ones = torch.ones(2, dtype=torch.float32, device=h2.device)
    _, _, dh, dw, db = _chunked(
        h2, weight, bias, t1, class_w, ones, opts, chunk, _step(use_kernel), need, grad.reshape(-1).contiguous()
    )
    return dh, _cast(dw, weight), _cast(db, weight)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Over 2-D ``hidden (N, H)`` and 1-D ``targets (N,)``; returns the fp32 ``(loss, z_loss)``."""

    @staticmethod
    def forward(ctx, h2, weight, bias, t1, class_w, opts, reduction, chunk, use_kernel):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, z_loss, dh, dw, db = _lce_forward(h2, weight, bias, t1, class_w, opts, reduction, chunk, need, use_kernel)
        ctx.args = (opts, reduction, chunk, need, use_kernel)
        if reduction == "none":  # per-token incoming gradients are only known in backward: recompute there
            ctx.save_for_backward(h2, weight, bias, t1, class_w)
        else:
            ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        opts, reduction, chunk, need, use_kernel = ctx.args
        if reduction == "none":
            h2, weight, bias, t1, class_w = ctx.saved_tensors
            dh, dw, db = _lce_backward_none(h2, weight, bias, t1, class_w, grad_out, opts, chunk, need, use_kernel)
        else:
            dh, dw, db = (_times_grad(x, grad_out) for x in ctx.saved_tensors)
        return dh, dw, db, None, None, None, None, None, None


# torch.compile: the same computation as opaque custom ops (traced through shape-only fake impls), so the
# chunk loop, its in-place updates and the Triton launches never reach dynamo.  Eager calls keep the
# autograd.Functions above.  Absent gradients travel as empty tensors (custom-op outputs cannot be None).
_CUSTOM_OPS = hasattr(torch.library, "custom_op")
_OPTS_SCHEMA = "float logit_scale, int ignore_index, float label_smoothing, float softcap, float lse_square_scale"
if _CUSTOM_OPS:

    def _none_if_empty(t):
        return None if t.numel() == 0 else t

    def _or_empty(t, like):
        return t if t is not None else like.new_empty(0)

    # --- linear + cross-entropy ---
    @torch.library.custom_op(
        "xkernels::linear_cross_entropy_fwd",
        mutates_args=(),
        schema=f"(Tensor h2, Tensor weight, Tensor? bias, Tensor t1, Tensor? class_w, {_OPTS_SCHEMA}, str reduction, "
        "int chunk, bool need_dh, bool need_dw, bool need_db, bool use_kernel) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    )
    def _lce_fwd_op(h2, weight, bias, t1, class_w, s, ii, eps, cap, lam, reduction, chunk, ndh, ndw, ndb, use_kernel):
        opts = CEOptions(s, ii, eps, cap, lam)
        loss, z_loss, dh, dw, db = _lce_forward(
            h2, weight, bias, t1, class_w, opts, reduction, chunk, (ndh, ndw, ndb), use_kernel
        )
        return loss, z_loss, _or_empty(dh, h2), _or_empty(dw, weight), _or_empty(db, weight)

    @_lce_fwd_op.register_fake
    def _(h2, weight, bias, t1, class_w, s, ii, eps, cap, lam, reduction, chunk, ndh, ndw, ndb, use_kernel):
        loss = h2.new_empty(h2.shape[0] if reduction == "none" else (), dtype=torch.float32)
        z_loss = h2.new_empty(h2.shape[0] if reduction == "none" else (), dtype=torch.float32)
        grads = reduction != "none"
        dh = h2.new_empty(h2.shape if grads and ndh else (0,))
        dw = weight.new_empty(weight.shape if grads and ndw else (0,))
        db = weight.new_empty((weight.shape[0],) if grads and ndb else (0,))
        return loss, z_loss, dh, dw, db

    @torch.library.custom_op(
        "xkernels::linear_cross_entropy_bwd_none",
        mutates_args=(),
        schema=f"(Tensor h2, Tensor weight, Tensor? bias, Tensor t1, Tensor? class_w, Tensor grad, {_OPTS_SCHEMA}, "
        "int chunk, bool need_dh, bool need_dw, bool need_db, bool use_kernel) -> (Tensor, Tensor, Tensor)",
    )
    def _lce_bwd_none_op(h2, weight, bias, t1, class_w, grad, s, ii, eps, cap, lam, chunk, ndh, ndw, ndb, use_kernel):
        opts = CEOptions(s, ii, eps, cap, lam)
        dh, dw, db = _lce_backward_none(h2, weight, bias, t1, class_w, grad, opts, chunk, (ndh, ndw, ndb), use_kernel)
        return _or_empty(dh, h2), _or_empty(dw, weight), _or_empty(db, weight)

    @_lce_bwd_none_op.register_fake
    def _(h2, weight, bias, t1, class_w, grad, s, ii, eps, cap, lam, chunk, ndh, ndw, ndb, use_kernel):
        return (
            h2.new_empty(h2.shape if ndh else (0,)),
            weight.new_empty(weight.shape if ndw else (0,)),
            weight.new_empty((weight.shape[0],) if ndb else (0,)),
        )

    def _lce_setup_context(ctx, inputs, output):
        h2, weight, bias, t1, class_w, *opts, reduction, chunk, ndh, ndw, ndb, use_kernel = inputs
        _, _, dh, dw, db = output
        ctx.reduction = reduction
        ctx.has_bias = bias is not None
        ctx.args = (*opts, chunk, ndh, ndw, ndb, use_kernel)
        if reduction == "none":
            ctx.save_for_backward(h2, weight, bias, t1, class_w)
        else:
            ctx.save_for_backward(dh, dw, db)

    def _lce_op_backward(ctx, grad_out, _dz, _ddh, _ddw, _ddb):
        if ctx.reduction == "none":
            h2, weight, bias, t1, class_w = ctx.saved_tensors
            dh, dw, db = _lce_bwd_none_op(h2, weight, bias, t1, class_w, grad_out, *ctx.args)
        else:
            dh, dw, db = (_times_grad(x, grad_out) for x in ctx.saved_tensors)
        db = _none_if_empty(db) if ctx.has_bias else None
        return (_none_if_empty(dh), _none_if_empty(dw), db) + (None,) * 13

    _lce_fwd_op.register_autograd(_lce_op_backward, setup_context=_lce_setup_context)

    # --- cross-entropy on ready logits (under compile the gradient always goes to a new buffer) ---
    @torch.library.custom_op(
        "xkernels::cross_entropy_fwd",
        mutates_args=(),
        schema=f"(Tensor logits, Tensor t1, Tensor? class_w, {_OPTS_SCHEMA}, str reduction, bool need_grad, "
        "bool use_kernel) -> (Tensor, Tensor, Tensor)",
    )
    def _ce_fwd_op(logits, t1, class_w, s, ii, eps, cap, lam, reduction, need_grad, use_kernel):
        opts = CEOptions(s, ii, eps, cap, lam)
        loss, z_loss, dl = _ce_forward(logits, t1, class_w, opts, reduction, need_grad, False, use_kernel)
        return loss, z_loss, _or_empty(dl, logits)

    @_ce_fwd_op.register_fake
    def _(logits, t1, class_w, s, ii, eps, cap, lam, reduction, need_grad, use_kernel):
        shape = logits.shape[0] if reduction == "none" else ()
        dl = logits.new_empty(logits.shape if need_grad and reduction != "none" else (0,))
        return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.float32), dl

    @torch.library.custom_op(
        "xkernels::cross_entropy_bwd_none",
        mutates_args=(),
        schema=f"(Tensor logits, Tensor t1, Tensor? class_w, Tensor grad, {_OPTS_SCHEMA}, bool use_kernel) -> Tensor",
    )
    def _ce_bwd_none_op(logits, t1, class_w, grad, s, ii, eps, cap, lam, use_kernel):
        return _ce_backward_none(logits, t1, class_w, grad, CEOptions(s, ii, eps, cap, lam), use_kernel)

    @_ce_bwd_none_op.register_fake
    def _(logits, t1, class_w, grad, s, ii, eps, cap, lam, use_kernel):
        return torch.empty_like(logits)

    def _ce_setup_context(ctx, inputs, output):
        logits, t1, class_w, *opts, reduction, need_grad, use_kernel = inputs
        ctx.reduction = reduction
        ctx.args = (*opts, use_kernel)
        ctx.save_for_backward(*((logits, t1, class_w) if reduction == "none" else (output[2],)))

    def _ce_op_backward(ctx, grad_out, _dz, _ddl):
        if ctx.reduction == "none":
            logits, t1, class_w = ctx.saved_tensors
            dl = _ce_bwd_none_op(logits, t1, class_w, grad_out, *ctx.args)
        else:
            dl = _times_grad(ctx.saved_tensors[0], grad_out)
        return (dl,) + (None,) * 10

    _ce_fwd_op.register_autograd(_ce_op_backward, setup_context=_ce_setup_context)


# ----------------------------------------------------------------------------------------------------
# Memory measurement (tests and benchmarks)
# ----------------------------------------------------------------------------------------------------


def measure_peak_memory(fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated``.  CPU: the profiler's allocator events (``profile_memory``),
    whose ``Total Allocated`` counter starts at 0 when profiling starts -- exact and independent of RSS
    noise.  Tensors still alive when ``fn`` returns count (keep outputs out of the comparison by
    returning nothing, or accept that both sides allocate them).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _validate_options(ignore_index, reduction, label_smoothing, softcap, lse_square_scale, class_w, cw_name, vocab,
                      ref):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    for name, val in (("label_smoothing", label_smoothing), ("lse_square_scale", lse_square_scale)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise TypeError(f"{name} must be a finite float, got {val!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
            raise TypeError(f"softcap must be None or a finite float, got {softcap!r}")
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 (or None for no cap), got {softcap}")
    if class_w is not None:
        check_float(cw_name, class_w)
        if class_w.shape != (vocab,):
            raise ValueError(f"{cw_name} (class weights) must have shape ({vocab},), got {tuple(class_w.shape)}")
        check_same_device(cw_name, class_w, "the logits", ref)


def _check_target_values(targets, ignore_index, vocab):
    """Opt-in range check of the target values (xkernels.check_inputs() / XKERNELS_CHECK_INPUTS=1): it reads them
    on the host (one device->host sync per call); never while torch.compile traces.  Unchecked, an out-of-range
    target makes its token's loss and gradient NaN."""
    if checking_inputs() and not compiling():
        valid = targets != ignore_index
        lo = torch.where(valid, targets, 0).min()
        hi = torch.where(valid, targets, 0).max()
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"targets must lie in [0, {vocab}) (the vocabulary) or equal ignore_index={ignore_index}, "
                f"got values in [{lo}, {hi}]"
            )


def _check_targets(name, targets, shape, ref):
    check_tensor(name, targets)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {_dtype_name(targets.dtype)}")
    if targets.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the logits without their last dim), "
                         f"got {tuple(targets.shape)}")
    check_same_device(name, targets, "the logits", ref)


def _class_weights(class_w):
    return class_w.to(torch.float32).contiguous() if class_w is not None else None


def _opts(logit_scale, ignore_index, label_smoothing, softcap, lse_square_scale):
    return CEOptions(
        float(logit_scale), int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(lse_square_scale)
    )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    weight: torch.Tensor | None = None,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ready ``logits`` ``(..., V)`` (fp32/bf16/fp16) against ``target`` ``(...)`` (int64/int32),
    with Liger-Kernel's options; the loss (and the z-loss) in fp32.  Math in the module docstring.

    ``weight`` (V,): class weights as in ``F.cross_entropy``.  ``label_smoothing``: torch's definition.
    ``softcap``: ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).  ``lse_square_scale``: adds the
    z-loss ``lse_square_scale * lse^2`` per token (PaLM).  ``return_z_loss=True`` returns ``(loss, z_loss)``: the
    z-loss part of ``loss``, reduced the same way (not differentiable: its gradient is already in ``loss``'s).

    Bad targets: a target outside ``[0, V)`` other than ``ignore_index`` gives that token a NaN loss and NaN
    logit gradients, with no host sync; inside ``with xkernels.check_inputs():`` a ``ValueError`` instead.

    Memory: the logits' gradient (for "mean"/"sum") is formed in the forward pass, into a new ``(N, V)`` buffer
    by default.  ``inplace_backward=True`` (opt-in) writes it into the logits' own storage instead, as Liger
    always does, saving that buffer; the logits' values are then gone.  It applies only when all of these hold:
    eager mode (under ``torch.compile`` a new buffer is used), reduction "mean" or "sum", a gradient is
    required, the logits are not a leaf (a leaf's storage is the user's data and its ``.grad`` would alias it)
    and their ``(N, V)`` view is contiguous.  The backward then scales that buffer in place too (so it can run
    only once: a second backward raises autograd's "modified by an inplace operation" error).  Opt in only when
    nothing reads the logits after this call: autograd nodes that saved them raise the same error (the version
    counter is bumped), but your own later reads (say an accuracy from ``logits.argmax``) would silently see
    gradients.
    """
    check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., vocab), got a 0-d tensor")
    _check_targets("target", target, logits.shape[:-1], logits)
    check_nonempty("logits", logits)
    vocab = logits.shape[-1]
    _validate_options(ignore_index, reduction, label_smoothing, softcap, lse_square_scale, weight, "weight", vocab,
                      logits)
    if not isinstance(inplace_backward, bool) or not isinstance(return_z_loss, bool):
        raise TypeError("inplace_backward and return_z_loss must be bools")
    _check_target_values(target, ignore_index, vocab)
    l2 = logits.reshape(-1, vocab)
    inplace = inplace_backward and l2.is_contiguous() and logits.grad_fn is not None
    if l2.stride(-1) != 1:
        l2 = l2.contiguous()
    t1 = target.reshape(-1).to(torch.int64).contiguous()
    class_w = _class_weights(weight)
    opts = _opts(1.0, ignore_index, label_smoothing, softcap, lse_square_scale)
    use_kernel = use_triton(logits)
    grad = torch.is_grad_enabled() and logits.requires_grad
    if _CUSTOM_OPS and compiling():
        loss, z_loss, _ = _ce_fwd_op(l2, t1, class_w, *opts, reduction, grad, use_kernel)
    elif grad:
        loss, z_loss = _CrossEntropyFunction.apply(l2, t1, class_w, opts, reduction, inplace, use_kernel)
    else:
        with torch.no_grad():
            loss, z_loss, _ = _ce_forward(l2, t1, class_w, opts, reduction, False, False, use_kernel)
    if reduction == "none":
        loss, z_loss = loss.reshape(target.shape), z_loss.reshape(target.shape)
    return (loss, z_loss) if return_z_loss else loss


def _validate(hidden, weight, targets, logit_scale, z_loss, chunk_size, bias):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., hidden_size), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (vocab, hidden_size), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} (shape {tuple(weight.shape)}) but hidden has "
            f"{hidden.shape[-1]} (shape {tuple(hidden.shape)}); weight must be (vocab, hidden_size)"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {_dtype_name(weight.dtype)} differs from hidden dtype {_dtype_name(hidden.dtype)}; "
            "cast one of them"
        )
    check_tensor("targets", targets)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 (or int32) tensor, got {_dtype_name(targets.dtype)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(targets.shape)}"
        )
    check_same_device("weight", weight, "hidden", hidden)
    check_same_device("targets", targets, "hidden", hidden)
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (the rows of weight), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {_dtype_name(bias.dtype)} differs from weight dtype "
                            f"{_dtype_name(weight.dtype)}")
        check_same_device("bias", bias, "hidden", hidden)
    check_nonempty("hidden", hidden)
    check_nonempty("weight", weight)
    for name, val in (("logit_scale", logit_scale), ("z_loss", z_loss)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise TypeError(f"{name} must be a finite float, got {val!r}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    *,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy((hidden @ weight.T + bias) * logit_scale, targets)`` without the full logits.

    ``hidden`` ``(..., H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` (same float dtype and device), ``targets``
    ``(...)`` int64/int32 in ``[0, V)`` or ``ignore_index``.  The options are :func:`cross_entropy`'s (Liger's
    ``liger_fused_linear_cross_entropy`` names; the class weights are ``ce_weight`` because ``weight`` is the
    projection): ``label_smoothing``, ``softcap`` (applied to the scaled logits), ``lse_square_scale`` (z-loss;
    ``z_loss`` is the older name of the same scale and adds to it), ``return_z_loss``.  A target outside
    ``[0, V)`` gives that token a NaN loss and NaN gradients (no host sync); ``with xkernels.check_inputs():``
    raises a ``ValueError`` instead.  ``reduction``: ``"mean"`` (0 when every target is ignored), ``"sum"`` or
    ``"none"``.  Returns fp32.  ``chunk_size`` (tokens per chunk) defaults to :func:`default_chunk_size`.  The
    logits are never materialised beyond one chunk whatever the options.  See the module docstring.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        # Under autocast this op is a matmul: both operands in the autocast dtype (the op accumulates in fp32 itself).
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(
                hidden.to(dtype), weight.to(dtype), targets, logit_scale, ignore_index, reduction, z_loss, chunk_size,
                bias=bias.to(dtype) if isinstance(bias, torch.Tensor) else bias, ce_weight=ce_weight,
                label_smoothing=label_smoothing, softcap=softcap, lse_square_scale=lse_square_scale,
                return_z_loss=return_z_loss,
            )  # fmt: skip
    _validate(hidden, weight, targets, logit_scale, z_loss, chunk_size, bias)
    vocab = weight.shape[0]
    _validate_options(
        ignore_index, reduction, label_smoothing, softcap, lse_square_scale, ce_weight, "ce_weight", vocab, hidden
    )
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {return_z_loss!r}")
    _check_target_values(targets, ignore_index, vocab)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    n = h2.shape[0]
    chunk = min(chunk_size if chunk_size is not None else default_chunk_size(n, vocab, h2.shape[1]), n)
    class_w = _class_weights(ce_weight)
    opts = _opts(logit_scale, ignore_index, label_smoothing, softcap, lse_square_scale + z_loss)
    use_kernel = use_triton(hidden)
    params = (hidden, weight) + ((bias,) if bias is not None else ())
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if _CUSTOM_OPS and compiling():
        need = (grad and hidden.requires_grad, grad and weight.requires_grad,
                grad and bias is not None and bias.requires_grad)
        loss, zl, _, _, _ = _lce_fwd_op(h2, weight, bias, t1, class_w, *opts, reduction, chunk, *need, use_kernel)
    elif grad:
        loss, zl = _LinearCrossEntropyFunction.apply(h2, weight, bias, t1, class_w, opts, reduction, chunk, use_kernel)
    else:
        with torch.no_grad():
            loss, zl, _, _, _ = _lce_forward(
                h2, weight, bias, t1, class_w, opts, reduction, chunk, (False, False, False), use_kernel
            )
    if reduction == "none":
        loss, zl = loss.reshape(targets.shape), zl.reshape(targets.shape)
    return (loss, zl) if return_z_loss else loss
