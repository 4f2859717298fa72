"""Linear + cross-entropy without materialising the ``(tokens, vocab)`` logits (Liger-style chunking).

Math, per token ``i`` with hidden row ``h_i`` (H), output weight ``W`` (V, H), target ``t_i`` and
``s = logit_scale`` (muP's ``mup_output_scale / width_mult``)::

    z_i    = s * (W h_i)                         # (V,) scaled logits
    lse_i  = log(sum_v exp(z_iv))                # fp32
    loss_i = lse_i - z_i[t_i] + z_loss * lse_i^2 # 0 where t_i == ignore_index

Reduction ``"mean"`` divides the sum over non-ignored tokens by their exact count ``n``; when every
target is ignored the mean is defined as ``0`` with zero gradients (``F.cross_entropy`` returns NaN
there).  ``"sum"`` sums, ``"none"`` returns ``loss_i`` (0 at ignored tokens) in the shape of ``targets``.
The loss is returned in fp32 whatever the input dtype.

Gradient of ``loss_i`` with respect to the raw logits ``l_i = W h_i``::

    dl_i = s * (softmax(z_i) * (1 + 2 z_loss lse_i) - onehot(t_i))   (0 at ignored tokens)
    dh_i = dl_i W ,   dW = sum_i dl_i^T h_i

The tokens are processed in chunks of ``C`` rows: for each chunk the logits ``(C, V)`` are formed by one
matmul, a row kernel computes the loss and overwrites the logits with ``dl`` in place (a Triton kernel on
GPU / under the interpreter, PyTorch on CPU), then ``dh`` for the chunk and the chunk's contribution to
``dW`` (accumulated in fp32) are formed by two more matmuls.  For the scalar reductions all of this runs
in the forward pass and the backward only scales the stored gradients by ``grad_output``; so peak extra
memory is one logits chunk plus ``dW`` and ``dh``.  For ``"none"`` the per-token ``grad_output`` is only
known in the backward, which therefore recomputes the chunks (one more pass of matmuls).
"""

from __future__ import annotations

import math

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

