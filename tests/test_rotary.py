"""Rotary embedding: Triton kernel (interpreter on CPU, CUDA when present) vs the reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xkernels
import xkernels.rotary as rotary_mod
from xkernels import apply_rotary, apply_rotary_ref, rotary_cos_sin

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max|actual - float64 reference| / max|reference|: fp32 ~1e-5; fp16/bf16: one rounding of the fp32 result to
# nearest (half an ulp: 2^-11 / 2^-9, plus fp32 slack) -- on both paths, the interpreter rounding like a GPU
# (xkernels.testing.round_casts_like_gpu, installed by tests/conftest.py).
TOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check_parity(q, k, cos, sin, position_ids=None):
    """Forward + backward of apply_rotary vs the float64 reference (autograd) on the same inputs."""
    dtype = q.dtype
    qs, ks = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = apply_rotary(qs, ks, cos, sin, position_ids)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_ref, k_ref = apply_rotary_ref(q64, k64, cos, sin, position_ids)
    torch.autograd.backward([q_ref, k_ref], [dq_out.double(), dk_out.double()])

    for name, a, b in (("q", q_out, q_ref), ("k", k_out, k_ref), ("dq", qs.grad, q64.grad), ("dk", ks.grad, k64.grad)):
        assert a.dtype == dtype and a.shape == b.shape, name
        err = rel_err(a, b)
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.1e} ({dtype})"
    return q_out.detach(), k_out.detach()


def make_qk(device, dtype, batch, seq, n_q, n_kv, head_dim):
    q = torch.randn(batch, seq, n_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seq, n_kv, head_dim, device=device, dtype=dtype)
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_q, n_kv", [(4, 4), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_parity_forward_backward(device, dtype, n_q, n_kv, head_dim):
    cos, sin = rotary_cos_sin(32, head_dim, device=device)
    q, k = make_qk(device, dtype, 2, 5, n_q, n_kv, head_dim)
    check_parity(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_128_single_token_batch(device, dtype):
    cos, sin = rotary_cos_sin(8, 128, device=device)
    q, k = make_qk(device, dtype, 1, 1, 3, 1, 128)
    check_parity(q, k, cos, sin)


def test_model_shapes_head_dim_64(device):
    """The model's head layout: 24 q heads / 8 kv heads, head_dim 64 (short sequence for speed)."""
    cos, sin = rotary_cos_sin(64, 64, device=device)
    q, k = make_qk(device, torch.bfloat16, 1, 3, 24, 8, 64)
    check_parity(q, k, cos, sin)


@pytest.mark.parametrize(
    "positions",
    [
        [[37], [5]],  # KV-cache decoding: one new token per sequence at different offsets
        [[3, 4, 5, 6], [60, 61, 62, 63]],  # chunks at an offset; the last row of the table is used
        [[0, 1, 2, 0], [0, 1, 0, 1]],  # packed sequences: positions restart
    ],
    ids=["decode", "offset", "packed"],
)
def test_position_ids(device, positions):
    position_ids = torch.tensor(positions, device=device)
    cos, sin = rotary_cos_sin(64, 16, device=device)
    q, k = make_qk(device, torch.float32, 2, position_ids.shape[1], 6, 2, 16)
    check_parity(q, k, cos, sin, position_ids)


