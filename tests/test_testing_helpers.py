"""xkernels.testing: the launch counter sees kernels run, the sync guard catches every way of reading a value."""

import pytest
import torch

from xkernels import swiglu
from xkernels.dispatch import interpreting
from xkernels.testing import HostSyncError, count_launches, no_host_sync


@pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()), reason="kernels need CUDA or TRITON_INTERPRET=1")
def test_count_launches_sees_forward_and_backward_kernels(device):
    gate = torch.randn(3, 7, device=device, requires_grad=True)
    with count_launches() as launches:
        swiglu(gate, torch.randn(3, 7, device=device)).sum().backward()
    assert launches == {"_swiglu_fwd_kernel": 1, "_swiglu_bwd_kernel": 1}


def test_count_launches_sees_nothing_on_the_torch_path():
    from xkernels import force_backend

    with force_backend("torch"), count_launches() as launches:
        swiglu(torch.randn(3, 7), torch.randn(3, 7))
    assert not launches


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: t.tolist(),
        lambda t: int(t[0]),
        lambda t: float(t[0]),
        lambda t: bool(t[0] > 0),
        lambda t: range(t[0].long()),
        lambda t: t.nonzero(),
        lambda t: torch.masked_select(t, t > 0),
        lambda t: torch.equal(t, t),
    ],
    ids=["item", "tolist", "int", "float", "bool", "index", "nonzero", "mask", "equal"],
)
def test_no_host_sync_catches_each_read(read):
    t = torch.randn(4) + 2
    read(t)  # fine outside
    with pytest.raises(HostSyncError, match="synchronise the host"), no_host_sync():
        read(t)


def test_no_host_sync_lets_device_work_through():
    t = torch.randn(4, 4, requires_grad=True)
    with no_host_sync():
        (t @ t).relu().sum().backward()
        torch.repeat_interleave(t.detach(), torch.tensor([1, 2, 0, 1]), dim=0, output_size=4)
    assert t.grad is not None