# ----------------------------------------------------------------------------------------------------
# PyTorch reference (unfused: materialises the logits; tests and benchmarks compare against it)
# ----------------------------------------------------------------------------------------------------


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """The module docstring's loss, computed the plain way in fp32 (float64 for float64 inputs).

    Differentiable by autograd; "mean" over zero non-ignored targets gives 0 (not NaN).
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.reshape(-1, hidden.shape[-1]).to(acc)
    t = targets.reshape(-1)
    z = (h @ weight.to(acc).t()) * logit_scale
    lse = torch.logsumexp(z, dim=-1)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    loss = lse - z.gather(1, safe_t[:, None]).squeeze(1) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(targets.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1).to(acc)


def unfused_cross_entropy(hidden, weight, targets, logit_scale=1.0, ignore_index=-100, reduction="mean"):
    """The baseline everybody writes: ``F.cross_entropy((hidden @ weight.T) * logit_scale, targets)``
    (full logits in the input dtype).  Used as the memory/time comparison point."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()) * logit_scale
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def _ce_chunk_torch(logits, targets, logit_scale, ignore_index, z_loss, compute_grad, row_grad=None):
    """PyTorch twin of :func:`_ce_chunk_kernel`: per-row loss of one chunk (fp32) and, when
    ``compute_grad``, ``dl`` written into ``logits`` in place (times ``row_grad`` per row when given).

    The chunk is scratch (fp32 logits are modified even without ``compute_grad``); the log-sum-exp is
    done in place (max, subtract, exp, sum) so at most one fp32 copy of the chunk exists."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    if logit_scale != 1.0:  # (x * 1.0 == x exactly: skipping it saves a pass over the chunk, numerics unchanged)
        z = z.mul_(logit_scale)
    valid = targets != ignore_index
    # out-of-range targets (unchecked by default) are clamped, as in the kernel: no out-of-bounds gather
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).clamp_(0, z.shape[1] - 1)
    z_t = z.gather(1, safe_t[:, None]).squeeze(1)
    m = z.amax(dim=-1)
    e = z.sub_(m[:, None]).exp_()  # exp(z - max), in z's storage
    total = e.sum(dim=-1)
    lse = m + torch.log(total)
    loss = lse - z_t + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if compute_grad:
        # s * (softmax * (1 + 2 z_loss lse) - onehot), s = logit_scale (0 at ignored rows, times row_grad):
        # one pass scales exp(z - max) by s (1 + 2 z_loss lse) / sum, then s is subtracted at the target
        row_scale = valid.to(e.dtype) * logit_scale
        if row_grad is not None:
            row_scale = row_scale * row_grad.float()
        p = e.mul_(((1.0 + 2.0 * z_loss * lse) / total * row_scale)[:, None])
        p.scatter_add_(1, safe_t[:, None], -row_scale[:, None])
        if p.data_ptr() != logits.data_ptr():
            logits.copy_(p)
    return loss


# ----------------------------------------------------------------------------------------------------
# Triton kernel: loss and in-place logits gradient of one chunk
# ----------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_chunk_kernel(
        LOGITS,  # (C, V) raw logits of the chunk, last dim contiguous; overwritten with dl when COMPUTE_GRAD
        TARGETS,  # (C,) int64 targets
        LOSS,  # (C,) fp32 per-row loss (output)
        ROW_GRAD,  # (C,) per-row incoming gradient (read only when HAS_ROW_GRAD)
        stride_l,  # row stride of LOGITS in elements
        n_cols,  # V
        ignore_index,
        logit_scale,
        z_loss,
        COMPUTE_GRAD: tl.constexpr,
        HAS_ROW_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per row.  Pass 1: online max / sum-exp over ``z = s * l`` in fp32 -> ``lse``;
        loss ``lse - z[t] + z_loss lse^2``.  Pass 2 (COMPUTE_GRAD): overwrite the row with
        ``dl = s * g * (softmax(z) * (1 + 2 z_loss lse) - onehot(t))`` where ``g`` is 1 or ``ROW_GRAD[row]``,
        and 0 for ignored rows.

        Ordering: the target logit ``z[t]`` is read FIRST, before pass 1, and a barrier separates pass 1
        from pass 2.  Pass 2 overwrites the row in place, and the threads of one program run ahead of
        each other: a read of ``z[t]`` after pass 1 could see another warp's ``dl`` already stored there.
        Targets outside ``[0, V)`` are clamped into it (unspecified loss, but no out-of-bounds access;
        the range check is opt-in, see :func:`xkernels.check_inputs`)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l
        t = tl.load(TARGETS + row)
        valid = t != ignore_index
        safe_t = tl.minimum(tl.maximum(tl.where(valid, t, 0), 0), n_cols - 1)
        z_t = tl.load(ptr + safe_t).to(tl.float32) * logit_scale

        m = tl.full([], float("-inf"), tl.float32)
        d = tl.full([], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            # load with other=0 then mask in fp32 (-inf as a bf16 `other` is unreliable in the interpreter)
            z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        loss = lse - z_t + z_loss * lse * lse
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))

        if COMPUTE_GRAD:
            scale = tl.where(valid, logit_scale, 0.0)
            if HAS_ROW_GRAD:
                scale = scale * tl.load(ROW_GRAD + row).to(tl.float32)
            p_scale = 1.0 + 2.0 * z_loss * lse
            tl.debug_barrier()  # every thread has read the row (and z[t]) before any overwrites it
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
                dz = tl.exp(z - lse) * p_scale - tl.where(cols == safe_t, 1.0, 0.0)
                tl.store(ptr + cols, (dz * scale).to(LOGITS.dtype.element_ty), mask=mask)

    def _ce_chunk_triton(logits, targets, logit_scale, ignore_index, z_loss, compute_grad, row_grad=None):
        n_rows, n_cols = logits.shape
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        # 4096 fp32 per block: 32 elements per thread at 4 warps; fewer for tiny vocabularies.
        block = min(4096, triton.next_power_of_2(n_cols))
        with launch_on(logits):  # the launch goes to logits's GPU, not the current one
            _ce_chunk_kernel[(n_rows,)](
                logits,
                targets,
                loss,
                row_grad if row_grad is not None else loss,
                logits.stride(0),
                n_cols,
                ignore_index,
                float(logit_scale),
                float(z_loss),
                COMPUTE_GRAD=compute_grad,
                HAS_ROW_GRAD=row_grad is not None,
                BLOCK=block,
                num_warps=8 if block >= 4096 else 4,
            )
        return loss


# ----------------------------------------------------------------------------------------------------
# Chunked driver and autograd
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


def _chunked(h2, weight, t1, logit_scale, ignore_index, z_loss, chunk, step, need_dh, need_dw, row_grad=None):
    """Run all chunks.  Returns (per-token fp32 loss (N,), dh (N, H) or None, dW fp32 (V, H) or None).

    When neither gradient is needed only the losses are computed.  ``row_grad`` (N,) multiplies each
    token's ``dl`` (reduction "none").
    """
    n = h2.shape[0]
    compute_grad = need_dh or need_dw
    loss = torch.empty(n, dtype=torch.float32, device=h2.device)
    dh = torch.empty_like(h2) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    wt = weight.t()
    # one logits buffer for all chunks: a fresh (c, V) product per chunk would hold two chunks at once
    # (the next product is allocated before the previous one is released)
    buf = torch.empty(min(chunk, n), weight.shape[0], dtype=h2.dtype, device=h2.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = h2[start:end]
        logits = torch.mm(h_c, wt, out=buf[: end - start])  # (c, V), input dtype, fp32 accumulation inside the GEMM
        rg = row_grad[start:end] if row_grad is not None else None
        loss[start:end] = step(logits, t1[start:end], logit_scale, ignore_index, z_loss, compute_grad, rg)
        if need_dh:
            torch.mm(logits, weight, out=dh[start:end])
        if need_dw:
            _accumulate_dw(dw, logits, h_c)
    return loss, dh, dw


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


def _step(use_kernel: bool):
    return _ce_chunk_triton if use_kernel else _ce_chunk_torch


def _lce_forward(h2, weight, t1, logit_scale, ignore_index, reduction, z_loss, chunk, need_dh, need_dw, use_kernel):
    """``(loss, dh, dw)``: the reduced fp32 loss (per-token for "none") and, for the scalar reductions,
    the gradients for ``grad_output = 1`` (``dh`` in the hidden dtype, ``dw`` in the weight dtype; None
    when not needed).  For "none" no gradient is formed here (see :func:`_lce_backward_none`)."""
    step = _step(use_kernel)
    if reduction == "none":
        loss, _, _ = _chunked(h2, weight, t1, logit_scale, ignore_index, z_loss, chunk, step, False, False)
        return loss, None, None
    loss, dh, dw = _chunked(h2, weight, t1, logit_scale, ignore_index, z_loss, chunk, step, need_dh, need_dw)
    total = loss.sum()
    if reduction == "mean":
        # exact count of non-ignored targets, kept on the device (no sync); 0 targets -> loss 0, grads 0
        inv_n = 1.0 / (t1 != ignore_index).sum().clamp_min(1).to(torch.float32)
        total = total * inv_n
        dh = dh.mul_(inv_n.to(dh.dtype)) if dh is not None else None
        dw = dw.mul_(inv_n) if dw is not None else None
    return total, dh, (dw.to(weight.dtype) if dw is not None else None)


def _lce_backward_none(h2, weight, t1, grad, logit_scale, ignore_index, z_loss, chunk, need_dh, need_dw, use_kernel):
    """Gradients for reduction "none": the chunks are recomputed with the per-token ``grad`` folded into ``dl``."""
    _, dh, dw = _chunked(
        h2, weight, t1, logit_scale, ignore_index, z_loss, chunk, _step(use_kernel), need_dh, need_dw, grad.contiguous()
    )
    return dh, (dw.to(weight.dtype) if dw is not None else None)


def _scale_saved(dh, dw, grad_out):
    """Stored scalar-reduction gradients times ``grad_output`` (new tensors: the graph may be run again)."""
    return (dh * grad_out.to(dh.dtype) if dh is not None else None, dw * grad_out.to(dw.dtype) if dw is not None else None)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Over 2-D ``hidden (N, H)`` and 1-D ``targets (N,)``; returns the reduced fp32 loss."""

    @staticmethod
    def forward(ctx, h2, weight, t1, logit_scale, ignore_index, reduction, z_loss, chunk, use_kernel):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (logit_scale, ignore_index, reduction, z_loss, chunk, need_dh, need_dw, use_kernel)
        loss, dh, dw = _lce_forward(h2, weight, t1, *args)
        ctx.reduction = reduction
        ctx.args = args
        if reduction == "none":  # per-token incoming gradients are only known in backward: recompute there
            ctx.save_for_backward(h2, weight, t1)
        else:
            ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logit_scale, ignore_index, _, z_loss, chunk, need_dh, need_dw, use_kernel = ctx.args
        if ctx.reduction == "none":
            h2, weight, t1 = ctx.saved_tensors
            dh, dw = _lce_backward_none(
                h2, weight, t1, grad_out, logit_scale, ignore_index, z_loss, chunk, need_dh, need_dw, use_kernel
            )
        else:
            dh, dw = _scale_saved(*ctx.saved_tensors, grad_out)
        return dh, dw, None, None, None, None, None, None, None


