"""Guard regions: the elementwise and row kernels write only what they own and read only what they are given.

Parity tests compare values inside a tensor; a kernel whose mask is off by one writes (or reads) one element past a
row or past the end and still passes them, because the stray write lands in memory nobody looks at.  Here:

* **Outputs the launcher allocates** (``torch.empty`` / ``empty_like`` / ``zeros`` / ``zeros_like`` inside the
  kernel's module -- outputs and scratch alike) are handed out as views into a larger buffer whose guard bytes on
  both sides (at least one full row) hold a sentinel byte pattern; after the op every guard byte must be intact.
  The launchers have no ``out=`` argument, so the allocation is intercepted: the module's ``torch`` is replaced,
  for the test, by a proxy whose allocators return the guarded views (contiguous, as the launcher asked).
* **Outputs the caller provides** -- the in-place rotary (``inplace=True``) and the SwiGLU backward's ``dg``/``du``
  buffers with their row stride (``_swiglu_bwd``) -- are strided views into a sentinel-filled buffer (padding after
  every row, and around the head / sequence dims), so a per-row overrun hits the padding, not the next row.
* **Inputs** are strided views into NaN-filled storage (an offset and padding after every row): a load past a row
  or the tensor reads NaN, which poisons a row reduction (RMSNorm's rms, cross-entropy's logsumexp, FP8 amax) and
  makes the result differ from the reference.
* Each test also asserts that the kernel ran (``count_launches``) and that the views equal the reference.

Odd shapes throughout (199 rows, 760 columns: neither a power of two nor a multiple of the 128-wide blocks).
"""

import importlib
import math

import pytest
import torch

import xkernels
from xkernels.dispatch import interpreting
from xkernels.swiglu import swiglu_bwd_ref
from xkernels.testing import count_launches

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()), reason="kernels need CUDA or TRITON_INTERPRET=1"),
]

ROWS, COLS = 199, 760
SENTINEL = 0xA5  # byte pattern of the guard bytes (a finite value in every float format we use)


# --- guarded allocation ----------------------------------------------------------------------------------------------
class _GuardedTorch:
    """Stands in for ``torch`` inside one kernel module: its allocators return views with guard bytes around."""

    def __init__(self, real):
        self._real = real
        self.allocations = []  # (buffer bytes, start byte, end byte, what)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _alloc(self, shape, dtype, device, fill_zero, what):
        real = self._real
        shape = tuple(int(s) for s in shape)
        dtype = dtype or real.get_default_dtype()
        numel = math.prod(shape)
        esize = real.empty((), dtype=dtype).element_size()
        guard = max(shape[-1] if shape else 1, 256)  # at least one full row on each side
        raw = real.full(((numel + 2 * guard) * esize,), SENTINEL, dtype=real.uint8, device=device)
        start, end = guard * esize, (guard + numel) * esize
        view = raw[start:end].view(dtype).view(shape)
        if fill_zero:
            raw[start:end] = 0
        self.allocations.append((raw, start, end, f"{what}{shape} {dtype}"))
        return view

    @staticmethod
    def _shape(size):
        return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)

    def empty(self, *size, dtype=None, device=None, **_):
        return self._alloc(self._shape(size), dtype, device, False, "empty")

    def zeros(self, *size, dtype=None, device=None, **_):
        return self._alloc(self._shape(size), dtype, device, True, "zeros")

    def empty_like(self, t, dtype=None, device=None, **_):
        return self._alloc(t.shape, dtype or t.dtype, device or t.device, False, "empty_like")

    def zeros_like(self, t, dtype=None, device=None, **_):
        return self._alloc(t.shape, dtype or t.dtype, device or t.device, True, "zeros_like")

    def check(self):
        assert self.allocations, "no allocation was intercepted: the guard test checks nothing"
        for raw, start, end, what in self.allocations:
            before, after = raw[:start], raw[end:]
            bad_before = int((before != SENTINEL).sum())
            bad_after = int((after != SENTINEL).sum())
            assert bad_before == 0 and bad_after == 0, (
                f"kernel wrote outside {what}: {bad_before} guard bytes changed before it, {bad_after} after it"
            )


