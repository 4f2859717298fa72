"""cross_entropy on ready logits (Liger-Kernel's options): Triton kernel path and torch path against
F.cross_entropy and the float64 reference; in-place gradient opt-in; NaN on bad targets; fp32 gradient scales."""

import pytest
import torch
import torch.nn.functional as F

import xkernels
from xkernels import cross_entropy, cross_entropy_ref, force_backend
from xkernels.testing import count_launches, no_host_sync

pytestmark = pytest.mark.kernels
BACKENDS = ["auto", "torch"]  # auto = Triton kernel (interpreter on CPU, compiled on CUDA)


def _logits(n, vocab, dtype, device, scale=3.0):
    return (torch.randn(n, vocab, device=device) * scale).to(dtype).requires_grad_()


def _targets(n, vocab, device, ignore_every=4):
    t = torch.randint(0, vocab, (n,), device=device)
    if ignore_every:
        t[::ignore_every] = -100
    return t


def _upstream(loss):
    """A non-trivial incoming gradient: random per token for "none", 1.7 for a scalar."""
    return torch.randn_like(loss) if loss.dim() else torch.tensor(1.7, device=loss.device)


def _ref_grad(x, t, g, **kw):
    xd = x.detach().double().requires_grad_()
    loss = cross_entropy_ref(xd, t, **kw)
    main = loss[0] if isinstance(loss, tuple) else loss
    return loss, torch.autograd.grad(main, xd, g.double())[0]


