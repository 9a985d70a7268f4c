"""BlockDance against the alternatives at matched speed: quality and speed on the reference DiT.

    python -m benchmarks.quality --quick                  # all parts on CPU, 20 samples (minutes)
    python -m benchmarks.quality --part quality --device cuda --samples 1000 --data mnist5k.npz
    python -m benchmarks.quality --part speed             # always CPU, one thread
    python -m benchmarks.quality --part report            # merge the two into quality.md/.csv/PNGs

For DDIM 50 steps and DPM-Solver++ 25 steps (batched classifier-free guidance, scale 3) on the
project's MNIST DiT (``bd_compile/data/reference_model``), every method samples the same seeds and
labels (the same initial noise per sample):

- ``full``: all blocks every step (the reference output);
- BlockDance N = 2, 3, 4 at the paper's cache block (75% of depth) and windows 25-95% (the
  paper's DiT setting) and 40-95% (``backend="blockdance"``; one compiled model, the schedule
  switched with ``bd_compile.set_schedule``, no recompile);
- DeepCache-style reuse: blocks ``0 .. n/2 - 1`` cached, N = 2, window 0-100% (the same backend);
- step reduction: the same sampler with ``round(S / speedup)`` steps for each caching setting's
  FLOP-bound speedup;
- diffusers' ``FirstBlockCache`` hook (eager: its skip decision is a Python branch on ``.item()``
  behind ``torch.compiler.disable``, a graph break under ``torch.compile``) at thresholds picked
  on a probe batch to land near the BlockDance speedups;
- BlockDance with a calibration file (``--calibration``, from ``python -m bd_compile.analysis``).

Parts: ``quality`` (on ``--device``) writes ``results/quality_metrics.csv`` (SSIM and PSNR vs
the full output of the same seed, classifier-feature FID vs the training digits, class accuracy;
mean and standard error over seed splits; floors), ``.json`` (machine, command, seeds) and
``quality_samples.npz`` (the first samples of every method, for the grid); ``speed`` (CPU, one
thread, a fixed batch) writes ``results/quality_speed.csv``/``.json`` (median per-generation time,
speedup over plain inductor, FLOP-bound speedup); ``report`` merges them into ``quality.md``,
``quality.csv``, ``quality_pareto.png`` and ``quality_grid.png``. ``--quick`` suffixes every file
with ``-quick``. The metrics are defined in benchmarks/README.md.
"""

from benchmarks.quality.cli import main

__all__ = ["main"]