@pytest.fixture
def guard(monkeypatch):
    """``guard(module)`` puts guarded allocators into that module; ``.check()`` afterwards."""
    proxies = []

    def install(module):
        proxy = _GuardedTorch(torch)
        monkeypatch.setattr(module, "torch", proxy)
        proxies.append(proxy)
        return proxy

    yield install
    for p in proxies:
        p.check()


def nan_view(shape, device, dtype=torch.float32, pad=13, offset=7, gen=None):
    """Random values in a strided view whose storage is NaN all around (padding after each row, offset before)."""
    *lead, last = shape
    rows = math.prod(lead) if lead else 1
    big = torch.full((rows + 2, last + pad), float("nan"), dtype=torch.float32, device=device)
    vals = torch.randn(rows, last, generator=gen).to(device)
    big[1 : rows + 1, offset : offset + last] = vals
    view = big.to(dtype)[1 : rows + 1, offset : offset + last]
    assert view.stride(0) == last + pad
    return view.reshape(*lead, last) if lead else view.reshape(last)


def sentinel_buffer(shape, dtype, device):
    raw = torch.full((math.prod(shape) * torch.empty((), dtype=dtype).element_size(),), SENTINEL, dtype=torch.uint8,
                     device=device)
    return raw, raw.view(dtype).view(shape)


def assert_close(actual, expected, tol):
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()
    assert err <= tol, f"max relative error {err:.3g} > {tol:g}"


# --- RMSNorm ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_rmsnorm_fwd_bwd_stay_inside(device, guard, with_residual):
    mod = importlib.import_module("xkernels.rmsnorm")  # (the package re-exports functions under some module names)

    x = nan_view((ROWS, COLS), device).requires_grad_()
    r = nan_view((ROWS, COLS), device).requires_grad_()
    w = (torch.rand(COLS, device=device) + 0.5).requires_grad_()
    dy, ds = nan_view((ROWS, COLS), device), nan_view((ROWS, COLS), device)
    proxy = guard(mod)
    with count_launches() as launches:
        if with_residual:
            y, s = xkernels.add_rms_norm(x, r, w)
            torch.autograd.backward([y, s], [dy, ds])
        else:
            y = xkernels.rms_norm(x, w)
            y.backward(dy)
    assert launches["_rmsnorm_fwd_kernel"] == 1 and launches["_rmsnorm_bwd_kernel"] == 1
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    if with_residual:
        y64, s64 = xkernels.add_rms_norm_ref(x64, r64, w64)
        torch.autograd.backward([y64, s64], [dy.double(), ds.double()])
        assert_close(s, s64, 1e-6)
        assert_close(r.grad, r64.grad, 1e-4)
    else:
        y64 = xkernels.rms_norm_ref(x64, w64)
        y64.backward(dy.double())
    assert_close(y, y64, 1e-5)
    assert_close(x.grad, x64.grad, 1e-4)
    assert_close(w.grad, w64.grad, 1e-4)
    assert len(proxy.allocations) >= 4  # y (+ s), rstd, dx, the dweight partials


# --- rotary ----------------------------------------------------------------------------------------------------------
B, S, HQ, HK, D = 2, 37, 6, 2, 24


def _rotary_inputs(device):
    cos, sin = xkernels.rotary_cos_sin(64, D, theta=10000.0, device=device)
    q = nan_view((B, S, HQ, D), device)
    k = nan_view((B, S, HK, D), device)
    return q, k, cos, sin


@pytest.mark.parametrize("positions", [False, True], ids=["arange", "position_ids"])
def test_rotary_fwd_bwd_stay_inside(device, guard, positions):
    mod = importlib.import_module("xkernels.rotary")  # (the package re-exports functions under some module names)

    q, k, cos, sin = _rotary_inputs(device)
    pos = (torch.arange(S, device=device) + 5).unsqueeze(0).expand(B, S) if positions else None
    q.requires_grad_(), k.requires_grad_()
    dq, dk = nan_view((B, S, HQ, D), device), nan_view((B, S, HK, D), device)
    proxy = guard(mod)
    with count_launches() as launches:
        qo, ko = xkernels.apply_rotary(q, k, cos, sin, position_ids=pos)
        torch.autograd.backward([qo, ko], [dq, dk])
    assert launches["_rotary_kernel"] == 2
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qr, kr = xkernels.apply_rotary_ref(q64, k64, cos.double(), sin.double(), position_ids=pos)
    torch.autograd.backward([qr, kr], [dq.double(), dk.double()])
    for got, ref in ((qo, qr), (ko, kr), (q.grad, q64.grad), (k.grad, k64.grad)):
        assert_close(got, ref, 1e-5)
    assert len(proxy.allocations) >= 4


