"""No host synchronisation in any public op's forward+backward, nor in a Muon / MuonWithAuxAdamW step, on
the torch path and on the Triton path (interpreter on CPU): xkernels.testing.no_host_sync fails at the first
.item() / .tolist() / int(t) / data-dependent shape.  Value checks that need a sync are opt-in
(xkernels.check_inputs), so they are off here."""

from __future__ import annotations

import pytest
import torch

from op_cases import CASE_IDS, CASES
from xkernels import force_backend
from xkernels.dispatch import interpreting, triton_available
from xkernels.testing import count_launches, no_host_sync


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_host_sync(case, backend, monkeypatch):
    if backend == "triton" and not (triton_available() and (torch.cuda.is_available() or interpreting())):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.delenv("XKERNELS_CHECK_INPUTS", raising=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    inputs = case.build(device, backend)
    with force_backend(backend), count_launches() as launches, no_host_sync():
        out = case.fn(*inputs)
        if case.backward:
            out.backward()
    if backend == "triton":
        for k in case.kernels:
            assert launches[k] > 0, f"{k} did not launch: {dict(launches)}"
    else:
        assert not launches, dict(launches)


def _differentiable_leaves(inputs) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("case", [c for c in CASES if c.backward], ids=[c.name for c in CASES if c.backward])
def test_cuda_graph_capture_replays_forward_backward(case):
    """Forward+backward of each op is captured in one torch.cuda.CUDAGraph (no host sync, no allocation outside
    the graph's pool) and a replay gives the eager result.  (Written without a GPU at hand: first run on the H200.)"""
    torch.manual_seed(0)
    inputs = case.build("cuda", "triton")
    leaves = _differentiable_leaves(inputs)

    def step() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        out = case.fn(*inputs)
        out.backward()
        return out

    with force_backend("triton"):
        ref = step().detach().clone()
        ref_grads = [t.grad.clone() for t in leaves]
        side = torch.cuda.Stream()  # warm-up (autotuning, caches) on a side stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        for t in leaves:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = case.fn(*inputs)
            out.backward()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, ref)
    for t, g in zip(leaves, ref_grads):
        torch.testing.assert_close(t.grad, g)
