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


# --- the suite's own guards (tests/conftest.py) ---------------------------------------------------------------------
pytest_plugins = ["pytester"]

_CONFTEST = __import__("pathlib").Path(__file__).with_name("conftest.py")
_REPO = _CONFTEST.parents[1]
_INI = "[pytest]\nmarkers =\n    kernels: kernel test module\n"


def _fake_suite(pytester, monkeypatch, body: str, **more_modules: str) -> None:
    """A suite with this repo's conftest: kernel test module ``test_fake_kernels`` holding ``body``, and any
    further kernel test modules named by ``more_modules``."""
    monkeypatch.setenv("PYTHONPATH", str(_REPO))  # the checkout's xkernels, not another installed copy
    pytester.makeini(_INI)
    pytester.makeconftest(_CONFTEST.read_text(encoding="utf-8"))
    header = "import pytest\nimport torch\n\npytestmark = pytest.mark.kernels\n\n"
    pytester.makepyfile(test_fake_kernels=header + body, **{k: header + v for k, v in more_modules.items()})


@pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()), reason="kernels need CUDA or TRITON_INTERPRET=1")
def test_kernel_module_that_launches_nothing_fails_and_one_that_launches_passes(pytester, monkeypatch):
    """A kernel test module whose passing tests ran no Triton kernel (here: the reference against itself) fails;
    one whose tests launch a kernel (next to it, in the same run: each module is judged on its own) passes.
    One pytest start-up for both: a start-up (torch, triton) is most of this test's time."""
    _fake_suite(
        pytester,
        monkeypatch,
        "from xkernels import swiglu_ref\n\n"
        "def test_parity():\n"
        "    g, u = torch.randn(3, 5), torch.randn(3, 5)\n"
        "    torch.testing.assert_close(swiglu_ref(g, u), swiglu_ref(g, u))\n\n"
        "def test_bad_input():\n"
        "    pass\n",
        test_fake_launching="from xkernels import swiglu\n\n"
        "def test_runs_kernel():\n"
        "    swiglu(torch.randn(3, 5), torch.randn(3, 5))\n\n"
        "def test_bad_input_only():\n"
        "    pass\n",
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=4, errors=1)  # the one error: the module that launched nothing
    result.stdout.fnmatch_lines(["*test_fake_kernels: 2 test(s) passed but no Triton kernel was launched in the "
                                 "whole module*"])
    result.stdout.no_fnmatch_line("*test_fake_launching: * no Triton kernel*")
    result.stdout.fnmatch_lines(["ERROR test_fake_kernels.py::test_bad_input*"])
    # Run in part (-k), the module is not judged: bad-input tests alone need launch nothing.
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-k", "parity")
    result.assert_outcomes(passed=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard applies to machines without CUDA")
@pytest.mark.parametrize("value", ["0", "off"])
def test_interpreter_switched_off_without_gpu_is_a_usage_error(pytester, monkeypatch, value):
    _fake_suite(pytester, monkeypatch, "def test_anything():\n    pass\n")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*TRITON_INTERPRET=*no Triton kernel*could run*"])


# --- GPU rounding under the interpreter ----------------------------------------------------------------------------
@pytest.mark.skipif(not interpreting(), reason="the patch is for Triton's CPU interpreter")
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.float64])
def test_interpreter_rounds_bf16_casts_like_a_gpu(src_dtype):
    """tests/conftest.py installed round_casts_like_gpu: a kernel's ``x.to(tl.bfloat16)`` equals ``x.bfloat16()``
    bit for bit (ties to even, overflow to inf, NaN kept), where the bare interpreter truncates half of the values."""
    import triton
    import triton.language as tl

    from xkernels.testing import rounds_casts_like_gpu

    assert rounds_casts_like_gpu()

    @triton.jit
    def _cast_to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.bfloat16), mask=mask)

    x = torch.randn(1000, dtype=torch.float64) * torch.logspace(-30, 30, 1000, dtype=torch.float64)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130 * (1 + 2**-8)], dtype=torch.float64)
    special = [float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 0.0, -0.0]
    x = torch.cat([x, ties, torch.tensor(special, dtype=torch.float64)]).to(src_dtype)
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    with count_launches() as launches:
        _cast_to_bf16[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    assert launches["_cast_to_bf16"] == 1
    want = x.float().bfloat16()
    assert torch.equal(y.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(y[finite].view(torch.int16), want[finite].view(torch.int16))
    if src_dtype == torch.float32:  # the bare interpreter would have been wrong on about half of them
        import triton.runtime.interpreter as interpreter

        truncated = interpreter._convert_float(x.numpy(), tl.float32, tl.bfloat16, None).astype("int16")
        assert (torch.from_numpy(truncated)[finite] != want[finite].view(torch.int16)).sum() > 300
