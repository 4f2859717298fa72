"""Distributed Muon on CPU with gloo: 2 processes (torch.multiprocessing.spawn).

Each worker trains a small tied-embedding model three steps with the hybrid optimizer three ways -- single
process on the full batch (the reference), DDP and FSDP2 (``fully_shard``, DTensors sharded on dim 0) on
half the batch each -- and checks that the distributed parameters equal the reference.  The FSDP2 run also
saves every rank's optimizer state after step 2 (per-rank ``torch.save``, and ``torch.distributed.checkpoint``
as the trainer does), restores it into a fresh optimizer and checks step 3 continues identically.  Shapes are
odd on purpose (5 and 23 rows: uneven shards, one tall matrix).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.distributed

WORLD = 2
VOCAB, HIDDEN, FFN, KV = 11, 16, 23, 5
STEPS = 3


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.Parameter(torch.ones(HIDDEN))
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, h):
        x = F.rms_norm(h, (HIDDEN,), self.input_layernorm)
        h = h + self.o_proj(torch.tanh(self.q_proj(x))) + self.k_proj(x).mean(-1, keepdim=True)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([_Block() for _ in range(2)])
        self.norm = nn.Parameter(torch.ones(HIDDEN))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one Parameter

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(F.rms_norm(h, (HIDDEN,), self.norm))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _make_optimizer(model, compute_dtype, distributed):
    from xkernels.optim import MuonWithAuxAdamW, muon_param_groups

    groups = muon_param_groups(model, lr=0.02, embed_lr=0.01, adamw_lr=0.005, weight_decay=0.1)
    return MuonWithAuxAdamW(
        groups, adjust_lr_fn="match_rms_adamw", compute_dtype=compute_dtype, distributed=distributed
    )


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2 * WORLD, 7), generator=g) for _ in range(STEPS)]


def _reference(compute_dtype):
    torch.manual_seed(0)
    model = _Toy()
    opt = _make_optimizer(model, compute_dtype, distributed=False)
    for tokens in _batches():
        opt.zero_grad()
        model(tokens).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_matches(got: dict, ref: dict, compute_dtype, what: str):
    # fp32 Newton–Schulz: only gradient-reduction order differs; bf16: rounding flips in NS can appear.
    atol = 2e-5 if compute_dtype == torch.float32 else 2e-3
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=0, msg=lambda m: f"{what} {name}: {m}")


def _setup_worker():
    os.environ["XKERNELS_BACKEND"] = "torch"  # kernels are covered by test_newton_schulz; here the plumbing
    torch.set_num_threads(1)  # 2 processes on 2 cores: more OpenMP threads only contend (tiny GEMMs 1000x slower)


def _check_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    for compute_dtype in (torch.float32, torch.bfloat16):
        ref = _reference(compute_dtype)
        torch.manual_seed(0)
        model = _Toy()
        ddp = DDP(model)
        opt = _make_optimizer(model, compute_dtype, distributed=None)  # auto: world of 2 -> DDP split
        for tokens in _batches():
            opt.zero_grad()
            ddp(tokens[rank * 2 : rank * 2 + 2]).backward()
            opt.step()
        _assert_matches({n: p.detach() for n, p in model.named_parameters()}, ref, compute_dtype, "DDP")
        # every rank holds every momentum buffer (and the same values)
        bufs = [opt.state[p]["momentum_buffer"] for g in opt.param_groups if g["use_muon"] for p in g["params"]]
        assert len(bufs) == 12
        flat = torch.cat([b.flatten() for b in bufs])
        other = flat.clone()
        dist.broadcast(other, src=0)
        torch.testing.assert_close(flat, other, atol=0, rtol=0)


def _check_fsdp2(rank, state_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for compute_dtype in (torch.float32, torch.bfloat16):
        ref = _reference(compute_dtype)

        def build():
            torch.manual_seed(0)
            model = _Toy()
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model

        model = build()
        assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
        opt = _make_optimizer(model, compute_dtype, distributed=None)
        batches = _batches()
        for i, tokens in enumerate(batches):
            opt.zero_grad()
            model(tokens[rank * 2 : rank * 2 + 2]).backward()
            opt.step()
            if i == STEPS - 2:  # checkpoint every rank's own state, then continue in a fresh optimizer
                path = os.path.join(state_dir, f"{compute_dtype}-rank{rank}.pt")
                torch.save(opt.state_dict(), path)
                params_before = {n: p.full_tensor() for n, p in model.named_parameters()}
                saved_model_state = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        _assert_matches(full, ref, compute_dtype, "FSDP2")

        # restore: fresh model at the step-2 weights + fresh optimizer loading this rank's file
        model2 = build()
        with torch.no_grad():
            for n, p in model2.named_parameters():
                p.to_local().copy_(saved_model_state[n])
        torch.testing.assert_close({n: p.full_tensor() for n, p in model2.named_parameters()}, params_before)
        opt2 = _make_optimizer(model2, compute_dtype, distributed=None)
        opt2.load_state_dict(torch.load(path, weights_only=False))
        bufs = [opt2.state[p]["momentum_buffer"] for g in opt2.param_groups if g["use_muon"] for p in g["params"]]
        assert len(bufs) == 12 and all(float(b.to_local().abs().sum()) > 0 or b.to_local().numel() == 0 for b in bufs)
        opt2.zero_grad()
        model2(batches[-1][rank * 2 : rank * 2 + 2]).backward()
        opt2.step()
        for n, p in model2.named_parameters():
            torch.testing.assert_close(p.full_tensor(), full[n], atol=0, rtol=0, msg=lambda m: f"resume {n}: {m}")


def _check_fsdp2_dcp(rank, tmp):
    """The trainer's path: torch.distributed.checkpoint with get/set_optimizer_state_dict (whose zero-lr
    initialising step the optimizer must survive) resumes exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))

    def build():
        torch.manual_seed(0)
        model = _Toy()
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, _make_optimizer(model, torch.float32, distributed=None)

    batches = [b[rank * 2 : rank * 2 + 2] for b in _batches()]
    model, opt = build()
    for tokens in batches[:2]:
        opt.zero_grad()
        model(tokens).backward()
        opt.step()
    ckpt = os.path.join(tmp, "dcp")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    opt.zero_grad()
    model(batches[2]).backward()
    opt.step()

    model2, opt2 = build()
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    opt2.zero_grad()
    model2(batches[2]).backward()
    opt2.step()
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(
            q.full_tensor(), p.full_tensor(), atol=0, rtol=0, msg=lambda m: f"DCP resume {n}: {m}"
        )


def _worker(rank, tmp):
    _setup_worker()
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=WORLD)
    try:
        _check_ddp(rank)
        _check_fsdp2(rank, tmp)
        _check_fsdp2_dcp(rank, tmp)
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_steps_equal_single_process_and_state_round_trips():
    """One spawn for both checks: process start-up (torch + torch._dynamo imports) dominates the runtime."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=True)
