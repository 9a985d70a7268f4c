"""Data shipped inside the package, so that the demo runs after a plain ``pip install .``.

``REFERENCE_MODEL`` is the project's trained class-conditional MNIST DiT (a diffusers
``DiTTransformer2DModel`` saved with ``save_pretrained``: ``config.json``, fp16 EMA weights,
``scheduler/scheduler_config.json``); its model card is ``benchmarks/reference/README.md``.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_MODEL = Path(__file__).resolve().parent / "reference_model"
