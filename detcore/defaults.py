"""The built-in default: presets of the synthetic benchmark, and the data and teacher they need.

`distill precompute` with no arguments and `distill quickstart` use these; everything is made
by the project's own commands (nothing is downloaded) and kept under `default_home()`, so a
second run reuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Preset:
    """Budgets of one quickstart preset (all measured on the 2-core CPU machine)."""

    name: str
    """Preset name, used in directory names."""
    num_train: int
    """Synthetic training images."""
    num_val: int
    """Synthetic validation images."""
    canvas: int
    """Square canvas side in pixels."""
    teacher_arch: str
    """Teacher architecture (detcore name)."""
    teacher_channels: int
    """Teacher FPN and head width."""
    teacher_epochs: int
    """Teacher training epochs."""
    teacher_lr: float
    """Teacher AdamW learning rate."""
    student_arch: str
    """Student architecture (detcore name)."""
    student_epochs: int
    """Student training epochs (baseline and every distilled row alike)."""
    student_lr: float
    """Student AdamW learning rate."""
    batch_size: int
    """Batch size of every training step."""
    methods: tuple[str, ...] = ("ld",)
    """Distillation rows after the baseline (each `--losses` value of `distill train`)."""
    scales: tuple[float, ...] = (1.0,)
    """View scales stored per image (each with a flipped twin)."""


PRESETS = {
    # About 12 minutes on 2 CPU cores: proves the pipeline, not the method (budgets too small).
    "quick": Preset("quick", 600, 100, 128, "gfl_r18", 64, 8, 2e-3, "gfl_tiny", 6, 2e-3, 16),
    # The benchmark recipe of benchmarks/RESULTS.md (hours on 2 cores; minutes on a GPU).
    "benchmark": Preset(
        "benchmark", 5000, 500, 256, "gfl_r18", 64, 24, 2e-3, "gfl_tiny", 24, 2e-3, 16,
        methods=("ld", "bcd", "fgd", "hgd", "ld,fgd"),
    ),
}


def default_home() -> Path:
    """Where the built-in default keeps data, checkpoints and stores: $DISTILLERY_HOME or ./distillery_runs."""
    return Path(os.environ.get("DISTILLERY_HOME", "distillery_runs")).resolve()


