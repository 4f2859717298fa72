"""The collective counter of ``benchmarks.bench_comms`` and its per-step formula, on torch's fake process group.

In one process (rank 0 of 4, backend "fake": collectives are dispatched like real ones but move no data), so the
test costs no spawned processes: every collective type is counted once with its bytes, and an FSDP2 step of the
benchmark's scaled model (the trainer's ``wrap_model``, ``build_adamw``, ``grad_norm``, the switch to Muon; with
and without the FP8 weight all-gather and its ``precompute_fp8_scales``) issues exactly the collectives
:func:`benchmarks.bench_comms.step_collectives` predicts.  The gloo runs at world 2/4 are
the benchmark itself (``python -m benchmarks.bench_comms``).
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from benchmarks import bench_comms as bc

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


@pytest.fixture
def fake_world4():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_counter_sees_each_collective_once_with_its_bytes(fake_world4):
    import torch.distributed._functional_collectives as funcol

    x = torch.ones(6)  # 24 bytes
    with bc.CommCounter() as counter:
        dist.all_reduce(x)
        dist.all_gather_into_tensor(torch.empty(24), x)
        dist.reduce_scatter_tensor(torch.empty(6), torch.ones(24))
        dist.all_to_all_single(torch.empty(8), torch.ones(8))
        dist.all_to_all_single(torch.empty(8), torch.ones(8), async_op=True).wait()
        dist.broadcast(x, 0)
        funcol.all_reduce(torch.ones(3), "sum", dist.group.WORLD).wait()
    got = [(r.kind, r.world, r.payload, r.bus) for r in counter.records]
    assert got == [
        ("all_reduce", 4, 24, 36.0),  # 2 (W-1)/W S
        ("all_gather", 4, 96, 72.0),  # payload = gathered output
        ("reduce_scatter", 4, 96, 72.0),  # payload = un-scattered input
        ("all_to_all", 4, 32, 24.0),
        ("all_to_all", 4, 32, 24.0),
        ("broadcast", 4, 24, 24.0),
        ("all_reduce", 4, 12, 18.0),  # functional collective (DTensor's path)
    ]


@pytest.mark.parametrize("fp8_all_gather", [False, True], ids=["fp32-gather", "fp8-gather"])
def test_fsdp2_step_matches_formula(fake_world4, fp8_all_gather):
    from xkernels.dispatch import force_backend
    from xkernels.fp8.fsdp import precompute_fp8_scales
    from xkernels.fp8.linear import FP8Linear
    from xmodel.config import XmodelConfig
    from xmodel.model import Xmodel
    from xmodel.train import _switch, grad_norm
    from xmodel.training.config import TrainConfig
    from xmodel.training.distributed import DistInfo, wrap_model
    from xmodel.training.optim import TrainOptimizer, build_adamw
    from xmodel.training.prepare import fp8_convert

    mc = XmodelConfig(**bc.SCALED)
    info = DistInfo(rank=0, world=4)
    cpu = torch.device("cpu")
    with torch.device("meta"):
        model = Xmodel(mc)
    model.to_empty(device="cpu")
    n_fp8 = 0
    if fp8_all_gather:
        with torch.no_grad():  # finite weights: the FP8 scales come from their amax
            for p in model.parameters():
                p.fill_(0.5)
        fp8_convert(model, TrainConfig(fp8="current", fp8_emulate=True, fp8_all_gather=True), cpu, info)
        n_fp8 = sum(isinstance(m, FP8Linear) for m in model.modules())
    model = wrap_model(model, "fsdp", cpu, info, 1, fp8_all_gather)
    opt = TrainOptimizer(build_adamw(model, 1e-3, 1e-2), model)
    if fp8_all_gather:
        precompute_fp8_scales(model)  # as train_loop: once before the first step (not counted)
    run = SimpleNamespace(optimizer=opt, cfg=SimpleNamespace(grad_clip=1.0))
    for optimizer in ("adamw", "muon"):  # the reference ops: the Triton interpreter is slow and changes no collective
        if optimizer == "muon":
            _switch(opt, TrainConfig(muon_dtype="fp32"))
        with bc.CommCounter() as counter, force_backend("torch"):
            with counter.in_phase("forward"):
                loss = model(torch.zeros(1, 4, dtype=torch.long)).logits.sum()  # fake collectives: garbage values
            with counter.in_phase("backward"):
                loss.backward()
            with counter.in_phase("clip"):
                grad_norm(run)
            with counter.in_phase("optimizer"):
                opt.step()
            if fp8_all_gather:
                with counter.in_phase("fp8_scales"):
                    assert precompute_fp8_scales(model) == n_fp8 == 14
        opt.zero_grad()
        want = [r for r in bc.step_collectives(mc, 4, 1, optimizer, fp8_linears=n_fp8, fp8_gather=fp8_all_gather)
                if r.phase != "trainer"]
        assert bc._key_totals(counter.records) == bc._key_totals(want), optimizer
    # the formula's group sizes and a hand count: 2 layers + root gathered in the forward, the layers again in
    # the backward, 3 reduce-scatters, one norm all-reduce; Muon adds 2 all-to-alls per shape bucket (4 shapes);
    # the FP8 all-gather adds one all-reduce of the 14 weight amaxes
    assert [len(counter.records), sum(r.kind == "all_to_all" for r in counter.records)] == [17 + fp8_all_gather, 8]
    if fp8_all_gather:  # a layer's gather: its 7 weight shards in 1 byte per element, its 2 norms in fp32
        layer = bc.fsdp_groups(mc)[0][1]
        shard = sum(bc.shard_numel(s, 4) * (1 if len(s) == 2 else 4) for s in layer)
        gathers = [r.payload for r in counter.records if r.kind == "all_gather" and r.phase == "forward"]
        assert gathers[1:] == [4 * shard, 4 * shard] and counter.records[-1].payload == 14 * 4


def test_formula_arithmetic():
    assert bc.shard_numel((1001, 96), 4) == 251 * 96  # dim 0 padded to ceil(1001/4) rows
    assert bc.ns_flops((3840, 1536)) == 5 * (4 * 1536 ** 2 * 3840 + 2 * 1536 ** 3)
    assert bc.bus("all_reduce", 1, 100) == 0.0 and bc.bus("all_gather", 8, 800) == 700.0
    # Muon's owner rule j % S restarts at rank 0 in every shape bucket: at S = 512 rank 0 owns one matrix of each
    # of the 1.3B's 4 shapes, most ranks none
    from xmodel.config import XmodelConfig

    owned = bc._owned(bc.hidden_matrices(XmodelConfig.from_preset("xmodel-2.5")), 512, bc.CUDA_CHUNK_NUMEL)
    assert (max(owned), owned[0], sum(owned), owned.count(0)) == (4, 4, 336, 416)
    with pytest.raises(ValueError, match="replicate=3 must divide world=4"):
        bc.step_collectives(XmodelConfig(**bc.SCALED), 4, 3)
