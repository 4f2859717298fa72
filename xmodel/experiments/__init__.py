"""The paper's claims in miniature, as runnable experiments that write JSON + PNG into an output directory.

* ``python -m xmodel.experiments.coord_check`` -- μP coordinate check (activation RMS vs width, μP vs SP)
* ``python -m xmodel.experiments.lr_transfer`` -- learning-rate sweep at several widths, μP vs SP
* ``python -m xmodel.experiments.muon_switch`` -- decays forked from one stable checkpoint: AdamW throughout vs
  AdamW -> Muon at the decay, several decay lengths, five evaluation sets (``--reanalyse`` rebuilds from the JSON)
* ``python -m xmodel.experiments.muon_ablation`` -- Muon lr scale x0.5/x1/x2 and Muon from the start, one decay length
* ``python -m xmodel.experiments.fp8_parity``  -- the same run in fp32/bf16 and in FP8 (emulated on CPU)

Each takes ``--out DIR`` and ``--quick`` (a seconds-long version used by the tests). Results: ``docs/results.md``.
"""
