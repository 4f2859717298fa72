"""Test setup: kernels run through Triton's interpreter when there is no GPU, and a kernel test that ran no kernel fails.

TRITON_INTERPRET must be set before xkernels (and so triton.jit) is imported, hence at the very top.

Two guards keep the suite from passing without testing anything:

* On a machine without CUDA, ``TRITON_INTERPRET`` set to a false value (``0``, ``false``, ``no``, ``off``, empty)
  would make every launcher fall back to the PyTorch reference, so each parity test would compare the reference
  with itself and pass.  That is refused at start-up (``pytest.UsageError``) instead of silently accepted.
* Kernel test modules (:data:`KERNEL_MODULES`, or any module with ``pytestmark = pytest.mark.kernels``) must launch
  at least one ``@triton.jit`` kernel across the tests that ran: every test is wrapped in
  :func:`xkernels.testing.count_launches`, and a module whose selected tests launched nothing fails at its teardown.

Under the interpreter, casts to bf16 round to nearest even as on a GPU (:func:`xkernels.testing.round_casts_like_gpu`;
the interpreter itself truncates), so the Triton path's bf16 results are a GPU's and share the torch path's bounds.
"""

import os

import torch

_FALSY = {"0", "false", "no", "off", ""}
_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_INTERPRET_OFF = not _HAS_CUDA and os.environ.get("TRITON_INTERPRET", "1").strip().lower() in _FALSY

import collections  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DEVICES = ["cpu"] + (["cuda"] if _HAS_CUDA else [])

# Test modules whose purpose is to run Triton kernels (by file stem).  A module can also opt in with
# ``pytestmark = pytest.mark.kernels``.
KERNEL_MODULES = {
    "test_rmsnorm",
    "test_layernorm",
    "test_rotary",
    "test_swiglu",
    "test_linear_cross_entropy",
    "test_fp8_quantize",
    "test_fp8_gemm",
    "test_fp8_linear",
    "test_newton_schulz",
    "test_muon",
    "test_guard_regions",
}


def pytest_configure(config):
    if _INTERPRET_OFF:
        raise pytest.UsageError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} on a machine without CUDA: no Triton kernel "
            "could run, so every parity test would compare the PyTorch reference with itself. Unset it (the test "
            "setup then uses Triton's CPU interpreter) or set TRITON_INTERPRET=1."
        )
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in _FALSY:
        from xkernels.testing import round_casts_like_gpu

        round_casts_like_gpu()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every parity test runs on CPU (interpreter) and, when present, on CUDA."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _is_kernel_module(module) -> bool:
    if module is None:
        return False
    if module.__name__.rsplit(".", 1)[-1] in KERNEL_MODULES:
        return True
    marks = getattr(module, "pytestmark", [])
    marks = marks if isinstance(marks, list) else [marks]
    return any(getattr(m, "name", None) == "kernels" for m in marks)


@pytest.fixture(scope="session")
def _launches_by_module() -> dict:
    """module name -> Counter of kernel launches seen in that module's tests (this session)."""
    return collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _module_must_launch_kernels(request, _launches_by_module):
    """At the teardown of a kernel test module: fail unless its tests that ran launched at least one kernel.

    Only whole modules are judged: one whose tests all skipped (the kernels need CUDA, say), or that was run in
    part (``-k``/``-m`` deselected some of its tests, or single tests were named as ``file::test``: bad-input tests
    alone launch nothing) is left alone.  CI runs every module whole.
    """
    yield
    module = request.module
    if not _is_kernel_module(module) or module.__name__ in _PARTIAL_MODULES:
        return
    if any("::" in str(arg) and module.__name__.rsplit(".", 1)[-1] in str(arg) for arg in request.config.args):
        return
    stats = _launches_by_module.get(module.__name__)
    ran = getattr(module, "_xk_tests_passed", 0)
    if ran and not stats:
        pytest.fail(
            f"{module.__name__}: {ran} test(s) passed but no Triton kernel was launched in the whole module -- the "
            "parity tests compared the reference with itself (TRITON_INTERPRET off? triton missing? a launcher "
            "falling back to PyTorch?)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _count_kernel_launches(request, _launches_by_module):
    if not _is_kernel_module(getattr(request, "module", None)):
        yield
        return
    from xkernels.testing import count_launches

    with count_launches() as launches:
        yield
    _launches_by_module[request.module.__name__].update(launches)


_PARTIAL_MODULES: set = set()


def pytest_deselected(items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None:
            _PARTIAL_MODULES.add(module.__name__)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    module = getattr(item, "module", None)  # (non-Python items have none)
    if report.when == "call" and report.passed and module is not None:
        module._xk_tests_passed = getattr(module, "_xk_tests_passed", 0) + 1
