"""Cross-entropy on ready logits (:func:`xkernels.cross_entropy`) against eager PyTorch, torch.compile and Liger-Kernel.

Logits ``(tokens, vocab)``: 4096 x 129280 in bf16 on CUDA (64 x 4096 fp32 on CPU), forward + backward, mean over
non-ignored targets (every 17th ignored).  Variants: ``plain`` and ``options`` (label smoothing 0.1, soft cap 30,
z-loss 1e-4: the eager contender caps with tanh and adds ``1e-4 * logsumexp^2`` itself).  Bytes: the logits read
once and their gradient written once (``2 N V``), the floor for any implementation; rated in GB/s.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xkernels
from benchmarks.common import DEVICE, contender, liger, pick, randn, run_memory_bound

DTYPE = pick(torch.bfloat16, torch.float32)
SHAPE = pick((4096, 129280), (64, 4096))  # tokens, vocab
OPTIONS = {"plain": {}, "options": dict(label_smoothing=0.1, softcap=30.0, lse_square_scale=1e-4)}


def ce_eager(logits, target, label_smoothing=0.0, softcap=None, lse_square_scale=0.0):
    """What a trainer writes without a fused kernel (fp32 upcast as HF does, cap and z-loss by hand)."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, target, label_smoothing=label_smoothing)
    if lse_square_scale:
        valid = target != -100
        lse = torch.logsumexp(z, dim=-1)
        loss = loss + lse_square_scale * (lse.square() * valid).sum() / valid.sum().clamp_min(1)
    return loss


def _liger(kw):
    fn = liger("liger_kernel.transformers.functional", "liger_cross_entropy")
    return lambda x, t: fn(x, t, **kw)


@pytest.mark.parametrize("variant", list(OPTIONS))
@pytest.mark.parametrize("impl", ["xkernels", "eager", "compile", "liger"])
def test_cross_entropy(benchmark, impl, variant):
    kw = OPTIONS[variant]
    fn = contender(
        impl, ours=lambda x, t: xkernels.cross_entropy(x, t, **kw), eager=lambda x, t: ce_eager(x, t, **kw),
        peer=lambda: _liger(kw),
    )  # fmt: skip
    tokens, vocab = SHAPE

    def make_inputs():
        x = randn(tokens, vocab, dtype=DTYPE, requires_grad=True)
        t = torch.randint(0, vocab, (tokens,), device=DEVICE)
        t[::17] = -100
        return (x, t), torch.ones((), device=DEVICE)

    run_memory_bound(benchmark, fn, make_inputs, op=f"cross_entropy[{variant}]", family="cross_entropy", impl=impl,
                     mode="fwdbwd", shape=f"{tokens}x{vocab}", dtype=DTYPE,
                     bytes_moved=2 * tokens * vocab * DTYPE.itemsize)  # fmt: skip