def test_rotary_in_place_writes_only_its_heads(device):
    """q and k are views (heads 1..H of H+2, head_dim of D+8, rows of a longer sequence) into sentinel storage."""
    cos, sin = xkernels.rotary_cos_sin(64, D, theta=10000.0, device=device)
    raw_q, big_q = sentinel_buffer((B, S + 1, HQ + 2, D + 8), torch.float32, device)
    raw_k, big_k = sentinel_buffer((B, S + 1, HK + 2, D + 8), torch.float32, device)
    q, k = big_q[:, :S, 1 : HQ + 1, :D], big_k[:, :S, 1 : HK + 1, :D]
    gen = torch.Generator().manual_seed(1)
    q.copy_(torch.randn(B, S, HQ, D, generator=gen)), k.copy_(torch.randn(B, S, HK, D, generator=gen))
    before_q, before_k = raw_q.clone(), raw_k.clone()
    qr, kr = xkernels.apply_rotary_ref(q.double(), k.double(), cos.double(), sin.double())
    with count_launches() as launches:
        qo, ko = xkernels.apply_rotary(q, k, cos, sin, inplace=True)
    assert launches["_rotary_kernel"] == 1
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    assert_close(q, qr, 1e-5)
    assert_close(k, kr, 1e-5)
    for raw, before, big, inner in ((raw_q, before_q, big_q, (HQ, q)), (raw_k, before_k, big_k, (HK, k))):
        mask = torch.ones(big.shape, dtype=torch.bool, device=device)
        mask[:, :S, 1 : inner[0] + 1, :D] = False  # the view itself may change; nothing else
        changed = (raw != before).view(big.shape + (4,)).any(-1)
        assert not (changed & mask).any(), f"{int((changed & mask).sum())} elements outside the view were written"


# --- SwiGLU ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_fwd_bwd_stay_inside(device, guard, dtype):
    mod = importlib.import_module("xkernels.swiglu")  # (the package re-exports functions under some module names)

    g = nan_view((ROWS, COLS), device, dtype).requires_grad_()
    u = nan_view((ROWS, COLS), device, dtype).requires_grad_()
    dy = nan_view((ROWS, COLS), device, dtype)
    proxy = guard(mod)
    with count_launches() as launches:
        y = xkernels.swiglu(g, u)
        y.backward(dy)
    assert launches["_swiglu_fwd_kernel"] == 1 and launches["_swiglu_bwd_kernel"] == 1
    tol = 1e-6 if dtype == torch.float32 else 1.6e-2
    assert_close(y, xkernels.swiglu_ref(g.detach().double(), u.detach().double()), tol)
    dg, du = swiglu_bwd_ref(dy.double(), g.detach().double(), u.detach().double())
    assert_close(g.grad, dg, tol)
    assert_close(u.grad, du, tol)
    assert len(proxy.allocations) >= 3


def test_swiglu_fused_stays_inside(device, guard):
    mod = importlib.import_module("xkernels.swiglu")  # (the package re-exports functions under some module names)

    x = nan_view((ROWS, 2 * COLS), device).requires_grad_()
    dy = nan_view((ROWS, COLS), device)
    guard(mod)
    with count_launches() as launches:
        y = xkernels.swiglu_fused(x)
        y.backward(dy)
    assert launches["_swiglu_fwd_kernel"] == 1 and launches["_swiglu_bwd_kernel"] == 1
    x64 = x.detach().double().requires_grad_()
    xkernels.swiglu_fused_ref(x64).backward(dy.double())
    assert_close(y, xkernels.swiglu_fused_ref(x.detach().double()), 1e-6)
    assert_close(x.grad, x64.grad, 1e-6)