def test_position_ids_broadcast_batch_and_int32(device):
    cos, sin = rotary_cos_sin(32, 16, device=device)
    q, k = make_qk(device, torch.float32, 3, 4, 2, 1, 16)
    pos = torch.tensor([[10, 11, 12, 13]], device=device, dtype=torch.int32)
    check_parity(q, k, cos, sin, pos)
    # Same as explicit positions per batch row.
    explicit = torch.arange(10, 14, device=device).expand(3, 4)
    a = apply_rotary(q, k, cos, sin, pos)
    b = apply_rotary(q, k, cos, sin, explicit)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_default_positions_equal_arange(device):
    cos, sin = rotary_cos_sin(16, 16, device=device)
    q, k = make_qk(device, torch.float32, 2, 5, 2, 2, 16)
    a = apply_rotary(q, k, cos, sin)
    b = apply_rotary(q, k, cos, sin, torch.arange(5, device=device).expand(2, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_general_tables_use_exact_transpose_in_backward(device):
    """Tables whose halves differ (not rotate-half layout) still match the reference fwd and bwd."""
    cos = torch.randn(8, 16, device=device)
    sin = torch.randn(8, 16, device=device)
    q, k = make_qk(device, torch.float32, 1, 8, 2, 1, 16)
    check_parity(q, k, cos, sin)


class KernelSpy:
    """Wraps the Triton kernel to record the tensors it was launched with."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(args)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_views_of_fused_qkv_run_without_copy(device, dtype, monkeypatch):
    batch, seq, n_q, n_kv, head_dim = 2, 3, 6, 2, 16
    qkv = torch.randn(batch, seq, n_q + 2 * n_kv, head_dim, device=device, dtype=dtype, requires_grad=True)
    q, k = qkv[:, :, :n_q], qkv[:, :, n_q : n_q + n_kv]
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = rotary_cos_sin(seq, head_dim, device=device)
    spy = KernelSpy(rotary_mod._rotary_kernel)
    monkeypatch.setattr(rotary_mod, "_rotary_kernel", spy)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    g_q, g_k = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [g_q, g_k])
    if xkernels.use_triton(q):
        assert len(spy.launches) == 2  # one forward (q and k together), one backward
        assert spy.launches[0][0].data_ptr() == q.data_ptr() and spy.launches[0][1].data_ptr() == k.data_ptr()

    qkv64 = qkv.detach().double().requires_grad_()
    q_ref, k_ref = apply_rotary_ref(qkv64[:, :, :n_q], qkv64[:, :, n_q : n_q + n_kv], cos, sin)
    torch.autograd.backward([q_ref, k_ref], [g_q.double(), g_k.double()])
    for name, a, b in (("q", q_out, q_ref), ("k", k_out, k_ref), ("dqkv", qkv.grad, qkv64.grad)):
        assert rel_err(a, b) <= TOL[dtype], name
    assert qkv.grad[:, :, n_q + n_kv :].abs().max() == 0  # v gets no gradient


def test_strided_seq_head_layout(device):
    """(batch, heads, seq, dim) storage viewed as (batch, seq, heads, dim)."""
    q = torch.randn(2, 4, 5, 16, device=device).transpose(1, 2)
    k = torch.randn(2, 2, 5, 16, device=device).transpose(1, 2)
    cos, sin = rotary_cos_sin(5, 16, device=device)
    check_parity(q, k, cos, sin)


def test_non_contiguous_last_dim_is_copied(device):
    q = torch.randn(1, 3, 2, 32, device=device)[..., ::2]
    k = torch.randn(1, 3, 1, 16, device=device)
    assert q.stride(-1) == 2
    cos, sin = rotary_cos_sin(3, 16, device=device)
    check_parity(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inplace_overwrites_fused_qkv(device, dtype):
    qkv = torch.randn(2, 4, 6 + 2 * 2, 16, device=device, dtype=dtype)
    original = qkv.clone()
    q, k = qkv[:, :, :6], qkv[:, :, 6:8]
    cos, sin = rotary_cos_sin(16, 16, device=device)
    pos = torch.tensor([[0, 1, 2, 3], [9, 10, 11, 12]], device=device)
    q_ref, k_ref = apply_rotary_ref(original[:, :, :6], original[:, :, 6:8], cos, sin, pos)
    q_out, k_out = apply_rotary(q, k, cos, sin, pos, inplace=True)
    assert q_out is q and k_out is k
    torch.testing.assert_close(qkv[:, :, :6], q_ref, **_close(dtype))
    torch.testing.assert_close(qkv[:, :, 6:8], k_ref, **_close(dtype))
    assert torch.equal(qkv[:, :, 8:], original[:, :, 8:])  # v untouched


def _close(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}


@pytest.mark.parametrize("as_views", [True, False], ids=["views", "tensors"])
def test_inplace_autograd_matches_out_of_place(device, as_views):
    cos, sin = rotary_cos_sin(8, 16, device=device)
    leaf = torch.randn(2, 3, 8, 16, device=device, requires_grad=True)
    weights = torch.randn(2, 3, 8, 16, device=device)

    def loss(inplace):
        qkv = leaf * 1.5  # non-leaf, so it may be overwritten
        if as_views:
            q, k = qkv[:, :, :4], qkv[:, :, 4:6]
        else:
            q, k = qkv[:, :, :4].clone(), qkv[:, :, 4:6].clone()
        q_out, k_out = apply_rotary(q, k, cos, sin, inplace=inplace)
        return (q_out * weights[:, :, :4]).sum() + (k_out * weights[:, :, 4:6]).sum()

    grads = []
    for inplace in (False, True):
        leaf.grad = None
        loss(inplace).backward()
        grads.append(leaf.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_inplace_under_no_grad(device):
    q, k = make_qk(device, torch.float32, 1, 2, 2, 1, 16)
    expected = apply_rotary_ref(q, k, *rotary_cos_sin(2, 16, device=device))
    with torch.no_grad():
        apply_rotary(q, k, *rotary_cos_sin(2, 16, device=device), inplace=True)
    torch.testing.assert_close(q, expected[0])
    torch.testing.assert_close(k, expected[1])


def test_inplace_is_seen_by_autograd(device):
    """Overwriting a tensor that another op saved for backward must be detected, not silently used."""
    w = torch.randn(1, 2, 2, 16, device=device, requires_grad=True)
    q, k = make_qk(device, torch.float32, 1, 2, 2, 1, 16)
    loss = (q * w).sum()  # saves q
    apply_rotary(q, k, *rotary_cos_sin(2, 16, device=device), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_is_inverse_rotation(device):
    """The gradient of <rotate(x), g> w.r.t. x is g rotated by minus the angle."""
    cos, sin = rotary_cos_sin(6, 16, device=device)
    q, k = make_qk(device, torch.float32, 1, 6, 2, 1, 16)
    q.requires_grad_()
    k.requires_grad_()
    g_q, g_k = torch.randn_like(q), torch.randn_like(k)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    torch.autograd.backward([q_out, k_out], [g_q, g_k])
    inv_q, inv_k = apply_rotary_ref(g_q, g_k, cos, -sin)
    torch.testing.assert_close(q.grad, inv_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.grad, inv_k, rtol=1e-5, atol=1e-5)


# --- tables ---------------------------------------------------------------------------------------


def test_rotary_cos_sin_tables(device):
    cos, sin = rotary_cos_sin(131072, 64, device=device)
    assert cos.shape == sin.shape == (131072, 64) and cos.dtype == sin.dtype == torch.float32
    assert cos.device.type == torch.device(device).type
    assert torch.equal(cos[:, :32], cos[:, 32:]) and torch.equal(sin[:, :32], sin[:, 32:])
    for p in (0, 1, 4097, 131071):  # float64 formula at a few positions, including the largest
        inv_freq = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
        angle = p * inv_freq
        torch.testing.assert_close(cos[p, :32].cpu().double(), angle.cos(), rtol=0, atol=1e-7)
        torch.testing.assert_close(sin[p, :32].cpu().double(), angle.sin(), rtol=0, atol=1e-7)
    torch.testing.assert_close(cos[0], torch.ones(64, device=device))
    assert sin[0].abs().max() == 0


def test_rotary_cos_sin_theta():
    cos, sin = rotary_cos_sin(3, 4, theta=10000.0)
    torch.testing.assert_close(cos[2, 1], torch.tensor(math.cos(2 * 10000.0 ** -0.5)))
    torch.testing.assert_close(sin[2, 0], torch.tensor(math.sin(2.0)))


# --- property tests -------------------------------------------------------------------------------


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 5),
    n_kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 8]),
    half_dim=st.integers(1, 20),
    dtype=st.sampled_from(DTYPES),
    offset=st.one_of(st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_parity(device, batch, seq, n_kv, group, half_dim, dtype, offset, seed):
    torch.manual_seed(seed)  # the helpers' draws (weights, grads) come from the drawn seed too: failures replay
    gen = torch.Generator().manual_seed(seed)
    head_dim = 2 * half_dim
    q = torch.randn(batch, seq, n_kv * group, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, seq, n_kv, head_dim, generator=gen).to(device=device, dtype=dtype)
    cos, sin = rotary_cos_sin(seq + 40, head_dim, theta=10000.0, device=device)
    pos = None
    if offset is not None:
        starts = torch.randint(0, offset + 1, (batch, 1), generator=gen)
        pos = (starts + torch.arange(seq)).to(device)
    q_out, _ = check_parity(q, k, cos, sin, pos)
    # A rotation preserves each (x1[i], x2[i]) pair's norm, so each head's norm (up to rounding).
    norms = q.double().norm(dim=-1)
    assert ((q_out.double().norm(dim=-1) - norms).abs() <= 4 * TOL[dtype] * norms + 1e-6).all()


# --- bad input ------------------------------------------------------------------------------------


def _args(**over):
    q = torch.randn(2, 4, 6, 16)
    k = torch.randn(2, 4, 2, 16)
    cos, sin = rotary_cos_sin(8, 16)
    args = {"q": q, "k": k, "cos": cos, "sin": sin, "position_ids": None}
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, match",
    [
        ({"cos": torch.randn(8, 15), "sin": torch.randn(8, 15)}, ValueError, r"rotary_dim\) must be even .* got 15"),
        ({"cos": torch.randn(8, 18), "sin": torch.randn(8, 18)}, ValueError, "at most head_dim=16"),
        ({"q": torch.randn(2, 4, 16)}, ValueError, r"q must have shape \(batch, seq, n_q_heads, head_dim\)"),
        ({"k": torch.randn(2, 4, 16)}, ValueError, "k must have shape"),
        ({"k": torch.randn(3, 4, 2, 16)}, ValueError, "k shape .* must match q shape"),
        ({"k": torch.randn(2, 4, 2, 8)}, ValueError, "k shape .* must match q shape"),
        ({"k": torch.randn(2, 4, 2, 16, dtype=torch.float16)}, TypeError, "k dtype .* differs from q dtype"),
        ({"q": torch.ones(2, 4, 6, 16, dtype=torch.int64)}, TypeError, "q must have dtype"),
        ({"k": torch.ones(2, 4, 2, 16, dtype=torch.int32)}, TypeError, "k must have dtype"),
        ({"q": torch.randn(2, 0, 6, 16), "k": torch.randn(2, 0, 2, 16)}, ValueError, "q is empty"),
        ({"k": torch.randn(2, 4, 0, 16)}, ValueError, "k is empty"),
        ({"cos": rotary_cos_sin(8, 16)[0].half()}, TypeError, "cos must have dtype in \\(float32\\)"),
        ({"cos": rotary_cos_sin(3, 16)[0], "sin": rotary_cos_sin(3, 16)[1]}, ValueError, "cos/sin have 3 positions"),
        ({"cos": torch.zeros(8, 16, 1)}, ValueError, r"cos must have shape \(max_positions, rotary_dim\)"),
        ({"cos": rotary_cos_sin(8, 8)[0]}, ValueError, "cos .* and sin .* must have the same shape"),
        ({"sin": rotary_cos_sin(9, 16)[1]}, ValueError, "cos .* and sin .* must have the same shape"),
        ({"sin": torch.zeros(8, 16, device="meta")}, ValueError, "sin is on meta"),
        ({"k": torch.randn(2, 4, 2, 16, device="meta")}, ValueError, "k is on meta"),
        ({"position_ids": torch.tensor([[0, 1, 2, 8]] * 2)}, ValueError, r"position_ids must lie in \[0, 8\).*\[0, 8\]"),
        ({"position_ids": torch.tensor([[0, -1, 2, 3]] * 2)}, ValueError, r"position_ids must lie in \[0, 8\)"),
        ({"position_ids": torch.zeros(2, 4)}, TypeError, "position_ids must be an int64"),
        ({"position_ids": torch.zeros(2, 3, dtype=torch.long)}, ValueError, r"position_ids must have shape \(2, 4\)"),
        ({"position_ids": [[0, 1, 2, 3]] * 2}, TypeError, "position_ids must be a torch.Tensor"),
    ],
    ids=["odd_rotary_dim", "rotary_gt_head", "q_3d", "k_3d", "batch", "head_dim", "k_dtype", "int_q", "int_k", "empty_q", "empty_k",
         "cos_fp16", "short_tables", "table_3d", "table_dim", "sin_shape", "sin_device", "k_device", "pos_high", "pos_negative",
         "pos_float", "pos_shape", "pos_list"],
)  # fmt: skip
def test_bad_input(over, exc, match):
    with xkernels.check_inputs(), pytest.raises(exc, match=match):  # position values: opt-in check
        apply_rotary(**_args(**over))


def test_bad_inplace():
    q = torch.randn(1, 2, 2, 32)[..., ::2]
    with pytest.raises(ValueError, match="inplace=True needs q with a contiguous last dim"):
        apply_rotary(**_args(q=q, k=torch.randn(1, 2, 1, 16)), inplace=True)
    q = torch.randn(2, 4, 6, 16, requires_grad=True)
    with pytest.raises(ValueError, match="cannot overwrite q: it is a leaf tensor that requires grad"):
        apply_rotary(**_args(q=q), inplace=True)


@pytest.mark.parametrize(
    "args, match",
    [((0, 16), "seq_len must be a positive int"), ((4, 15), "head_dim must be a positive even int"),
     ((4, 16, -1.0), "theta must be positive"), ((4.0, 16), "seq_len must be a positive int")],
)  # fmt: skip
def test_bad_table_args(args, match):
    with pytest.raises(ValueError, match=match):
        rotary_cos_sin(*args)


def test_public_names():
    for name in ("apply_rotary", "apply_rotary_pos_emb", "apply_rotary_ref", "rotary_cos_sin"):
        assert name in xkernels.__all__ and hasattr(xkernels, name)


def test_position_range_checked_once_per_tensor(device, monkeypatch):
    """With the opt-in checks on, layers of one forward share position_ids: the host sync happens once,
    and again after a change."""
    monkeypatch.setenv("XKERNELS_CHECK_INPUTS", "1")
    cos, sin = rotary_cos_sin(8, 16, device=device)
    q, k = make_qk(device, torch.float32, 1, 3, 2, 1, 16)
    pos = torch.tensor([[0, 1, 2]], device=device)
    syncs = []
    original_max = torch.Tensor.max

    def counting_max(self, *args, **kwargs):
        if self is pos:
            syncs.append(1)
        return original_max(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "max", counting_max)
    for _ in range(3):
        apply_rotary(q, k, cos, sin, pos)
    assert len(syncs) == 1
    pos[0, 2] = 8  # in-place change: checked again, and now out of range
    with pytest.raises(ValueError, match="position_ids must lie in"):
        apply_rotary(q, k, cos, sin, pos)
    assert len(syncs) == 2


@pytest.mark.parametrize("backend, kernel", [("torch", "position"), ("triton", "position"), ("triton", "token")])
def test_out_of_range_positions_are_nan_without_host_sync(device, backend, kernel):
    """Default: no host read of position_ids (no sync); a position outside the table makes that token's rotated
    features NaN in the output and in the gradient (loud, not a clamped finite value), on both paths; the other
    tokens, and the pass-through features, are exact."""
    from xkernels.testing import count_launches, no_host_sync

    head_dim, rot = (20, 12) if kernel == "position" else (16, 16)
    cos, sin = rotary_cos_sin(8, rot, device=device)
    q, k = make_qk(device, torch.float32, 2, 4, 2, 1, head_dim)
    q.requires_grad_()
    k.requires_grad_()
    pos = torch.tensor([[0, 1, 2, 3], [5, 8, -2, 7]], device=device)
    bad = torch.tensor([[False] * 4, [False, True, True, False]], device=device)
    with xkernels.force_backend(backend), count_launches() as launches, no_host_sync():
        q_out, k_out = apply_rotary(q, k, cos, sin, pos, kernel=kernel)
        torch.autograd.backward([q_out, k_out], [torch.ones_like(q_out), torch.ones_like(k_out)])
    name = "_rotary_kernel" if kernel == "position" else "_rotary_token_kernel"
    assert launches[name] == (2 if backend == "triton" else 0)
    good_pos = pos.masked_fill(bad, 0)
    q_ref, k_ref = apply_rotary_ref(q, k, cos, sin, good_pos)
    dq_ref, dk_ref = torch.autograd.grad([q_ref, k_ref], [q, k], [torch.ones_like(q_ref), torch.ones_like(k_ref)])
    for out, ref in ((q_out, q_ref), (k_out, k_ref), (q.grad, dq_ref), (k.grad, dk_ref)):
        assert out[bad][..., :rot].isnan().all()
        torch.testing.assert_close(out[bad][..., rot:], ref[bad][..., rot:])  # pass-through: untouched
        torch.testing.assert_close(out[~bad], ref[~bad])


def test_position_nan_is_default_and_check_inputs_still_raises(device):
    cos, sin = rotary_cos_sin(4, 16, device=device)
    q, k = make_qk(device, torch.float32, 1, 2, 1, 1, 16)
    pos = torch.tensor([[1, 4]], device=device)
    q_out, _ = apply_rotary(q, k, cos, sin, pos)
    assert q_out[0, 1].isnan().all() and q_out[0, 0].isfinite().all()
    with xkernels.check_inputs(), pytest.raises(ValueError, match=r"position_ids must lie in \[0, 4\)"):
        apply_rotary(q, k, cos, sin, pos)


# --- partial rotary (Phi, Phi-3, GPT-NeoX) --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim, rot, positions", [(16, 8, False), (15, 6, True), (40, 30, True)])
def test_partial_rotary_parity(device, dtype, head_dim, rot, positions):
    """The first rot features rotate, the rest pass through bit-exactly (odd head_dim, odd head counts)."""
    cos, sin = rotary_cos_sin(16, rot, device=device)
    q, k = make_qk(device, dtype, 2, 3, 5, 3, head_dim)
    pos = torch.tensor([[2, 9, 15], [0, 1, 1]], device=device) if positions else None
    q_out, k_out = check_parity(q, k, cos, sin, pos)
    assert torch.equal(q_out[..., rot:], q[..., rot:]) and torch.equal(k_out[..., rot:], k[..., rot:])


def test_partial_rotary_inplace_leaves_pass_through(device):
    qkv = torch.randn(2, 3, 4 + 2, 12, device=device)
    original = qkv.clone()
    cos, sin = rotary_cos_sin(3, 8, device=device)
    q_ref, k_ref = apply_rotary_ref(original[:, :, :4], original[:, :, 4:5], cos, sin)
    apply_rotary(qkv[:, :, :4], qkv[:, :, 4:5], cos, sin, inplace=True)
    torch.testing.assert_close(qkv[:, :, :4], q_ref)
    torch.testing.assert_close(qkv[:, :, 4:5], k_ref)
    assert torch.equal(qkv[..., 8:], original[..., 8:]) and torch.equal(qkv[:, :, 5:], original[:, :, 5:])


# --- the two kernels; batch rows grouped per program ------------------------------------------------


@pytest.mark.parametrize("batch, min_programs, positions", [(5, 8, "broadcast"), (3, 4, "rows")])
def test_kernels_agree_and_rows_grouping(device, monkeypatch, batch, min_programs, positions):
    """kernel="position" (batch rows sharing a position grouped into one program when the grid is large
    enough -- forced here with a small _MIN_PROGRAMS, incl. a ragged last group) and kernel="token" give
    bitwise the same forward and backward (same fp32 math)."""
    from xkernels.testing import count_launches

    monkeypatch.setattr(rotary_mod, "_MIN_PROGRAMS", min_programs)
    seq = 4
    cos, sin = rotary_cos_sin(16, 16, device=device)
    q, k = make_qk(device, torch.bfloat16, batch, seq, 6, 2, 16)
    pos = {None: None, "broadcast": torch.tensor([[3, 4, 5, 9]], device=device),
           "rows": torch.randint(0, 16, (batch, seq), device=device)}[positions]  # fmt: skip
    if xkernels.use_triton(q) and positions != "rows":
        assert rotary_mod._position_launch_config(6, 16, 0, batch, seq, True)[3] == 2  # groups of 2, 2, 1
    results = []
    for kernel in KERNEL_NAMES:
        qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
        with count_launches() as launches:
            q_out, k_out = apply_rotary(qs, ks, cos, sin, pos, kernel=kernel)
            torch.autograd.backward([q_out, k_out], [q_out.detach() * 2, k_out.detach() - 1])
        assert launches[KERNEL_NAMES[kernel]] == (2 if xkernels.use_triton(q) else 0)
        results.append((q_out, k_out, qs.grad, ks.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


KERNEL_NAMES = {"position": "_rotary_kernel", "token": "_rotary_token_kernel"}


def test_token_kernel_rejects_partial_rotary():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="kernel='token' rotates whole heads only"):
        apply_rotary(q, k, *rotary_cos_sin(2, 8), kernel="token")
    with pytest.raises(ValueError, match="kernel must be one of"):
        apply_rotary(q, k, *rotary_cos_sin(2, 16), kernel="rows")


# --- Hugging Face signature -------------------------------------------------------------------------


def _hf_function(family):
    import importlib

    pytest.importorskip("transformers")
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb


@pytest.mark.parametrize(
    "family, head_dim, rot, dtype, cos_batch, unsqueeze_dim, backend",
    [("llama", 16, 16, torch.float32, 2, 1, "auto"), ("llama", 64, 64, torch.bfloat16, 1, 2, "auto"),
     ("phi3", 20, 12, torch.bfloat16, 2, 1, "auto"), ("phi3", 20, 12, torch.bfloat16, 2, 1, "torch"),
     ("gpt_neox", 16, 8, torch.float32, 1, 1, "auto")],
    ids=["llama-fp32", "llama-bf16-bshd", "phi3-partial-bf16", "phi3-partial-bf16-torch", "neox-partial-fp32"],
)  # fmt: skip
def test_hf_signature_matches_hf(device, family, head_dim, rot, dtype, cos_batch, unsqueeze_dim, backend):
    """xkernels.apply_rotary_pos_emb vs the family's own HF function run in float64, forward and backward,
    on HF's (batch, seq, rotary_dim) cos/sin in the activation dtype (as HF's rotary embedding returns them);
    the kernel path (auto) and the torch path."""
    hf = _hf_function(family)
    batch, seq, n_q, n_kv = 2, 5, 3, 1
    table_cos, table_sin = rotary_cos_sin(32, rot, theta=10000.0, device=device)
    pos = torch.randint(0, 32, (cos_batch, seq), device=device)
    cos, sin = table_cos[pos].to(dtype), table_sin[pos].to(dtype)
    shape = (lambda h: (batch, h, seq, head_dim)) if unsqueeze_dim == 1 else (lambda h: (batch, seq, h, head_dim))
    q = torch.randn(shape(n_q), device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape(n_kv), device=device, dtype=dtype, requires_grad=True)
    with xkernels.force_backend(backend):
        q_out, k_out = xkernels.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        g_q, g_k = torch.randn_like(q_out), torch.randn_like(k_out)
        torch.autograd.backward([q_out, k_out], [g_q, g_k])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_ref, k_ref = hf(q64, k64, cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim)
    torch.autograd.backward([q_ref, k_ref], [g_q.double(), g_k.double()])
    for name, a, b in (("q", q_out, q_ref), ("k", k_out, k_ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad)):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= TOL[dtype], (name, rel_err(a, b))


def test_hf_signature_table_with_position_ids(device):
    """A 2-D (max_positions, rotary_dim) table is gathered at position_ids (HF <= 4.39's calling convention)."""
    cos, sin = rotary_cos_sin(16, 8, device=device)
    q, k = torch.randn(2, 3, 4, 10, device=device), torch.randn(2, 1, 4, 10, device=device)
    pos = torch.tensor([[0, 5, 6, 15], [3, 2, 1, 0]], device=device)
    q_out, k_out = xkernels.apply_rotary_pos_emb(q, k, cos, sin, position_ids=pos)
    q_ref, k_ref = apply_rotary_ref(q.transpose(1, 2), k.transpose(1, 2), cos, sin, pos)
    torch.testing.assert_close(q_out, q_ref.transpose(1, 2))
    torch.testing.assert_close(k_out, k_ref.transpose(1, 2))
    q_out, _ = xkernels.apply_rotary_pos_emb(q, k, cos, sin)  # default arange(seq)
    torch.testing.assert_close(q_out, apply_rotary_ref(q.transpose(1, 2), k.transpose(1, 2), cos, sin)[0].transpose(1, 2))


@pytest.mark.parametrize(
    "over, exc, match",
    [({"unsqueeze_dim": 3}, ValueError, "unsqueeze_dim must be 1"),
     ({"q": torch.randn(2, 3, 4)}, ValueError, r"q must have shape \(batch, heads, seq, head_dim\)"),
     ({"cos": torch.randn(2, 5, 8), "sin": torch.randn(2, 5, 8)}, ValueError, r"cos/sin must have shape \(2 or 1, 4, rotary_dim\)"),
     ({"cos": torch.randn(1, 1, 4, 8), "sin": torch.randn(1, 1, 4, 8)}, ValueError, "cos/sin must be"),
     ({"sin": torch.randn(2, 4, 6)}, ValueError, "cos .* and sin .* must have the same shape"),
     ({"cos": torch.ones(2, 4, 8, dtype=torch.int32)}, TypeError, "cos must have dtype"),
     ({"k": [1.0]}, TypeError, "k must be a torch.Tensor")],
    ids=["unsqueeze", "q_3d", "cos_seq", "cos_4d", "sin_shape", "cos_int", "k_list"],
)  # fmt: skip
def test_hf_signature_bad_input(over, exc, match):
    args = {"q": torch.randn(2, 3, 4, 8), "k": torch.randn(2, 1, 4, 8), "cos": torch.randn(2, 4, 8),
            "sin": torch.randn(2, 4, 8)}  # fmt: skip
    args.update(over)
    with pytest.raises(exc, match=match):
        xkernels.apply_rotary_pos_emb(**args)


_ROTARY_AOT = """
import xkernels.rotary as RO
aligned = ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_qob", "stride_qos",
           "stride_qoh", "stride_kob", "stride_kos", "stride_koh", "stride_table")
for dt, hq, hk, d, rot, pos, bwd in CASES:
    bh, bd, bp, _, nw = RO._position_launch_config(hq, rot, d - rot, 4, 4096, not pos)
    types = dict(Q=dt, K=dt, QO=dt, KO=dt, COS="*fp32", SIN="*fp32", POS="*i64")
    consts = dict(HAS_POS=pos, BACKWARD=bwd, COPY_PASS=rot < d, BLOCK_H=bh, BLOCK_D=bd, BLOCK_P=bp)
    rows.append(dict(cfg=(dt, hq, hk, d, rot, pos, bwd), num_warps=nw,
                     **aot(RO._rotary_kernel, types, consts, nw, aligned=aligned)))
"""
# (dtype, q heads, kv heads, head_dim, rotary_dim, position_ids, backward): the model's heads (24/8 x 64) in every
# mode, fp32, head_dim 128 / 256 (Llama-3 / Gemma-2) and a partial rotary head (Phi-4-mini: 96 of 128).
_AOT_CASES = [("*bf16", 24, 8, 64, 64, p, b) for p in (False, True) for b in (False, True)] + [
    ("*fp32", 24, 8, 64, 64, True, False), ("*bf16", 32, 8, 128, 128, False, True),
    ("*bf16", 8, 4, 256, 256, True, False), ("*bf16", 24, 8, 128, 96, True, True),
]


def sm90_occupancy(registers: int, num_warps: int, shared_bytes: int = 0) -> float:
    """Theoretical occupancy on sm_90: resident warps / 64, limited by registers (65536 per SM, allocated per
    warp in units of 256), shared memory (228 KiB per SM, 1 KiB reserved per block), 32 blocks and 64 warps."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(32, 64 // num_warps, 65536 // (per_warp * num_warps))
    if shared_bytes:
        blocks = min(blocks, 228 * 1024 // (shared_bytes + 1024))
    return blocks * num_warps / 64


def test_sm90_occupancy_formula():
    assert sm90_occupancy(72, 4) == 28 / 64  # the "token" kernel at the model's shapes: 44%
    assert sm90_occupancy(40, 4) == 0.75 and sm90_occupancy(32, 4) == 1.0 and sm90_occupancy(41, 4) == 40 / 64


@pytest.mark.slow
def test_sm90a_occupancy():
    """kernel="position" at its launch configs compiles for sm_90a without spills and with a theoretical
    occupancy >= 75% (registers from ptxas; no shared memory).  Regression guard for issue 21 item 3."""
    from aot_worker import aot_available, run_aot

    if aot_available():
        pytest.skip(aot_available())
    rows = run_aot(f"CASES = {_AOT_CASES!r}\n" + _ROTARY_AOT)
    assert len(rows) == len(_AOT_CASES)
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert sm90_occupancy(r["registers"], r["num_warps"], r["shared_bytes"]) >= 0.75, r
