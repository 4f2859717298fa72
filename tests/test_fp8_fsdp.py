"""FP8 weight all-gather (``xkernels.fp8.fsdp``) in one process: FSDP2's two hooks driven by hand on uneven shards.

What FSDP2 does per weight -- ``fsdp_pre_all_gather`` on every rank's shard, concatenate (the all-gather), then
``fsdp_post_all_gather`` and an ``as_strided`` to the weight's shape -- is replayed here on 3 shards of one weight
(80 rows: 27 + 27 + 26, so the last shard is padded).  The FP8 codes and scale FP8Linear receives must be bit for
bit those of quantising the whole weight, and the forward and both gradients those of a plain FP8Linear.  The real
FSDP2 runs (gloo, world 2) are in ``tests/test_train_distributed.py``.
"""

import pytest
import torch
from torch import nn

from xkernels.dispatch import force_backend
from xkernels.fp8 import E4M3, FP8Linear, FP8Recipe
from xkernels.fp8.fsdp import (
    FP8AllGatherWeight,
    FP8GatheredWeight,
    _valid_scale,
    enable_fp8_all_gather,
    precompute_fp8_scales,
    prepare_fp8_for_fsdp,
)
from xkernels.fp8.quant import quantize_for_gemm
from xkernels.testing import count_launches

N, K, SHARDS = 80, 32, 3


class _Mesh:  # what the hooks read of FSDP2's DeviceMesh
    def size(self) -> int:
        return SHARDS


def _gather(layer: FP8Linear) -> FP8GatheredWeight:
    """FSDP2's all-gather of ``layer.weight`` with the extension hooks, in one process."""
    shards = torch.chunk(layer.weight, SHARDS)  # views of the FP8AllGatherWeight, like FSDP2's shards
    assert all(isinstance(s, FP8AllGatherWeight) for s in shards)
    inputs = [s.fsdp_pre_all_gather(_Mesh(), layer.weight.shape, (K, 1), layer, None) for s in shards]
    assert all(codes.shape == (27, K) and codes.dtype == E4M3 for (codes,), _ in inputs)  # padded to 27 rows
    gathered = torch.cat([codes.view(torch.uint8) for (codes,), _ in inputs]).view(E4M3)  # as FSDP2: in bytes
    unsharded, inner = shards[0].fsdp_post_all_gather((gathered,), inputs[0][1], None)
    assert inner[0] is gathered
    return torch.as_strided(unsharded, (N, K), (K, 1), 0)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                            ("triton", torch.bfloat16)])
