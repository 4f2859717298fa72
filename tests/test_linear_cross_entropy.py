"""linear_cross_entropy: chunked kernel path and chunked torch path against the unfused float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from xkernels import force_backend, linear_cross_entropy, linear_cross_entropy_ref
from xkernels.cross_entropy import default_chunk_size, measure_peak_memory, unfused_cross_entropy

BACKENDS = ["auto", "torch"]  # auto = Triton kernel (interpreter on CPU, compiled on CUDA)


def _problem(n, vocab, hidden, dtype, device, ignore_every=0):
    h = torch.randn(n, hidden, device=device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=device)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, t


def _grads(loss, h, w):
    g = torch.randn_like(loss) if loss.dim() else torch.tensor(1.7, device=loss.device)
    return g, torch.autograd.grad(loss, (h, w), g)


def _reference(h, w, t, g, **kw):
    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    loss = linear_cross_entropy_ref(hd, wd, t, **kw)
    return loss, torch.autograd.grad(loss, (hd, wd), g.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fp32_matches_float64_reference(backend, reduction, z_loss, device):
    # 45 tokens in chunks of 16: a ragged last chunk; every 4th target ignored; vocab 203 (odd)
    h, w, t = _problem(45, 203, 32, torch.float32, device, ignore_every=4)
    kw = dict(logit_scale=0.37, reduction=reduction, z_loss=z_loss)
    with force_backend(backend):
        loss = linear_cross_entropy(h, w, t, chunk_size=16, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (() if reduction != "none" else t.shape)
    g, (dh, dw) = _grads(loss, h, w)
    loss_ref, (dh_ref, dw_ref) = _reference(h, w, t, g, **kw)
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dh.double(), dh_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dw.double(), dw_ref, atol=2e-6, rtol=1e-5)
    if reduction == "none":
        assert (loss[t == -100] == 0).all()


def test_matches_torch_cross_entropy(device):
    """Against F.cross_entropy itself (with the z-loss off), 3-D hidden, int32 targets."""
    h = torch.randn(2, 13, 24, device=device, requires_grad=True)
    w = torch.randn(77, 24, device=device, requires_grad=True)
    t = torch.randint(0, 77, (2, 13), device=device)
    t[0, :5] = 7
    t[1, 3] = -1
    loss = linear_cross_entropy(h, w, t.int(), logit_scale=2.0, ignore_index=-1)
    expected = F.cross_entropy((h @ w.t() * 2.0).reshape(-1, 77), t.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(expected, (h, w)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(dtype, backend, device):
    """bf16/fp16 inputs: loss in fp32 close to the float64 loss of the same (rounded) inputs; gradients
    in the input dtype within a few half-precision ulps of the norm (dl is rounded once to the dtype)."""
    h, w, t = _problem(70, 300, 64, dtype, device, ignore_every=5)
    with force_backend(backend):
        loss = linear_cross_entropy(h, w, t, logit_scale=0.5, z_loss=1e-3, chunk_size=32)
    assert loss.dtype == torch.float32
    g, (dh, dw) = _grads(loss, h, w)
    assert dh.dtype == dtype and dw.dtype == dtype
    loss_ref, (dh_ref, dw_ref) = _reference(h, w, t, g, logit_scale=0.5, z_loss=1e-3)
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-2, rtol=1e-2)
    for got, ref in ((dh, dh_ref), (dw, dw_ref)):
        rel = (got.double() - ref).norm() / ref.norm()
        assert rel < 2e-2, f"relative gradient error {rel:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_not_nan(backend, reduction, device):
    h, w, _ = _problem(9, 50, 16, torch.float32, device)
    t = torch.full((9,), -100, device=device)
    with force_backend(backend):
        loss = linear_cross_entropy(h, w, t, reduction=reduction, z_loss=1e-3)
    dh, dw = torch.autograd.grad(loss.sum(), (h, w))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunking_does_not_change_the_result(chunk, device):
    h, w, t = _problem(50, 97, 16, torch.float32, device, ignore_every=3)
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk)
    dh, dw = torch.autograd.grad(loss, (h, w))
    loss_ref, (dh_ref, dw_ref) = _reference(h, w, t, torch.tensor(1.0), reduction="mean")
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh.double(), dh_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw.double(), dw_ref, atol=1e-6, rtol=1e-5)


def test_partial_requires_grad_and_no_grad(device):
    h, w, t = _problem(20, 40, 8, torch.float32, device)
    w_frozen = w.detach()
    (dh,) = torch.autograd.grad(linear_cross_entropy(h, w_frozen, t), (h,))
    (dh_ref,) = torch.autograd.grad(unfused_cross_entropy(h, w_frozen, t), (h,))
    torch.testing.assert_close(dh, dh_ref)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, reduction="none")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, unfused_cross_entropy(h, w, t, reduction="none").detach())


def test_strided_hidden_and_tied_weight(device):
    """A transposed hidden (non-contiguous) and the weight used twice (tied embedding) accumulate correctly."""
    base = torch.randn(16, 11, device=device, requires_grad=True)
    h = base.t()  # (11, 16), last-dim stride 11
    w = torch.randn(30, 16, device=device, requires_grad=True)
    t = torch.randint(0, 30, (11,), device=device)
    loss = linear_cross_entropy(h, w, t) + w.sum()
    loss.backward()
    base2, w2 = base.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (unfused_cross_entropy(base2.t(), w2, t) + w2.sum()).backward()
    torch.testing.assert_close(base.grad, base2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast (fp32 master weights, bf16 compute) the op behaves like a matmul in bf16: it equals the
    explicit bf16 call, and gradients come back in the parameters' own fp32."""
    h = torch.randn(37, 32, requires_grad=True)
    w = (torch.randn(90, 32) * 0.2).requires_grad_()
    t = torch.randint(0, 90, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, logit_scale=0.5)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    expected = linear_cross_entropy(hb, wb, t, logit_scale=0.5)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.grad, hb.grad.float())
    torch.testing.assert_close(w.grad, wb.grad.float())


