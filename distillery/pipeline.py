"""`distill quickstart`: the whole product on the built-in default, end to end.

    synthetic dataset -> teacher -> precompute on a local Ray cluster -> label store
      -> students trained against the store -> COCO AP table

Every step runs as its own `distill` subprocess, exactly as a user would type it: the
student steps are separate processes that never load the teacher (the product's promise),
and a step that fails stops the pipeline with its command printed so it can be re-run
alone. Every step is resumable, so re-running `distill quickstart` skips finished work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from detcore.defaults import PRESETS, Preset, default_home, default_paths


@dataclass
class Step:
    name: str
    argv: list[str]
    done_marker: Path | None
    """Output whose presence means the step finished; None for steps that always run
    (precompute resumes on its own and skips committed views)."""


def _distill(*args: str) -> list[str]:
    return [sys.executable, "-m", "distillery.cli", *args]


def _run(step: Step, env: dict[str, str]) -> None:
    if step.done_marker is not None and step.done_marker.exists():
        print(f"[quickstart] {step.name}: done already ({step.done_marker})", flush=True)
        return
    print(f"[quickstart] {step.name}: {shlex.join(step.argv[2:]).replace('distillery.cli', 'distill', 1)}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(step.argv, env=env)
    if completed.returncode not in (0, 3):
        raise SystemExit(
            f"[quickstart] step '{step.name}' failed with exit code {completed.returncode}; "
            f"re-run it alone with: {shlex.join(step.argv)}"
        )
    if step.done_marker is not None and not step.done_marker.exists():
        raise SystemExit(f"[quickstart] step '{step.name}' finished but did not write {step.done_marker}")
    print(f"[quickstart] {step.name}: {time.perf_counter() - started:.0f} s", flush=True)


def run_quickstart(preset: Preset, home: Path) -> int:
    from detcore.evaluate import format_ap_table

    paths = default_paths(preset, home)
    data, teacher_dir, store, students = paths["data"], paths["teacher_dir"], paths["store"], paths["students"]
    train_ann, val_ann = paths["train_annotations"], paths["val_annotations"]
    train_img, val_img = paths["train_images"], paths["val_images"]
    canvas = f"{preset.canvas}x{preset.canvas}"
    env = dict(os.environ)
    val_args = ["--val-annotations", str(val_ann), "--val-images", str(val_img)]

    steps = [
        Step(
            "dataset",
            _distill("data", "synth", "--out", str(data), "--num-train", str(preset.num_train),
                     "--num-val", str(preset.num_val), "--seed", "0"),
            val_ann,
        ),
        Step(
            "teacher",
            _distill("detector", "train", "--annotations", str(train_ann), "--images", str(train_img),
                     "--arch", preset.teacher_arch, "--fpn-channels", str(preset.teacher_channels),
                     "--head-channels", str(preset.teacher_channels), "--canvas", canvas,
                     "--epochs", str(preset.teacher_epochs), "--batch-size", str(preset.batch_size),
                     "--lr", str(preset.teacher_lr), "--out", str(teacher_dir), *val_args),
            teacher_dir / "final.pt",
        ),
        Step(
            "precompute",
            _distill("precompute", "--annotations", str(train_ann), "--images", str(train_img),
                     "--teacher", str(teacher_dir / "final.pt"), "--store", str(store),
                     "--scales", ",".join(str(s) for s in preset.scales), "--targets", "cls,box,fpn,backbone"),
            None,
        ),
    ]
    rows = [("baseline", "none")] + [(f"+ {m.upper().replace(',', ' + ')}", m) for m in preset.methods]
    for label, losses in rows:
        out = students / losses.replace(",", "+")
        steps.append(
            Step(
                f"student {label}",
                _distill("train", "--store", str(store), "--annotations", str(train_ann), "--images", str(train_img),
                         "--student", preset.student_arch, "--losses", losses, "--epochs", str(preset.student_epochs),
                         "--batch-size", str(preset.batch_size), "--lr", str(preset.student_lr), "--seed", "0",
                         "--out", str(out), *val_args),
                out / "results.json",
            )
        )
    started = time.perf_counter()
    for step in steps:
        _run(step, env)

    table = [("teacher " + preset.teacher_arch, _read_ap(teacher_dir / "metrics.json"))]
    for label, losses in rows:
        table.append((f"{preset.student_arch} {label}", _read_ap(students / losses.replace(",", "+") / "results.json")))
    print()
    print(f"COCO AP on the synthetic val split ({preset.num_val} images, canvas {canvas}, preset '{preset.name}'):")
    print(format_ap_table(table))
    print(f"\n[quickstart] total {time.perf_counter() - started:.0f} s; everything is under {home}")
    return 0


def _read_ap(path: Path) -> dict[str, float]:
    metrics = json.loads(path.read_text())
    ap = metrics.get("val") or metrics.get("coco") or metrics.get("ap") or metrics
    return {k: float(ap[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def _run_command(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    home = Path(args.home).resolve() if args.home else default_home()
    return run_quickstart(preset, home)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline on the built-in synthetic dataset and print an AP table",
        description=(
            "Synthetic dataset -> teacher -> precompute on a local Ray cluster -> label store -> "
            "students trained against the store (no teacher in their process) -> COCO AP table. "
            "Each step is a `distill` subprocess; finished steps are skipped on a re-run."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="budgets: 'quick' (~12 min on 2 CPU cores) or 'benchmark' (the RESULTS.md recipe)")
    parser.add_argument("--home", help="working directory for data, checkpoints and stores "
                        "(default $DISTILLERY_HOME or ./distillery_runs)")
    parser.set_defaults(func=_run_command)
