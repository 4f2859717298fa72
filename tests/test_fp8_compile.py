"""FP8 under torch.compile: zero graph breaks (torch path and Triton path), custom ops pass opcheck, no host syncs.

Small shapes: the Triton path runs through the interpreter on CPU. ``backend="aot_eager"`` runs the traced
forward and backward graphs (fake tensors, functionalised buffer mutations) without Inductor's C++ build.
"""

import pytest
import torch
from torch import nn

from xkernels.dispatch import force_backend
from xkernels.fp8 import E4M3, E5M2, FP8Linear, FP8Recipe, cast_transpose, fp8_gemm, quantize
from xkernels.testing import count_launches, no_host_sync

RECIPES = ["delayed", "current", "row", "block"]
BACKENDS = ["torch", "triton"]
GRANULARITIES = ["tensor", "row", "block_1x128", "block_128x128"]


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def _assert_one_graph(fn, *args, graphs=1):
    ex = _explain(fn, *args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == graphs, ex.graph_count


def _launched(backend: str, launches) -> None:
    if backend == "triton":
        assert sum(launches.values()) > 0, "the Triton kernels did not run"
    else:
        assert sum(launches.values()) == 0


# --- explain: 0 breaks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["tensor", "block_1x128", "block_128x128"])
def test_quantize_and_cast_transpose_trace_in_one_graph(backend, granularity):
    x = torch.randn(40, 144)

    def fn(x):
        q, s = quantize(x, E4M3, granularity)
        q2, s2, qt, st, amax = cast_transpose(x, E5M2, granularity, pad_to=16, return_amax=True)
        return q.float().sum() + s.sum() + qt.float().sum() + st.sum() + amax

    with force_backend(backend), count_launches() as launches:
        _assert_one_graph(fn, x)
    _launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ga,gb", [("tensor", "tensor"), ("row", "row"), ("block_1x128", "block_128x128")])
def test_fp8_gemm_traces_in_one_graph(backend, ga, gb):
    a, sa = quantize(torch.randn(40, 128), E4M3, ga)
    b, sb = quantize(torch.randn(32, 128), E4M3, gb)
    bias = torch.randn(32)

    def fn(a, b, sa, sb, bias):
        return fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, bias=bias).sum()

    with force_backend(backend), count_launches() as launches:
        _assert_one_graph(fn, a, b, sa, sb, bias)
    _launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scaling", RECIPES)
def test_fp8_linear_traces_in_one_graph(backend, training, scaling):
    mod = FP8Linear(64, 48, recipe=FP8Recipe.from_name(scaling, amax_history_len=4)).train(training)
    x = torch.randn(2, 20, 64, requires_grad=True)
    with force_backend(backend), count_launches() as launches:
        _assert_one_graph(lambda x: mod(x).sum(), x)
    _launched(backend, launches)