# options torch has: against F.cross_entropy itself (float64)
TORCH_CASES = {
    "plain-mean": dict(),
    "smooth-sum": dict(label_smoothing=0.1, reduction="sum"),
    "weight-smooth-mean": dict(weight=True, label_smoothing=0.2),
    "weight-smooth-none": dict(weight=True, label_smoothing=0.05, reduction="none"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TORCH_CASES)
def test_matches_torch_cross_entropy(backend, case, device):
    """fp32, 21 x 203 (odd), every 4th target ignored, against F.cross_entropy in float64 (weights and smoothing
    with torch's "mean": divided by the summed target weights, smoothing term included)."""
    kw = dict(TORCH_CASES[case])
    x, t = _logits(21, 203, torch.float32, device), _targets(21, 203, device)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(203, device=device) + 0.5
    with force_backend(backend):
        loss = cross_entropy(x, t, **kw)
    g = _upstream(loss)
    (dx,) = torch.autograd.grad(loss, x, g)
    xd = x.detach().double().requires_grad_()
    wd = kw.pop("weight").double() if "weight" in kw else None
    expected = F.cross_entropy(xd, t, weight=wd, **kw)
    (dx_ref,) = torch.autograd.grad(expected, xd, g.double())
    torch.testing.assert_close(loss.double(), expected, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-7, rtol=1e-5)


OPTION_CASES = {
    "softcap": dict(softcap=5.0),
    "softcap-zloss-smooth-sum": dict(softcap=4.0, lse_square_scale=1e-3, label_smoothing=0.1, reduction="sum"),
    "all-weight-mean": dict(softcap=6.0, lse_square_scale=1e-2, label_smoothing=0.1, weight=True),
    "all-none": dict(softcap=3.0, lse_square_scale=1e-2, label_smoothing=0.2, weight=True, reduction="none"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTION_CASES)
def test_options_match_float64_reference(backend, case, device):
    """Soft cap, z-loss and their combinations (which torch lacks) against the float64 reference; the returned
    z-loss is the reference's; 21 x 203 fp32."""
    kw = dict(OPTION_CASES[case])
    x, t = _logits(21, 203, torch.float32, device), _targets(21, 203, device)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(203, device=device) + 0.5
    with force_backend(backend):
        loss, z_loss = cross_entropy(x, t, return_z_loss=True, **kw)
    assert loss.dtype == torch.float32 and not z_loss.requires_grad
    g = _upstream(loss)
    (dx,) = torch.autograd.grad(loss, x, g)
    (loss_ref, z_ref), dx_ref = _ref_grad(x, t, g, return_z_loss=True, **kw)
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(z_loss.double(), z_ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-7, rtol=1e-5)
    if kw.get("reduction") == "none":
        assert (loss[t == -100] == 0).all()


def test_reference_is_torch_where_torch_has_the_option():
    """The reference's CE part is F.cross_entropy (weights + smoothing + ignore), and the z-loss adds lam * lse^2."""
    x = torch.randn(30, 17, dtype=torch.float64)
    t = _targets(30, 17, "cpu", ignore_every=3)
    w = torch.rand(17, dtype=torch.float64) + 0.1
    got = cross_entropy_ref(x, t, weight=w, label_smoothing=0.3, lse_square_scale=0.1)
    valid = t != -100
    z = 0.1 * (torch.logsumexp(x, -1)[valid] ** 2).mean()
    torch.testing.assert_close(got, F.cross_entropy(x, t, weight=w, label_smoothing=0.3) + z)


@pytest.mark.parametrize(
    "backend, dtype", [("auto", torch.bfloat16), ("torch", torch.bfloat16), ("torch", torch.float16)], ids=str
)  # (fp16 through the interpreter costs seconds; the kernel's load/store casts are the same code)
def test_half_precision(backend, dtype, device):
    """bf16/fp16 logits, every option: fp32 loss equal to the float64 reference of the same (rounded) logits, the
    gradient in the input dtype within one rounding of it (the kernel computes in fp32, rounds dl once)."""
    x, t = _logits(37, 131, dtype, device), _targets(37, 131, device, ignore_every=5)
    kw = dict(softcap=5.0, lse_square_scale=1e-3, label_smoothing=0.1, weight=torch.rand(131, device=device) + 0.5)
    with force_backend(backend):
        loss = cross_entropy(x, t, **kw)
    (dx,) = torch.autograd.grad(loss, x)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    loss_ref, dx_ref = _ref_grad(x, t, torch.tensor(1.0), **kw)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(dx.double(), dx_ref, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_and_strided_logits(backend, device):
    """One row; 3-D logits; a transposed (non-contiguous) view; int32 targets; vocab 1."""
    with force_backend(backend):
        for x, t in (
            (_logits(1, 7, torch.float32, device), torch.tensor([3], device=device)),
            (_logits(2 * 3 * 11, 1, torch.float32, device)[:, :1], torch.zeros(66, dtype=torch.int64, device=device)),
        ):
            loss = cross_entropy(x, t, label_smoothing=0.1)
            torch.testing.assert_close(loss, F.cross_entropy(x, t, label_smoothing=0.1))
        base = torch.randn(19, 2, 5, device=device, requires_grad=True)
        x = base.transpose(0, 2)  # (5, 2, 19), last-dim stride 10
        t = torch.randint(0, 19, (5, 2), device=device, dtype=torch.int32)
        loss = cross_entropy(x, t, reduction="none", softcap=2.0)
        g = torch.randn(5, 2, device=device)
        (dx,) = torch.autograd.grad(loss, base, g)
    loss_ref, dx_ref = _ref_grad(x, t, g, reduction="none", softcap=2.0)
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dx.double(), dx_ref.transpose(0, 2), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_is_zero_not_nan(backend, reduction, device):
    x = _logits(6, 20, torch.float32, device)
    t = torch.full((6,), -100, device=device)
    with force_backend(backend):
        loss = cross_entropy(x, t, reduction=reduction, weight=torch.rand(20, device=device), label_smoothing=0.1)
    (dx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend, device):
    """Opt-in: the gradient lands in the logits' storage (no second (N, V) buffer), same values as the default;
    a leaf's storage is never overwritten; an autograd node that saved the logits raises instead of reading
    gradients as logits; the default leaves the logits untouched."""
    w = torch.randn(16, 50, device=device, requires_grad=True)
    h = torch.randn(9, 16, device=device)
    t = _targets(9, 50, device, ignore_every=3)
    grads = {}
    for inplace in (False, True):
        logits = h @ w
        before = logits.detach().clone()
        with force_backend(backend):
            loss = cross_entropy(logits, t, label_smoothing=0.1, softcap=5.0, inplace_backward=inplace)
        (grads[inplace],) = torch.autograd.grad(loss, logits, torch.tensor(0.7, device=device), retain_graph=True)
        assert torch.equal(logits.detach(), before) != inplace  # overwritten only when asked
        if inplace:
            assert grads[True].data_ptr() == logits.data_ptr()  # the gradient is the logits' storage
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # a second backward
                torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grads[True], grads[False])

    leaf = torch.randn(9, 50, device=device, requires_grad=True)
    kept = leaf.detach().clone()
    with force_backend(backend):
        cross_entropy(leaf, t, inplace_backward=True).backward()
    assert torch.equal(leaf.detach(), kept)

    logits = torch.exp(h @ w)  # exp saves its output for its backward
    with force_backend(backend):
        loss = cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_are_nan_without_a_sync(backend, device):
    """A target outside [0, V) (not ignore_index): that row's loss and gradient are NaN, the others exact, no
    host sync; the scalar reductions are NaN.  check_inputs() raises before any work."""
    x = _logits(4, 10, torch.float32, device)
    bad = torch.tensor([3, 10, -100, -1], device=device)
    with force_backend(backend), no_host_sync():
        per_row = cross_entropy(x, bad, reduction="none", label_smoothing=0.1)
        mean = cross_entropy(x, bad)
        (dx,) = torch.autograd.grad(per_row, x, torch.ones(4, device=device))
    assert torch.isnan(mean) and torch.isnan(per_row[[1, 3]]).all() and per_row[2] == 0
    torch.testing.assert_close(per_row[0], F.cross_entropy(x[:1], bad[:1], label_smoothing=0.1))
    assert torch.isnan(dx[[1, 3]]).all() and torch.isfinite(dx[[0, 2]]).all()
    with force_backend(backend), xkernels.check_inputs():
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
            cross_entropy(x, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_scales_are_fp32(backend, device):
    """The mean's 1/n and the upstream gradient multiply in fp32 before the one rounding to bf16.  With n = 3 a
    bf16-rounded 1/3 (0.333984) made every gradient 0.195% too large; here the mean's gradient (and the sum's
    under an upstream 1/3) match the exact gradient to rounding noise, without that bias.  Measured on the
    non-target logits (6000 different values; the 3 target entries would dominate with correlated roundings)."""
    x, t = _logits(3, 2000, torch.bfloat16, device, scale=1.0), torch.tensor([5, 17, 1999], device=device)
    with force_backend(backend):
        (d_mean,) = torch.autograd.grad(cross_entropy(x, t), x)
        (d_third,) = torch.autograd.grad(cross_entropy(x, t, reduction="sum"), x, torch.tensor(1 / 3, device=device))
    _, exact = _ref_grad(x, t, torch.tensor(1.0))
    off_target = torch.ones_like(exact, dtype=torch.bool)
    off_target[torch.arange(3), t] = False
    for got in (d_mean, d_third):
        err, ref = (got.double() - exact)[off_target], exact[off_target]
        bias = (err * ref.sign()).sum() / ref.abs().sum()
        assert abs(bias) < 3e-4, f"systematic gradient error {bias:.2e}"


def test_bad_input():
    x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="logits must have dtype"):
        cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="target must have shape"):
        cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="target must be an int64"):
        cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        cross_entropy(x, t, softcap=0.0)
    with pytest.raises(TypeError, match="softcap must be None or a finite float"):
        cross_entropy(x, t, softcap=float("inf"))
    with pytest.raises(ValueError, match="lse_square_scale must be >= 0"):
        cross_entropy(x, t, lse_square_scale=-1e-4)
    with pytest.raises(ValueError, match=r"weight \(class weights\) must have shape \(10,\)"):
        cross_entropy(x, t, weight=torch.ones(9))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cross_entropy(x, t, ignore_index=-1.0)
    with pytest.raises(ValueError, match="empty"):
        cross_entropy(x[:0], t[:0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_traces_under_torch_compile_fullgraph(backend, device):
    """One graph, no breaks, the opaque custom op in it; values and gradients match eager.  Reduction "none"
    (both custom ops, per-token upstream gradient); the scalar reductions are tests/op_cases.py's case."""
    reduction = "none"
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, t = _logits(20, 30, torch.float32, device), _targets(20, 30, device, ignore_every=3)
    w = torch.rand(30, device=device) + 0.5

    def f(x, t):
        loss, z = cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, softcap=4.0, lse_square_scale=1e-2,
                                weight=w, return_z_loss=True)  # fmt: skip
        return (loss * torch.linspace(0.5, 1.5, loss.numel(), device=device).view(loss.shape)).sum() + z.sum()

    torch._dynamo.reset()
    with force_backend(backend):
        out = torch.compile(f, fullgraph=True, backend=recording_backend)(x, t)
    (grad,) = torch.autograd.grad(out, x)
    with force_backend(backend):
        expected = f(x, t)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, x)[0])
    assert len(graphs) == 1 and "xkernels.cross_entropy_fwd" in graphs[0]


def test_kernel_path_launches(device):
    x, t = _logits(5, 40, torch.float32, device), _targets(5, 40, device)
    with force_backend("triton"), count_launches() as launches:
        cross_entropy(x, t, softcap=3.0).backward()
    assert launches["_ce_chunk_kernel"] >= 1


def test_inplace_backward_saves_the_gradient_buffer():
    """Torch path, 512 x 2048 fp32 logits (4 MiB): by default forward + backward allocate at least one (N, V)
    gradient buffer; with inplace_backward=True the peak stays under half of that (the logits are the buffer)."""
    from xkernels.cross_entropy import measure_peak_memory

    w = torch.randn(16, 2048, requires_grad=True)
    h = torch.randn(512, 16)
    t = _targets(512, 2048, "cpu")

    def peak(inplace):
        def step():
            logits = h @ w
            cross_entropy(logits, t, inplace_backward=inplace).backward()

        with force_backend("torch"):
            step()
            return measure_peak_memory(step)

    default, inplace = peak(False), peak(True)
    logits_bytes = 512 * 2048 * 4
    assert default >= 2 * logits_bytes  # logits + their gradient
    assert inplace < default - 0.9 * logits_bytes, (inplace, default)
