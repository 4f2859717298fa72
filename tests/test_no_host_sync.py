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