# torch.compile: the same computation as opaque custom ops (traced through shape-only fake impls), so the
# chunk loop, its in-place updates and the Triton launches never reach dynamo.  Eager calls keep the
# autograd.Function above.  Absent gradients travel as empty tensors (custom-op outputs cannot be None).
_CUSTOM_OPS = hasattr(torch.library, "custom_op")
if _CUSTOM_OPS:

    def _none_if_empty(t):
        return None if t.numel() == 0 else t

    @torch.library.custom_op(
        "xkernels::linear_cross_entropy_fwd",
        mutates_args=(),
        schema="(Tensor h2, Tensor weight, Tensor t1, float logit_scale, int ignore_index, str reduction, "
        "float z_loss, int chunk, bool need_dh, bool need_dw, bool use_kernel) -> (Tensor, Tensor, Tensor)",
    )
    def _lce_fwd_op(h2, weight, t1, logit_scale, ignore_index, reduction, z_loss, chunk, need_dh, need_dw, use_kernel):
        loss, dh, dw = _lce_forward(
            h2, weight, t1, logit_scale, ignore_index, reduction, z_loss, chunk, need_dh, need_dw, use_kernel
        )
        return loss, (dh if dh is not None else h2.new_empty(0)), (dw if dw is not None else weight.new_empty(0))

    @_lce_fwd_op.register_fake
    def _(h2, weight, t1, logit_scale, ignore_index, reduction, z_loss, chunk, need_dh, need_dw, use_kernel):
        loss = h2.new_empty(h2.shape[0] if reduction == "none" else (), dtype=torch.float32)
        grads = reduction != "none"
        dh = h2.new_empty(h2.shape if grads and need_dh else (0,))
        dw = weight.new_empty(weight.shape if grads and need_dw else (0,))
        return loss, dh, dw

    @torch.library.custom_op(
        "xkernels::linear_cross_entropy_bwd_none",
        mutates_args=(),
        schema="(Tensor h2, Tensor weight, Tensor t1, Tensor grad, float logit_scale, int ignore_index, "
        "float z_loss, int chunk, bool need_dh, bool need_dw, bool use_kernel) -> (Tensor, Tensor)",
    )
    def _lce_bwd_none_op(h2, weight, t1, grad, logit_scale, ignore_index, z_loss, chunk, need_dh, need_dw, use_kernel):
        dh, dw = _lce_backward_none(
            h2, weight, t1, grad, logit_scale, ignore_index, z_loss, chunk, need_dh, need_dw, use_kernel
        )
        return (dh if dh is not None else h2.new_empty(0)), (dw if dw is not None else weight.new_empty(0))

    @_lce_bwd_none_op.register_fake
    def _(h2, weight, t1, grad, logit_scale, ignore_index, z_loss, chunk, need_dh, need_dw, use_kernel):
        return h2.new_empty(h2.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,))

    def _lce_setup_context(ctx, inputs, output):
        h2, weight, t1, logit_scale, ignore_index, reduction, z_loss, chunk, need_dh, need_dw, use_kernel = inputs
        _, dh, dw = output
        ctx.reduction = reduction
        ctx.args = (logit_scale, ignore_index, z_loss, chunk, need_dh, need_dw, use_kernel)
        ctx.save_for_backward(*((h2, weight, t1) if reduction == "none" else (dh, dw)))

    def _lce_op_backward(ctx, grad_out, _ddh, _ddw):
        if ctx.reduction == "none":
            dh, dw = _lce_bwd_none_op(*ctx.saved_tensors, grad_out, *ctx.args)
        else:
            dh, dw = _scale_saved(*ctx.saved_tensors, grad_out)
        return _none_if_empty(dh), _none_if_empty(dw), None, None, None, None, None, None, None, None, None

    _lce_fwd_op.register_autograd(_lce_op_backward, setup_context=_lce_setup_context)


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


