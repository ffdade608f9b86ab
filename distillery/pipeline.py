"""`distill quickstart`: the whole product on the built-in default, end to end.

    synthetic dataset -> teacher -> precompute on a local Ray cluster -> label store
      -> students trained against the store, each row once per seed
      -> COCO AP table (mean ± s.d. over seeds, gain or within noise) + HTML report

Every step runs as its own `distill` subprocess, exactly as a user would type it: the
student steps are separate processes that never load the teacher (the product's promise),
and a step that fails stops the pipeline with its command printed so it can be re-run
alone. Every step is resumable, so re-running `distill quickstart` skips finished work.
The table and report (`distillery.report`) are rebuilt from the steps' files on every run.
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
from typing import Callable

from detcore.defaults import PRESETS, Preset, default_home, default_paths


@dataclass
class Step:
    name: str
    argv: list[str]
    done_marker: Path | None
    """Output whose presence means the step finished; None for steps that always run
    (precompute resumes on its own and skips committed views)."""
    log: Path | None = None
    """Where a step that runs beside others writes its output (None: to this terminal)."""


def _distill(*args: str) -> list[str]:
    return [sys.executable, "-m", "distillery.cli", *args]


def _shown(step: Step) -> str:
    return shlex.join(step.argv[2:]).replace("distillery.cli", "distill", 1)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Running:
    """One started step: its process, start time and log file."""

    def __init__(self, step: Step, env: dict[str, str]) -> None:
        self.step = step
        self.started = time.perf_counter()
        output = None
        if step.log is not None:
            step.log.parent.mkdir(parents=True, exist_ok=True)
            output = open(step.log, "w", encoding="utf-8")
        # A session of its own: the terminal's Ctrl-C reaches only `distill quickstart`, which
        # passes exactly one signal on to every running step (a second one forces a stop).
        try:
            self.process = subprocess.Popen(step.argv, env=env, start_new_session=True,
                                            stdout=output, stderr=subprocess.STDOUT if output else None)
        finally:
            if output is not None:
                output.close()


def run_steps(
    steps: list[Step], env: dict[str, str], jobs: int = 1, parallel: frozenset[str] = frozenset(),
    on_done: Callable[[str, float], None] | None = None,
) -> dict[str, float | None]:
    """Run the steps in order, those named in ``parallel`` up to ``jobs`` at a time; the wall
    seconds of each, None for a step skipped because its marker exists. ``on_done(name,
    seconds)`` is called as each step finishes.

    A step that fails lets the steps running beside it finish, then stops the pipeline with
    its command. SIGINT / SIGTERM are passed on once to every running step, which stops at its
    next safe point (checkpoint, committed parts); then `Interrupted` is raised (exit 130 / 143).
    """
    from detcore.interrupt import Interrupted, StopRequest

    seconds: dict[str, float | None] = {}
    pending = list(steps)
    running: list[_Running] = []
    failed: list[tuple[_Running, int]] = []
    stop = StopRequest()
    forwarded = False

    def can_start(step: Step) -> bool:
        if not running:
            return True
        return step.name in parallel and len(running) < jobs and all(r.step.name in parallel for r in running)

    with stop:
        try:
            while pending or running:
                while pending and not stop.requested and not failed and can_start(pending[0]):
                    step = pending.pop(0)
                    if step.done_marker is not None and step.done_marker.exists():
                        print(f"[quickstart] {step.name}: done already ({step.done_marker})", flush=True)
                        seconds[step.name] = None
                        continue
                    log_note = f"  (output: {step.log})" if step.log is not None else ""
                    print(f"[quickstart] {step.name}: {_shown(step)}{log_note}", flush=True)
                    running.append(_Running(step, env))
                if stop.requested and not forwarded:
                    for r in running:
                        r.process.send_signal(stop.signum)
                    forwarded = True
                if not running:
                    break
                finished = [r for r in running if r.process.poll() is not None]
                if not finished:
                    time.sleep(0.2)
                    continue
                for r in finished:
                    running.remove(r)
                    code = r.process.returncode
                    if code not in (0, 3):
                        if not stop.requested:
                            failed.append((r, code))
                        continue
                    if r.step.done_marker is not None and not r.step.done_marker.exists():
                        failed.append((r, code))
                        continue
                    seconds[r.step.name] = time.perf_counter() - r.started
                    print(f"[quickstart] {r.step.name}: {seconds[r.step.name]:.0f} s", flush=True)
                    if on_done is not None:
                        on_done(r.step.name, seconds[r.step.name])
        except Interrupted:
            # A second signal: pass it on too, so every step stops now.
            for r in running:
                if r.process.poll() is None:
                    r.process.send_signal(stop.signum or 2)
            raise
    if stop.requested:
        raise Interrupted(stop.signum, "finished steps are kept; re-run `distill quickstart` to go on where it stopped")
    if failed:
        r, code = failed[0]
        log = f"\n{_tail(r.step.log)}\n(whole output: {r.step.log})" if r.step.log is not None else ""
        if code in (0, 3):
            raise SystemExit(f"[quickstart] step '{r.step.name}' finished but did not write {r.step.done_marker}{log}")
        raise SystemExit(
            f"[quickstart] step '{r.step.name}' failed with exit code {code}{log}\n"
            f"re-run it alone with: {shlex.join(r.step.argv)}"
        )
    return seconds


def _student_dir(students: Path, losses: str, seed: int) -> Path:
    """Seed 0 keeps the single-seed layout (``students/<losses>``); other seeds add ``-seed<k>``."""
    name = losses.replace(",", "+")
    return students / (name if seed == 0 else f"{name}-seed{seed}")


def default_jobs() -> int:
    """Students trained at once: two where there are two cores or more. Small students use two
    single-threaded processes better than one process on two threads."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_quickstart(preset: Preset, home: Path, jobs: int = 1) -> int:
    """Run (or resume) the preset's pipeline under ``home``; ``jobs`` students at a time, each
    on ``cpu_count // jobs`` torch threads with its output in ``<student dir>.log`` when ``jobs > 1``."""
    from distillery.report import Row, format_table, table_caption
    from label_store.schema import LOSS_TARGET_GROUPS, loss_target_groups

    paths = default_paths(preset, home)
    data, teacher_dir, store, students = paths["data"], paths["teacher_dir"], paths["store"], paths["students"]
    train_ann, val_ann = paths["train_annotations"], paths["val_annotations"]
    train_img, val_img = paths["train_images"], paths["val_images"]
    canvas = f"{preset.canvas}x{preset.canvas}"
    env = dict(os.environ)
    val_args = ["--val-annotations", str(val_ann), "--val-images", str(val_img)]
    variant_args = [] if preset.data_variant == "standard" else ["--variant", preset.data_variant]

    steps = [
        Step(
            "dataset",
            _distill("data", "synth", "--out", str(data), "--num-train", str(preset.num_train),
                     "--num-val", str(preset.num_val), "--seed", "0", *variant_args),
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
                     "--scales", ",".join(str(s) for s in preset.scales), "--targets", ",".join(loss_target_groups(LOSS_TARGET_GROUPS))),
            None,
        ),
    ]
    rows = [("baseline", "none")] + [(f"+ {m.upper().replace(',', ' + ')}", m) for m in preset.methods]
    side_by_side = []
    if jobs > 1:
        side_by_side = ["--threads", str(max(1, (os.cpu_count() or 1) // jobs)), "--no-progress"]
    for label, losses in rows:
        for seed in preset.seeds:
            out = _student_dir(students, losses, seed)
            steps.append(
                Step(
                    f"student {label}" + (f" seed {seed}" if len(preset.seeds) > 1 else ""),
                    _distill("train", "--store", str(store), "--annotations", str(train_ann), "--images", str(train_img),
                             "--student", preset.student_arch, "--losses", losses,
                             "--epochs", str(preset.student_epochs), "--batch-size", str(preset.batch_size),
                             "--lr", str(preset.student_lr), "--seed", str(seed), "--out", str(out), *val_args,
                             *side_by_side),
                    out / "results.json",
                    log=out.with_name(out.name + ".log") if jobs > 1 else None,
                )
            )
    started = time.perf_counter()
    # Wall seconds of every step that ran, kept across re-runs so the report shows what skipped steps took.
    seconds_file = paths["report"].with_name(paths["report"].stem + "-steps.json")
    step_seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}

    def record(name: str, seconds: float) -> None:
        step_seconds[name] = round(seconds, 1)
        seconds_file.parent.mkdir(parents=True, exist_ok=True)
        seconds_file.write_text(json.dumps(step_seconds, indent=2, sort_keys=True) + "\n")

    students_at_once = frozenset(step.name for step in steps if step.name.startswith("student "))
    ran = run_steps(steps, env, jobs, students_at_once, on_done=record)
    total = time.perf_counter() - started
    timings: list[tuple[str, str]] = []
    for step in steps:
        seconds = ran.get(step.name)
        earlier = f" (took {step_seconds[step.name]:.0f} s)" if step.name in step_seconds else ""
        timings.append((step.name, f"{seconds:.0f} s" if seconds is not None else "done already" + earlier))

    table = [Row(f"teacher {preset.teacher_arch}", "teacher", (), (_read_ap(teacher_dir / "metrics.json"),))]
    for label, losses in rows:
        table.append(Row(
            f"{preset.student_arch} {label}", losses, tuple(preset.seeds),
            tuple(_read_ap(_student_dir(students, losses, seed) / "results.json") for seed in preset.seeds),
        ))
    data_note = "" if preset.data_variant == "standard" else f", {preset.data_variant} variant"
    heading = (f"COCO AP on the synthetic val split ({preset.num_val} images{data_note}, canvas {canvas}, "
               f"preset '{preset.name}'):")
    print()
    print(heading)
    print(format_table(table))
    print(table_caption(table))
    timings.append(("steps in all (this run)", f"{total:.0f} s"))
    report_started = time.perf_counter()
    report = _write_quickstart_report(preset, paths, heading, table, rows, timings)
    report_seconds = time.perf_counter() - report_started
    print(f"\n[quickstart] steps {total:.0f} s, report {report_seconds:.0f} s; everything is under {home}")
    print(f"[quickstart] report: {report}")
    return 0


def _write_quickstart_report(preset: Preset, paths: dict[str, Path], heading: str, table, rows, timings) -> Path:
    """The HTML report beside the table: AP chart, loss curves of seed 0, detections on val images."""
    from distillery.report import curve, detection_panels, detection_terms, read_loss_history, table_lines, write_report

    students, seed = paths["students"], preset.seeds[0]
    names = [f"{preset.student_arch} {label}" for label, _ in rows]
    histories = [read_loss_history(_student_dir(students, losses, seed) / "metrics.jsonl") for _, losses in rows]
    terms = detection_terms(histories[0])
    curves = [
        ("detection loss (the terms every student trains)", "loss",
         f"Sum of {', '.join(terms)}, seed {seed}: lower is a better fit of the training labels.",
         [(name, curve(history, terms)) for name, history in zip(names, histories)]),
        ("total loss (detection + distillation terms)", "loss",
         f"What each student minimises, seed {seed}; the distillation terms differ per row.",
         [(name, curve(history, None)) for name, history in zip(names, histories)]),
    ]
    models = [(f"teacher {preset.teacher_arch}", paths["teacher"])]
    models += [(name, _student_dir(students, losses, seed) / "final.pt") for name, (_, losses) in zip(names, rows)]
    panels = detection_panels(models, paths["val_annotations"], paths["val_images"])
    intro = (f"{heading} {preset.num_train} train / {preset.num_val} val images; teacher {preset.teacher_arch} "
             f"({preset.teacher_channels} channels) {preset.teacher_epochs} epochs; every student {preset.student_arch} "
             f"{preset.student_epochs} epochs, batch {preset.batch_size}, lr {preset.student_lr}, "
             f"seeds {', '.join(map(str, preset.seeds))}.")
    summary = {
        "preset": preset.name, "data_variant": preset.data_variant, "seeds": list(preset.seeds),
        "rows": [{"label": r.label, "losses": r.losses, "seeds": list(r.seeds), "metrics": list(r.metrics)} for r in table],
        "table": table_lines(table), "timings": dict(timings),
    }
    return write_report(paths["report"], title=f"distill quickstart ({preset.name})", intro=intro, rows=table,
                        curves=curves, panels=panels, timings=timings, summary=summary)


def _read_ap(path: Path) -> dict[str, float]:
    """COCO metrics of a run in percent (the files hold fractions)."""
    metrics = json.loads(path.read_text())
    ap = metrics.get("val") or metrics.get("coco") or metrics.get("ap") or metrics
    return {k: 100.0 * float(ap[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def _run_command(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    home = Path(args.home).resolve() if args.home else default_home()
    return run_quickstart(preset, home, jobs=args.jobs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive number of students at a time. Got {text!r}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline on the built-in synthetic dataset and print an AP table",
        description=(
            "Synthetic dataset -> teacher -> precompute on a local Ray cluster -> label store -> "
            "students trained against the store (no teacher in their process), each row once per seed -> "
            "COCO AP table (a gain only beyond the seed spread) and an HTML report whose path is printed. "
            "Each step is a `distill` subprocess; finished steps are skipped on a re-run."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="budgets: 'quick' (the easy synthetic variant, 2 seeds per student; docs/quickstart.md), "
                        "'benchmark' (the RESULTS.md recipe) or 'smoke' (wiring only)")
    parser.add_argument("--jobs", type=_positive_int, default=default_jobs(), metavar="N",
                        help="students trained at once, each on cpu_count/N torch threads with its output in "
                        "a .log file beside its run folder (default: %(default)s on this machine)")
    parser.add_argument("--home", help="working directory for data, checkpoints and stores "
                        "(default $DISTILLERY_HOME or ./distillery_runs)")
    parser.set_defaults(func=_run_command)