def test_bad_input():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="hidden size 9"):
        linear_cross_entropy(h, torch.randn(10, 9), t)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        linear_cross_entropy(h, w, torch.tensor([0, -5, 1, 2]))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(TypeError, match="targets must be an int64"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(TypeError, match="weight dtype"):
        linear_cross_entropy(h, w.half(), t)
    with pytest.raises(TypeError, match="hidden must have dtype"):
        linear_cross_entropy(h.long(), w, t)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(h, w[0], t)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        linear_cross_entropy(h, w, t, z_loss=-1.0)
    with pytest.raises(TypeError, match="logit_scale must be a finite float"):
        linear_cross_entropy(h, w, t, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="empty"):
        linear_cross_entropy(h[:0], w, t[:0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cuda"):
            linear_cross_entropy(h, w.cuda(), t)


def test_default_chunk_size():
    assert default_chunk_size(16384, 129280, 1536) == 2048
    assert default_chunk_size(100, 129280, 1536) == 100
    assert default_chunk_size(10_000, 32000, 64) == 256


def test_peak_memory_far_below_unfused():
    """The chunked torch path never holds the (tokens, vocab) logits: at 2048 tokens x 4096 vocab x 64
    hidden (fp32 logits 32 MiB, chunks of 256 tokens) its forward+backward peak stays under 25% of
    F.cross_entropy's."""
    h, w, t = _problem(2048, 4096, 64, torch.float32, "cpu")

    def run(fn):
        def step():
            h.grad = w.grad = None
            fn(h, w, t, logit_scale=0.25).backward()

        with force_backend("torch"):
            step()  # warm-up (lazy allocations)
            return measure_peak_memory(step)

    fused, unfused = run(linear_cross_entropy), run(unfused_cross_entropy)
    assert unfused > 2048 * 4096 * 4 * 2  # at least logits + their gradient
    assert fused < 0.25 * unfused, (fused, unfused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traces_under_torch_compile_fullgraph(backend, reduction, device):
    """One graph, no breaks; on the kernel path the op is the opaque custom op; values and gradients match."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    h, w, t = _problem(40, 70, 16, torch.float32, device, ignore_every=3)

    def f(h, w, t):
        loss = linear_cross_entropy(h, w, t, logit_scale=0.5, reduction=reduction, z_loss=1e-3, chunk_size=16)
        return (loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)).sum()

    torch._dynamo.reset()
    with force_backend(backend):
        out = torch.compile(f, fullgraph=True, backend=recording_backend)(h, w, t)
    grads = torch.autograd.grad(out, (h, w))
    with force_backend(backend):
        expected = f(h, w, t)
    expected_grads = torch.autograd.grad(expected, (h, w))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, expected_grads)
    assert len(graphs) == 1 and "xkernels.linear_cross_entropy_fwd" in graphs[0]