def _validate(hidden, weight, targets, logit_scale, ignore_index, reduction, z_loss, chunk_size):
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_tensor("targets", targets)
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
            f"weight dtype {str(weight.dtype).removeprefix('torch.')} differs from hidden dtype "
            f"{str(hidden.dtype).removeprefix('torch.')}; cast one of them"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 (or int32) tensor, got {str(targets.dtype).removeprefix('torch.')}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), got {tuple(targets.shape)}"
        )
    check_same_device("weight", weight, "hidden", hidden)
    check_same_device("targets", targets, "hidden", hidden)
    check_nonempty("hidden", hidden)
    check_nonempty("weight", weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, val in (("logit_scale", logit_scale), ("z_loss", z_loss)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise TypeError(f"{name} must be a finite float, got {val!r}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # Range check of the target values: opt-in (xkernels.check_inputs() / XKERNELS_CHECK_INPUTS=1) because it
    # reads them on the host (one device->host sync per call); never while torch.compile traces.  Unchecked,
    # an out-of-range target gives an unspecified loss (clamped index, no out-of-bounds access).
    if checking_inputs() and not compiling():
        valid = targets != ignore_index
        lo = torch.where(valid, targets, 0).min()
        hi = torch.where(valid, targets, 0).max()
        lo, hi = torch.stack([lo, hi]).tolist()
        vocab = weight.shape[0]
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"targets must lie in [0, {vocab}) (the rows of weight) or equal ignore_index={ignore_index}, "
                f"got values in [{lo}, {hi}]"
            )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy((hidden @ weight.T) * logit_scale, targets)`` without the full logits.

    ``hidden`` ``(..., H)``, ``weight`` ``(V, H)`` (same float dtype and device), ``targets`` ``(...)``
    int64/int32 in ``[0, V)`` or ``ignore_index``.  By default the target *values* are NOT checked (that
    would read them on the host: a sync every call): an out-of-range target gives an unspecified loss
    (its index is clamped; no out-of-bounds memory access).  Enable the check with
    ``with xkernels.check_inputs(): ...`` or ``XKERNELS_CHECK_INPUTS=1`` (a ``ValueError`` then names the
    range; skipped under ``torch.compile``).  ``reduction``: ``"mean"`` over non-ignored targets (0 when there are none),
    ``"sum"`` or ``"none"``.  ``z_loss`` adds ``z_loss * lse^2`` per token.  Returns fp32.
    ``chunk_size`` (tokens per chunk) defaults to :func:`default_chunk_size`.  See the module docstring.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        # Under autocast this op is a matmul: both operands in the autocast dtype (the op accumulates in fp32 itself).
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(
                hidden.to(dtype), weight.to(dtype), targets, logit_scale, ignore_index, reduction, z_loss, chunk_size
            )
    _validate(hidden, weight, targets, logit_scale, ignore_index, reduction, z_loss, chunk_size)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    n, vocab = h2.shape[0], weight.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, vocab, h2.shape[1])
    use_kernel = use_triton(hidden)
    args = (float(logit_scale), int(ignore_index), reduction, float(z_loss), min(chunk, n))
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if _CUSTOM_OPS and compiling():
        need = (grad and hidden.requires_grad, grad and weight.requires_grad)
        loss, _, _ = _lce_fwd_op(h2, weight, t1, *args, *need, use_kernel)
    elif grad:
        loss = _LinearCrossEntropyFunction.apply(h2, weight, t1, *args, use_kernel)
    else:
        with torch.no_grad():
            loss, _, _ = _lce_forward(h2, weight, t1, *args, False, False, use_kernel)
    return loss.reshape(targets.shape) if reduction == "none" else loss
