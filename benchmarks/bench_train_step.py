"""End-to-end training step (forward, backward, AdamW step): tokens/s and MFU.

CUDA: the 1.3B architecture at full width (hidden 1536, 24/8 heads x 64, FFN 3840, vocab 129280) with **4 of its
48 layers** (so that eager, compiled and FP8 variants fit the report's time budget; per-layer cost is unchanged,
the LM head weighs more than in the full model), bf16 parameters, batch 2 x seq 4096.  Variants: ``eager``
(Xmodel on the PyTorch path, ``force_backend("torch")``), ``xkernels`` (our kernels), ``xkernels+compile``
(``torch.compile(model)``, our kernels as custom ops) and ``xkernels+fp8`` (``convert_to_fp8``: FP8 linears, the
LM head stays bf16); peer ``hf-llama``: a Hugging Face ``transformers`` LlamaForCausalLM of identical shape.

CPU: the ``cpu-default`` preset (4 layers, hidden 256, vocab 4096), fp32, batch 4 x seq 256, Xmodel vs the HF
Llama of identical shape (μP scalars aside) -- to show our model code is not slower.  On CPU ``xkernels`` already
runs the PyTorch path, so there is no separate ``eager`` case.

FLOPs per step: ``config.flops_per_token(seq) * tokens`` (matmuls only, backward = 2x forward); MFU is that rate
over the measured bf16 (CUDA) or fp32 (CPU) matmul ceiling, reported as ``pct_of_ceiling``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import xkernels
from benchmarks.common import DEVICE, ON_CUDA, compile_fn, import_peer, pick, require_attr, require_cuda, run
from xmodel.config import XmodelConfig
from xmodel.model import Xmodel

PRESET, OVERRIDES = pick(("xmodel-2.5", {"num_hidden_layers": 4}), ("cpu-default", {}))
BATCH, SEQ = pick((2, 4096), (4, 256))
DTYPE = pick(torch.bfloat16, torch.float32)
IMPLS = ["eager", "xkernels", "xkernels+compile", "xkernels+fp8", "hf-llama"]


def _hf_llama(cfg: XmodelConfig) -> torch.nn.Module:
    transformers = import_peer("transformers", "transformers (pip install transformers)")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=max(SEQ, 2048),
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    with torch.device(DEVICE):
        return transformers.LlamaForCausalLM(hf_cfg)


def _build(impl: str, cfg: XmodelConfig):
    """``(model, loss_fn(model, ids, labels), backend_context)`` for one variant."""
    if impl == "eager" and not ON_CUDA:
        pytest.skip("on CPU the xkernels case already runs the PyTorch path (it is the eager baseline)")
    if impl in ("xkernels+compile", "xkernels+fp8"):
        require_cuda(impl)
    if impl == "hf-llama":
        model = _hf_llama(cfg).to(DTYPE)
        return model, (lambda m, ids, labels: m(input_ids=ids, labels=ids).loss), contextlib.nullcontext
    with torch.device(DEVICE):
        model = Xmodel(cfg)
    model = model.to(DTYPE)
    if impl == "xkernels+fp8":
        fp8 = import_peer("xkernels.fp8", "xkernels.fp8")
        require_attr(fp8, "convert_to_fp8", "xkernels.fp8.convert_to_fp8")(model, fp8.FP8Recipe())
    forward = model
    if impl == "xkernels+compile":
        forward = compile_fn(model)
    backend = (lambda: xkernels.force_backend("torch")) if impl == "eager" else contextlib.nullcontext
    return model, (lambda m, ids, labels: forward(ids, labels=labels).loss), backend


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, impl):
    cfg = XmodelConfig.from_preset(PRESET, **OVERRIDES)
    model, loss_fn, backend = _build(impl, cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    batch, seq = (1, 64) if benchmark.disabled else (BATCH, SEQ)  # CI smoke: one tiny step

    def make_inputs():
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=DEVICE)
        return (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()), None

    def step(ids, labels):
        with backend():
            loss = loss_fn(model, ids, labels)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens = batch * seq
    run(
        benchmark,
        fn=step,
        make_inputs=make_inputs,
        mode="call",
        impl=impl,
        family="train_step",
        group=f"train step {PRESET}{'-' + str(cfg.num_hidden_layers) + 'L' if OVERRIDES else ''} {batch}x{seq} "
        f"{str(DTYPE).removeprefix('torch.')}",
        shape=f"{batch}x{seq}",
        dtype=DTYPE,
        flops=cfg.flops_per_token(seq) * tokens,
        ceiling="matmul_bf16_tflops" if DTYPE == torch.bfloat16 else "matmul_fp32_tflops",
        warmup=pick(3, 1),
        extra={"tokens": tokens, "layers": cfg.num_hidden_layers, "preset": PRESET},
    )
