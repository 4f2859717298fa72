"""What GPU rounding in the interpreter changes: ``python -m benchmarks.interpreter_rounding`` (CPU, ~1 min).

The bf16 error of the Triton path (run through Triton's CPU interpreter) and of the PyTorch path, each against the
float64 reference, first with the interpreter's own fp32 -> bf16 casts (it truncates), then with
:func:`xkernels.testing.round_casts_like_gpu` (round to nearest even, as a GPU does).  Error: max|out - ref| / max|ref|.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before xkernels (and so triton.jit) is imported

import torch  # noqa: E402

import xkernels  # noqa: E402
from xkernels import force_backend  # noqa: E402
from xkernels.testing import round_casts_like_gpu  # noqa: E402

def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def cases():
    """(name, bf16 op on the current backend, float64 reference on the same bf16-rounded inputs)."""
    torch.manual_seed(0)
    x, w = torch.randn(67, 1000).bfloat16(), (torch.randn(1000) * 0.2 + 1).bfloat16()
    yield "rms_norm 67x1000", lambda: xkernels.rms_norm(x, w), xkernels.rms_norm_ref(x.double(), w.double())
    g, u = (torch.randn(67, 1000) * 3).bfloat16(), torch.randn(67, 1000).bfloat16()
    yield "swiglu 67x1000", lambda: xkernels.swiglu(g, u), xkernels.swiglu_ref(g.double(), u.double())
    cos, sin = xkernels.rotary_cos_sin(64, 64, theta=500000.0)
    q, k = torch.randn(2, 33, 6, 64).bfloat16(), torch.randn(2, 33, 2, 64).bfloat16()
    qr, kr = xkernels.apply_rotary_ref(q.double(), k.double(), cos.double(), sin.double())
    yield (
        "apply_rotary 2x33x(6+2)x64",
        lambda: torch.cat([t.flatten() for t in xkernels.apply_rotary(q, k, cos, sin)]),
        torch.cat([qr.flatten(), kr.flatten()]),
    )
    G = torch.randn(6, 17, 33)
    yield (
        "newton_schulz 6x17x33",
        lambda: xkernels.newton_schulz(G, 5, dtype=torch.bfloat16),
        xkernels.newton_schulz_ref(G.double(), dtype=torch.float64),
    )


def main() -> None:
    res = {}
    for mode in ("truncate", "rne"):
        if mode == "rne":
            round_casts_like_gpu()
        for name, fn, ref in cases():
            with force_backend("triton"):
                t = fn()
            with force_backend("torch"):
                p = fn()
            res.setdefault(name, {})[mode] = (rel(t, ref), rel(p, ref))
    print("| op (bf16) | torch path | Triton, interpreter truncating | Triton, rounding like a GPU |")
    print("|---|---|---|---|")
    for name, d in res.items():
        print(f"| {name} | {d['rne'][1]:.2e} | {d['truncate'][0]:.2e} | {d['rne'][0]:.2e} |")


if __name__ == "__main__":
    main()
