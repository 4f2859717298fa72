"""xkernels.dispatch: the one place choosing Triton kernel vs PyTorch reference."""

import pytest
import torch

import xkernels
import xkernels.rmsnorm as rmsnorm_mod
from xkernels import dispatch, force_backend, use_triton


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("XKERNELS_BACKEND", raising=False)
    return monkeypatch


def test_default_backend_is_auto(clean_env):
    assert dispatch.backend() == "auto"


@pytest.mark.parametrize("name", ["auto", "triton", "torch", "TORCH"])
def test_env_var_selects_backend(clean_env, name):
    clean_env.setenv("XKERNELS_BACKEND", name)
    assert dispatch.backend() == name.lower()


def test_bad_env_var_raises(clean_env):
    clean_env.setenv("XKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="XKERNELS_BACKEND must be one of"):
        use_triton(torch.zeros(1))


def test_auto_on_cpu_follows_interpreter_flag(clean_env):
    x = torch.zeros(2)
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreting() and use_triton(x) == dispatch.triton_available()
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreting() and not use_triton(x)


def test_forced_triton_on_cpu_without_interpreter_raises(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    clean_env.setenv("XKERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
        use_triton(torch.zeros(2))


def test_torch_backend_never_uses_triton(clean_env, device):
    clean_env.setenv("XKERNELS_BACKEND", "torch")
    assert not use_triton(torch.zeros(2, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_uses_triton_for_cuda_tensors(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert use_triton(torch.zeros(2, device="cuda"))


def test_force_backend_overrides_env_and_restores(clean_env):
    clean_env.setenv("XKERNELS_BACKEND", "auto")
    with force_backend("torch"):
        assert dispatch.backend() == "torch"
        with force_backend("triton"):
            assert dispatch.backend() == "triton"
        assert dispatch.backend() == "torch"
    assert dispatch.backend() == "auto"


def test_force_backend_restores_after_exception(clean_env):
    with pytest.raises(KeyError):
        with force_backend("torch"):
            raise KeyError("boom")
    assert dispatch.backend() == "auto"


def test_force_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with force_backend("numpy"):
            pass


def test_public_op_routes_through_dispatch(clean_env, device, monkeypatch):
    """rms_norm launches the kernel exactly when use_triton says so, and the reference otherwise."""
    launches = []
    real = rmsnorm_mod._rmsnorm_fwd

    def spy(*args):
        launches.append(args)
        return real(*args)

    monkeypatch.setattr(rmsnorm_mod, "_rmsnorm_fwd", spy)
    x = torch.randn(3, 16, device=device)
    w = torch.rand(16, device=device)
    with force_backend("torch"):
        out = xkernels.rms_norm(x, w)
    assert launches == []
    assert torch.equal(out, xkernels.rms_norm_ref(x, w))
    if use_triton(x):
        out = xkernels.rms_norm(x, w)
        assert len(launches) == 1
        torch.testing.assert_close(out, xkernels.rms_norm_ref(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ops_trace_under_torch_compile_fullgraph(device, backend):
    """RMSNorm (+add) and rotary compile without graph breaks on the torch path, and on the kernel path
    as opaque custom ops; values and gradients match eager references."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def f(x, r, w, q, k, cos, sin, pos):
        y, s = xkernels.add_rms_norm(x, r, w)
        y2 = xkernels.rms_norm(y, w)
        q_out, k_out = xkernels.apply_rotary(q, k, cos, sin, pos)
        return (y2 * y2).sum() + (s * s).sum() + (q_out * q_out.detach()).sum() + (k_out * k_out.detach()).sum()

    def f_ref(x, r, w, q, k, cos, sin, pos):
        y, s = xkernels.add_rms_norm_ref(x, r, w)
        y2 = xkernels.rms_norm_ref(y, w)
        q_out, k_out = xkernels.apply_rotary_ref(q, k, cos, sin, pos)
        return (y2 * y2).sum() + (s * s).sum() + (q_out * q_out.detach()).sum() + (k_out * k_out.detach()).sum()

    leaves = [
        torch.randn(4, 32, device=device),
        torch.randn(4, 32, device=device),
        torch.rand(32, device=device) + 0.5,
        torch.randn(1, 4, 2, 16, device=device),
        torch.randn(1, 4, 1, 16, device=device),
    ]
    leaves = [t.requires_grad_() for t in leaves]
    cos, sin = xkernels.rotary_cos_sin(8, 16, device=device)
    pos = torch.arange(4, device=device)[None] + 2
    torch._dynamo.reset()
    with force_backend(backend):
        out = torch.compile(f, fullgraph=True, backend=recording_backend)(*leaves, cos, sin, pos)
        uses_kernels = use_triton(leaves[0])
    grads = torch.autograd.grad(out, leaves)
    expected = f_ref(*leaves, cos, sin, pos)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert len(graphs) == 1
    for op in ("rms_norm_fwd", "rotary"):
        assert (f"xkernels.{op}" in graphs[0]) == uses_kernels, op


def test_launch_on_is_a_device_guard():
    import contextlib

    from xkernels.dispatch import launch_on

    assert isinstance(launch_on(torch.zeros(1)), contextlib.nullcontext)
    if torch.cuda.is_available():
        guard = launch_on(torch.zeros(1, device="cuda"))
        assert isinstance(guard, torch.cuda.device)


@pytest.mark.parametrize("module", ["rmsnorm", "rotary", "swiglu", "cross_entropy", "newton_schulz"])
def test_every_launch_is_inside_launch_on(module):
    """Structural: each ``kernel[grid](...)`` call in the module sits inside ``with launch_on(...)``, so a
    process driving several GPUs launches on the tensors' GPU (Triton uses the *current* device)."""
    import ast
    import importlib
    import inspect

    tree = ast.parse(inspect.getsource(importlib.import_module(f"xkernels.{module}")))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    launches = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
        and isinstance(n.func.value, ast.Name) and n.func.value.id.endswith("_kernel")
    ]
    assert launches, module
    for call in launches:
        node, guarded = call, False
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.With) and any("launch_on" in ast.unparse(i.context_expr) for i in node.items):
                guarded = True
                break
        assert guarded, f"{module}: {ast.unparse(call)[:60]} is not inside `with launch_on(...)`"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ops_on_second_gpu_while_first_is_current():
    x = torch.randn(8, 64, device="cuda:1")
    w = torch.rand(64, device="cuda:1") + 0.5
    with torch.cuda.device(0):
        out = xkernels.rms_norm(x, w)
    torch.testing.assert_close(out, xkernels.rms_norm_ref(x, w), rtol=1e-5, atol=1e-5)