# --- compiled forward + backward = eager ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", RECIPES)
def test_compiled_fp8_linear_forward_backward_matches_eager(backend, scaling):
    """fullgraph=True forward and backward (aot_eager runs the traced graphs): same outputs, gradients and amax
    history as eager, over two steps (delayed: step 0 from the current amax, step 1 from the history)."""
    torch.manual_seed(0)
    recipe = FP8Recipe.from_name(scaling, amax_history_len=4)
    eager = FP8Linear(64, 48, recipe=recipe)
    comp = FP8Linear(64, 48, recipe=recipe)
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with force_backend(backend):
        for step in range(2):
            x = torch.randn(24, 64) * (step + 1)
            outs = []
            for mod, fn in ((eager, eager), (comp, compiled)):
                xi = x.clone().requires_grad_()
                with count_launches() as launches:
                    y = fn(xi)
                    y.backward(torch.ones_like(y))
                _launched(backend, launches)
                outs.append((y.detach(), xi.grad, mod.weight.grad.clone(), mod.bias.grad.clone()))
                mod.zero_grad()
            for a, b in zip(*outs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Delayed: in-graph history updates (input and gradient rows; the weight is pushed per compiled call).
    assert torch.equal(eager.fp8_amax_history[0], comp.fp8_amax_history[0])
    assert torch.equal(eager.fp8_amax_history[2], comp.fp8_amax_history[2])
    assert torch.equal(eager.fp8_scale[[0, 2]], comp.fp8_scale[[0, 2]])
    if scaling == "delayed":
        assert comp.fp8_num_updates.tolist() == [2, 2, 2] and eager.fp8_num_updates.tolist() == [2, 1, 2]


def test_old_state_dict_keys_still_load():
    m = FP8Linear(32, 16)
    m(torch.randn(4, 32)).sum().backward()
    sd = m.state_dict()
    assert {"weight", "bias", "fp8_amax_history", "fp8_scale", "fp8_num_updates"} == set(sd)
    m2 = FP8Linear(32, 16)
    m2.load_state_dict(sd)
    assert m2._seen == [True, True, True]


# --- opcheck -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cast_transpose_op_passes_opcheck(granularity):
    x = torch.randn(40, 144)
    op = torch.ops.xkernels.fp8_cast_transpose.default
    torch.library.opcheck(op, (x, E4M3, granularity, None, True, 16, True))
    torch.library.opcheck(op, (x, E5M2, granularity, None, False, 1, False))
    if granularity == "tensor":
        torch.library.opcheck(op, (x, E4M3, "tensor", torch.tensor(0.02), True, 16, True))


@pytest.mark.parametrize("ga,gb", [("tensor", "tensor"), ("row", "row"), ("block_1x128", "block_128x128")])
def test_gemm_op_passes_opcheck(ga, gb):
    a, sa = quantize(torch.randn(40, 128), E4M3, ga)
    b, sb = quantize(torch.randn(32, 128), E4M3, gb)
    op = torch.ops.xkernels.fp8_gemm.default
    # opcheck's test_schema compares inputs before/after through arithmetic that CPU torch does not implement
    # for float8 ("mul_cpu_reduced_float"), so it is replaced by the same check on byte views below.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    before = [t.view(torch.uint8).clone() for t in (a, b)] + [sa.clone(), sb.clone()]
    torch.library.opcheck(op, (a, b, sa, sb, torch.float32, torch.randn(32), "triton", False), test_utils=utils)
    torch.library.opcheck(op, (a, b, sa, sb, torch.bfloat16, None, "triton", True), test_utils=utils)
    out = op(a, b, sa, sb, torch.float32, None, "triton", False)
    after = [t.view(torch.uint8) for t in (a, b)] + [sa, sb]
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # declared mutates_args=() holds
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (a, b, sa, sb))


def test_push_amax_op_passes_opcheck():
    history, scale, n = torch.rand(3, 4), torch.ones(3), torch.zeros(3, dtype=torch.int64)
    op = torch.ops.xkernels.fp8_push_amax.default
    torch.library.opcheck(op, (history, scale, n, torch.tensor(2.5), 1, 448.0, "max"))
    before = n.clone()
    op(history, scale, n, torch.tensor(3.0), 2, 57344.0, "most_recent")
    assert n[2] == before[2] + 1 and history[2, 0] == 3.0 and scale[2] == 3.0 / 57344.0


# --- no host syncs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_do_not_sync_the_host(backend):
    x = torch.randn(40, 144)
    with force_backend(backend), count_launches() as launches:
        with no_host_sync():
            for g in GRANULARITIES:
                quantize(x, E4M3, g)
                cast_transpose(x, E5M2, g, pad_to=16, return_amax=True)
            quantize(x, E4M3, "tensor", scale=torch.tensor(0.01))
        a, sa = quantize(torch.randn(40, 128), E4M3, "block_1x128")
        b, sb = quantize(torch.randn(32, 128), E4M3, "block_128x128")
        with no_host_sync():
            fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, bias=torch.randn(32))
    _launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", RECIPES)
def test_fp8_linear_forward_backward_do_not_sync_the_host(backend, scaling):
    mod = FP8Linear(64, 48, recipe=FP8Recipe.from_name(scaling, amax_history_len=4))
    with force_backend(backend), count_launches() as launches:
        for _ in range(2):  # delayed: the first step (current amax) and a later one (history)
            x = torch.randn(3, 10, 64, requires_grad=True)
            with no_host_sync():
                mod(x).sum().backward()
    _launched(backend, launches)
    assert x.grad is not None and mod.weight.grad is not None


def test_compiled_mlp_block_with_fp8_linears_has_no_breaks():
    """A block as trainers compile it (torchtitan: per block): FP8 linears with an activation in between."""
    block = nn.Sequential(
        FP8Linear(64, 128, bias=False), nn.GELU(), FP8Linear(128, 64, bias=False)
    )
    x = torch.randn(16, 64, requires_grad=True)
    with force_backend("triton"):
        _assert_one_graph(lambda x: block(x).sum(), x)