def test_swiglu_bwd_into_caller_buffers_with_row_padding(device):
    """``_swiglu_bwd`` writes dg/du through their row stride: padding after every row must stay untouched."""
    from xkernels.swiglu import _swiglu_bwd

    pad = 40
    g, u, dy = (nan_view((ROWS, COLS), device) for _ in range(3))
    raw_g, big_g = sentinel_buffer((ROWS + 1, COLS + pad), torch.float32, device)
    raw_u, big_u = sentinel_buffer((ROWS + 1, COLS + pad), torch.float32, device)
    dg, du = big_g[:ROWS, :COLS], big_u[:ROWS, :COLS]
    with count_launches() as launches:
        _swiglu_bwd(dy, g, u, dg, du, COLS + pad)
    assert launches["_swiglu_bwd_kernel"] == 1
    rg, ru = swiglu_bwd_ref(dy.double(), g.double(), u.double())
    assert_close(dg, rg, 1e-6)
    assert_close(du, ru, 1e-6)
    for raw, big in ((raw_g, big_g), (raw_u, big_u)):
        outside = torch.ones(big.shape, dtype=torch.bool, device=device)
        outside[:ROWS, :COLS] = False
        assert (raw.view(big.shape + (4,))[outside] == SENTINEL).all(), "written outside dg/du"


# --- linear + cross-entropy ------------------------------------------------------------------------------------------
def test_linear_cross_entropy_grads_stay_inside(device, guard):
    mod = importlib.import_module("xkernels.cross_entropy")  # (the package re-exports functions under some module names)

    hidden, vocab = 48, 1000
    h = nan_view((ROWS, hidden), device).requires_grad_()
    w = nan_view((vocab, hidden), device).requires_grad_()  # a read past the vocabulary would read NaN logits
    t = torch.randint(0, vocab, (ROWS,), device=device)
    t[::17] = -100
    proxy = guard(mod)
    with count_launches() as launches:
        loss = xkernels.linear_cross_entropy(h, w, t, logit_scale=0.7, chunk_size=64)
        loss.backward()
    assert launches["_ce_chunk_kernel"] >= 4  # ceil(199 / 64) chunks
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = xkernels.linear_cross_entropy_ref(h64, w64, t, logit_scale=0.7)
    ref.backward()
    assert_close(loss, ref, 1e-5)
    assert_close(h.grad, h64.grad, 1e-4)
    assert_close(w.grad, w64.grad, 1e-4)
    assert len(proxy.allocations) >= 3  # loss, dh, dw


# --- FP8 quantise / cast-transpose -----------------------------------------------------------------------------------
# Smaller than ROWS x COLS (8 cases, each run twice through the interpreter), still odd on both sides: 137 rows =
# one 128-row block + a ragged one, 264 columns = two 128-column blocks + a ragged one.
FP8_ROWS, FP8_COLS = 137, 264


@pytest.mark.parametrize("granularity", ["tensor", "row", "block_1x128", "block_128x128"])
@pytest.mark.parametrize("transpose", [False, True], ids=["quantize", "cast_transpose"])
def test_fp8_cast_stays_inside(device, guard, granularity, transpose):
    mod = importlib.import_module("xkernels.fp8.quant")  # (the package re-exports functions under some module names)
    from xkernels.fp8 import cast_transpose, dequantize, quantize

    x = nan_view((FP8_ROWS, FP8_COLS), device, torch.bfloat16)
    fmt = torch.float8_e4m3fn

    def run():
        if transpose:
            return cast_transpose(x, fmt, granularity, pad_to=16, return_amax=True)
        return quantize(x, fmt, granularity)

    plain = run()  # the same kernels on tightly allocated buffers
    proxy = guard(mod)
    with count_launches() as launches:
        out = run()
    assert launches["_cast_kernel"] == 1
    # Same bytes as the unguarded run: nothing read from outside x (NaN there would change scales and codes).
    for a, b in zip(out, plain):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8) if a.dtype == fmt else a, b.view(torch.uint8) if b.dtype == fmt else b)
    q, s = out[0], out[1]
    assert torch.isfinite(s).all()
    # And the codes decode to x within FP8 E4M3's relative step (3 mantissa bits), relative to each group's amax.
    deq = dequantize(q, s, torch.float64)
    assert ((deq - x.double()).abs() <= x.double().abs() * 2.0**-3 + s.double().max() * 2.0**-6).all()
    if transpose:
        qt, st = out[2], out[3]
        assert qt.shape[0] == FP8_COLS and qt.shape[1] >= FP8_ROWS
        assert torch.isfinite(st).all()
    assert proxy.allocations
