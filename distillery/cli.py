"""The `distill` command: one entry point whose subcommands come from each package.

Each package owns its subcommands in a `cli` module exposing ``register(subparsers)``;
heavy imports (torch, ray, zarr) happen inside the command functions, so `--help` is fast.

Exit codes: 0 success; 1 failure; 2 bad usage or input; 3 finished, but some items
(images, views) failed and were reported; 130 interrupted by SIGINT (Ctrl-C), 143 by
SIGTERM (resumable: `detcore.interrupt`).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import traceback

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# numpy's BLAS multiplies small per-view matrices (the FPN transform codec's channel basis) in
# many processes at once: DataLoader workers, Ray tasks. Its default of one spinning thread per
# core in each of them oversubscribes the machine (a student reading a transform-coded store
# trained at 0.6x the speed on 2 cores). One thread each, unless the user chose otherwise; set
# here, before numpy is first imported, so every process the command starts inherits it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Order is the order of `distill --help`.
COMMAND_MODULES = (
    "detcore.cli_data",
    "detcore.cli_detector",
    "detcore.cli_teacher",
    "teacher_service.cli",
    "label_store.cli",
    "student_trainer.cli",
    "distillery.pipeline",
)

DESCRIPTION = """\
Distil dense object detectors without the teacher in the training loop.

A teacher runs once over explicit views of a COCO-format dataset (a Ray job) and writes
its outputs into a compressed label store; students then train against the store.
"""

EPILOG = """\
typical flow:
  distill data synth --out data/synth
  distill detector train --arch gfl_r18 --annotations data/synth/annotations/train.json \\
      --images data/synth/train --out runs/teacher
  distill precompute --teacher runs/teacher/final.pt --annotations ... --images ... --store stores/t.zarr
  distill train --store stores/t.zarr --annotations ... --images ... --student gfl_tiny --out runs/ld
  distill quickstart            # all of the above on the built-in default, quick preset

exit codes: 0 ok, 1 failure, 2 bad usage or input, 3 done with some failed items,
            130 interrupted (Ctrl-C), 143 terminated (SIGTERM); re-run the same command to resume
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from distillery import __version__

    parser.add_argument("--version", action="version", version=f"distillery {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `distill` command; ``argv=None`` means this process's command line.

    As the process entry point (``argv`` None) it ends the process itself: exit handlers
    run, then ``os._exit``, because native thread pools torn down at interpreter exit
    (Arrow's) can abort the process and replace the command's exit code with 134.
    """
    if argv is not None:
        return _run(argv)
    try:
        code = _run(None)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func = getattr(args, "func", None)
    if func is None:
        # `distill` or `distill store` alone: show the help of the deepest parser reached.
        (getattr(args, "_parser", None) or parser).print_help()
        return EXIT_USAGE
    from detcore.interrupt import Interrupted

    try:
        return int(func(args) or 0)
    except Interrupted as stop:
        return stop.report()
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
