"""RMSNorm launch structures side by side from sm_90a PTX, no GPU needed (issue 21 item 4).

    TRITON_INTERPRET= PYTHONPATH=$PWD python -m benchmarks.rmsnorm_structure [--hidden 1536]

Forward: ``FWD_LAYOUT="block"`` (today) vs ``"warp_per_row"``; backward: ``BWD_SCHEDULE="occupancy"`` (today) vs
``"per_sm"``.  Per variant: registers, spills, shared memory, ``bar.sync`` / ``shfl.sync`` counts in the PTX, programs
per SM on an H100-like SM (64K registers, 2048 threads, 228 KiB shared, 132 SMs; xkernels.rmsnorm.programs_per_sm),
the rows in flight per SM (forward) and the dweight partial-row traffic against the op's main traffic (backward).
Timing the two needs a GPU: set ``xkernels.rmsnorm.FWD_LAYOUT`` / ``BWD_SCHEDULE`` and run benchmarks/bench_rmsnorm.py.
"""

from __future__ import annotations

import argparse
import re
from types import SimpleNamespace

import torch

import xkernels.rmsnorm as R
from xkernels.aot import compile_kernel

H100 = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                       shared_memory_per_multiprocessor=228 * 1024, multi_processor_count=132)
ALIGNED = ("stride_x", "stride_r", "stride_dy", "stride_ds", "n_cols")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    hidden = parser.parse_args(argv).hidden
    torch.cuda.get_device_properties = lambda index: H100  # programs_per_sm reads the SM's limits from here
    sms = H100.multi_processor_count
    for dt, esize in (("*bf16", 2), ("*fp32", 4)):
        types = dict(X=dt, R=dt, W=dt, Y=dt, S=dt, RSTD="*fp32", DY=dt, DS=dt, DX=dt, DXS=dt, DW_PARTIAL="*fp32",
                     eps="fp32", scale="fp32", offset="fp32")
        opts = dict(HAS_WEIGHT=True, HAS_OFFSET=False, CASTING=0)
        for layout in R._FWD_LAYOUTS:
            cfg = R._launch_config(hidden, esize, layout)
            for res in (False, True):
                consts = dict(HAS_RESIDUAL=res, HAS_SCALE=False, BLOCK=cfg.block, ONE_BLOCK=cfg.one_block,
                              WARP_ROWS=cfg.warp_rows, **opts)
                st = compile_kernel(R._rmsnorm_fwd_kernel, types, consts, num_warps=cfg.num_warps, aligned=ALIGNED)
                per_sm = R.programs_per_sm(st.registers, st.shared, cfg.num_warps, 0)
                bars, shfls = len(re.findall(r"bar\.sync", st.ptx)), len(re.findall(r"shfl\.sync", st.ptx))
                lanes = cfg.block * (1 if cfg.one_block else -(-hidden // cfg.block))
                print(f"fwd {dt[1:]:4s} {layout:12s} residual={int(res)} BLOCK={cfg.block} warps={cfg.num_warps} "
                      f"regs={st.registers} spill={st.spill_bytes} smem={st.shared} "
                      f"bar.sync={bars} shfl={shfls} "
                      f"programs/SM={per_sm} rows in flight/SM={per_sm * max(cfg.warp_rows, 1)} "
                      f"lanes used={hidden / lanes:.0%}")
        for schedule in R._BWD_SCHEDULES:
            cfg, stages = R._bwd_launch_config(hidden, schedule)
            consts = dict(HAS_DS=True, HAS_SCALE=False, BLOCK=cfg.block, ONE_BLOCK=cfg.one_block, NUM_STAGES=stages,
                          **opts)
            st = compile_kernel(R._rmsnorm_bwd_kernel, types, consts, num_warps=cfg.num_warps, num_stages=stages,
                                aligned=ALIGNED)
            per_sm = R.programs_per_sm(st.registers, st.shared, cfg.num_warps, 0)
            programs = per_sm * sms if schedule == "occupancy" else sms
            partial = programs * hidden * 4 * 2  # fp32 rows written, then read by the final sum
            main_bytes = {t: 8 * t * hidden * esize for t in (4096, 16384)}  # add_rms_norm fwd+bwd minimum traffic
            share = ", ".join(f"{t} tokens {partial / b:.1%}" for t, b in main_bytes.items())
            print(f"bwd {dt[1:]:4s} {schedule:10s} stages={stages} warps={cfg.num_warps} regs={st.registers} "
                  f"spill={st.spill_bytes} smem={st.shared} programs/SM that fit={per_sm} programs={programs} "
                  f"dweight partials={partial / 1e6:.2f} MB ({share} of the fused add's fwd+bwd bytes)")


if __name__ == "__main__":
    main()