def test_gathered_fp8_weight_equals_quantising_the_gathered_weight(backend, dtype):
    """The hooks' codes/scale, and FP8Linear on them, against quantising the gathered weight: bit for bit, on the
    reference and on the Triton cast kernel (which quantises a shard with a given scale and the gathered weight with
    one it computes itself; on CUDA when there is one -- written without a GPU at hand).  FP8Linear then runs the
    same GEMMs on the same codes; that part is checked on the reference only (the Triton GEMMs under the interpreter
    cost ~8 s more and add nothing to what is compared)."""
    torch.manual_seed(0)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    with force_backend(backend), count_launches() as launches:
        plain = FP8Linear(K, N, dtype=dtype, device=dev, recipe=FP8Recipe.from_name("current"))
        plain.weight_cache = False
        layer = FP8Linear(K, N, dtype=dtype, device=dev, recipe=FP8Recipe.from_name("current"))
        layer.load_state_dict(plain.state_dict())
        assert enable_fp8_all_gather(layer) == 1
        assert precompute_fp8_scales(layer) == 1
        w = _gather(layer)
        q, s, _, _, _ = quantize_for_gemm(plain.weight.detach(), E4M3, "tensor")
        assert w.dtype == dtype and w.shape == (N, K)
        assert torch.equal(w._data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(w._scale, s.reshape(()))
        if backend == "triton":
            assert launches["_cast_kernel"] >= SHARDS + 1, launches
            return

        # FP8Linear's forward on the gathered weight (as FSDP2 swaps it in) vs the plain one: same bits
        user = FP8Linear(K, N, dtype=dtype, recipe=FP8Recipe.from_name("current"))
        user.weight = nn.Parameter(w)
        user.bias = nn.Parameter(plain.bias.detach().clone())
        x = torch.randn(3, 5, K, dtype=dtype)[:, ::2]  # non-contiguous, 6 tokens
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = user(x1), plain(x2)
        g = torch.randn_like(y_ref)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(y, y_ref) and torch.equal(x1.grad, x2.grad)
        assert type(user.weight.grad) is torch.Tensor and torch.equal(user.weight.grad, plain.weight.grad)
        assert torch.equal(user.bias.grad, plain.bias.grad)


def test_scale_follows_the_weight_and_state_stays_plain():
    torch.manual_seed(0)
    with force_backend("torch"):
        layer = FP8Linear(K, N, recipe=FP8Recipe.from_name("current"))
        enable_fp8_all_gather(layer)
        assert layer.weight_cache is False and isinstance(layer.weight, FP8AllGatherWeight)
        precompute_fp8_scales(layer)
        shard = torch.chunk(layer.weight, SHARDS)[1]
        assert _valid_scale(layer, shard) is not None
        opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
        layer(torch.randn(4, K)).sum().backward()
        opt.step()  # in place on the high-precision data: the precomputed scale is now stale
        assert isinstance(layer.weight, FP8AllGatherWeight)
        assert _valid_scale(layer, shard) is None
        precompute_fp8_scales(layer)
        assert _valid_scale(layer, shard) is not None
        with torch.no_grad():  # a write through out= counts too
            torch.add(layer.weight, 1.0, out=layer.weight)
        assert _valid_scale(layer, shard) is None
        # a stale scale is never used: the hook recomputes it from the current values
        w = _gather(layer)
        q, s, _, _, _ = quantize_for_gemm(layer.weight._data, E4M3, "tensor")
        assert torch.equal(w._scale, s.reshape(())) and torch.equal(w._data.view(torch.uint8), q.view(torch.uint8))
        # optimizer state, state_dict and copies are ordinary tensors; loading writes into the subclass's data
        assert all(type(v) is torch.Tensor for st in opt.state.values() for v in st.values())
        sd = layer.state_dict()
        assert type(sd["weight"]) is torch.Tensor and torch.equal(sd["weight"], layer.weight._data)
        assert type(layer.weight.clone()) is torch.Tensor and type(layer.weight * 2) is torch.Tensor
        fresh = {**sd, "weight": torch.randn(N, K)}
        layer.load_state_dict(fresh)
        assert isinstance(layer.weight, FP8AllGatherWeight) and torch.equal(layer.weight._data, fresh["weight"])


def test_fp8_all_gather_refusals():
    with pytest.raises(ValueError, match="needs the tensor-wise 'current' recipe.*got scaling='delayed'"):
        enable_fp8_all_gather(FP8Linear(K, N, recipe=FP8Recipe.from_name("delayed")))
    with pytest.raises(ValueError, match="got scaling='block'"):
        enable_fp8_all_gather(nn.Sequential(FP8Linear(K, N, recipe=FP8Recipe.from_name("block"))))
    compiled = nn.Sequential(FP8Linear(K, N, recipe=FP8Recipe.from_name("current")))
    compiled[0].compile()  # how the trainer compiles its blocks (nothing is traced until a call)
    with pytest.raises(ValueError, match=r"does not work under torch.compile \(0 is compiled\)"):
        enable_fp8_all_gather(compiled)
    for fn in (enable_fp8_all_gather, precompute_fp8_scales, prepare_fp8_for_fsdp):
        with pytest.raises(TypeError, match="model must be an nn.Module"):
            fn(torch.ones(2))
    layer = FP8Linear(K, N, recipe=FP8Recipe.from_name("current"))
    enable_fp8_all_gather(layer)
    precompute_fp8_scales(layer)
    with force_backend("torch"):
        w = _gather(layer)
    with pytest.raises(NotImplementedError, match="only read by FP8Linear's forward"):
        w + 1
    with pytest.raises(TypeError, match="must be the weight of an FP8Linear"):
        layer.weight.fsdp_pre_all_gather(_Mesh(), (N, K), (K, 1), nn.Linear(K, N), None)
