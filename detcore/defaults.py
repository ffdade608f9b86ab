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
    """Budgets of one quickstart preset."""

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
    seeds: tuple[int, ...] = (0,)
    """Student seeds: every row (baseline and distilled) is trained once per seed."""
    data_variant: str = "standard"
    """`detcore.synth` variant of the synthetic data ("standard" benchmark or "easy")."""

    @property
    def run_name(self) -> str:
        """Directory name of the preset's data, teacher, store and students."""
        return self.name if self.data_variant == "standard" else f"{self.name}-{self.data_variant}"


PRESETS = {
    # Tiny budgets: proves every step's wiring, the seeds and the report (used by tests/test_quickstart.py).
    "smoke": Preset(
        "smoke", 12, 6, 64, "gfl_tiny", 32, 1, 2e-3, "gfl_tiny", 1, 2e-3, 4,
        methods=("ld", "ld,ld_im"), seeds=(0, 1), data_variant="easy",
    ),
    # The quickstart: the easy synthetic variant, so that a short budget gives a clearly stronger
    # teacher; LD and the reproduction's strongest combination, two seeds per student.
    "quick": Preset(
        "quick", 600, 100, 128, "gfl_r18", 64, 10, 2e-3, "gfl_tiny", 6, 2e-3, 16,
        methods=("ld", "ld,ld_im"), seeds=(0, 1), data_variant="easy",
    ),
    # The budget of the reproduction table in benchmarks/RESULTS.md: teacher 23 min, each
    # student 5-15 min on 2 CPU cores (about 1.7 hours in all); minutes on a GPU.
    "benchmark": Preset(
        "benchmark", 1600, 200, 128, "gfl_r18", 64, 20, 2e-3, "gfl_tiny", 20, 2e-3, 16,
        methods=("ld", "bcd", "fgd", "hgd", "ld,fgd", "ld,ld_im"),
    ),
}


def default_home() -> Path:
    """Where the built-in default keeps data, checkpoints and stores: $DISTILLERY_HOME or ./distillery_runs."""
    return Path(os.environ.get("DISTILLERY_HOME", "distillery_runs")).resolve()




def default_paths(preset: Preset | str = "quick", home: Path | None = None) -> dict[str, Path]:
    """Where the built-in default's dataset, teacher and store live for a preset."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    home = Path(home) if home is not None else default_home()
    data = home / "data" / f"synth-{preset.run_name}"
    teacher_dir = home / "teacher" / f"{preset.run_name}-{preset.teacher_arch}"
    return {
        "data": data,
        "train_annotations": data / "annotations" / "train.json",
        "train_images": data / "train",
        "val_annotations": data / "annotations" / "val.json",
        "val_images": data / "val",
        "teacher_dir": teacher_dir,
        "teacher": teacher_dir / "final.pt",
        "store": home / "stores" / f"{preset.run_name}-{preset.teacher_arch}.zarr",
        "students": home / "students" / preset.run_name,
        "report": home / "reports" / f"quickstart-{preset.run_name}.html",
    }


def ensure_default_dataset(preset: Preset | str = "quick", home: Path | None = None) -> tuple[Path, Path, Path, Path]:
    """Generate the preset's synthetic dataset unless it exists.

    Returns ``(train_annotations, train_images, val_annotations, val_images)``.
    """
    from detcore.synth import generate

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    paths = default_paths(preset, home)
    # val.json is written last by the generator, so its presence means a complete dataset.
    if not paths["val_annotations"].exists():
        generate(paths["data"], num_train=preset.num_train, num_val=preset.num_val, seed=0, variant=preset.data_variant)
    return paths["train_annotations"], paths["train_images"], paths["val_annotations"], paths["val_images"]


def ensure_default_teacher(preset: Preset | str = "quick", home: Path | None = None) -> Path:
    """Train the preset's teacher with `detcore.train` unless ``final.pt`` exists (resumes a killed run)."""
    from detcore.train import TrainConfig, train_detector

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    paths = default_paths(preset, home)
    if not paths["teacher"].exists():
        train_ann, train_img, val_ann, val_img = ensure_default_dataset(preset, home)
        config = TrainConfig(
            annotations=str(train_ann),
            images=str(train_img),
            arch=preset.teacher_arch,
            out_dir=str(paths["teacher_dir"]),
            canvas=(preset.canvas, preset.canvas),
            epochs=preset.teacher_epochs,
            batch_size=preset.batch_size,
            lr=preset.teacher_lr,
            fpn_channels=preset.teacher_channels,
            head_channels=preset.teacher_channels,
            val_annotations=str(val_ann),
            val_images=str(val_img),
        )
        train_detector(config)
    return paths["teacher"]
