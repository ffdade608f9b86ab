"""Synthetic dataset generation speed: milliseconds per image, one process and several.

    python benchmarks/synth_speed.py [--num-images 200] [--workers 1 2]

Runs `detcore.synth.generate` into a temporary folder (train split only, PNGs and
JSON written, as `distill data synth` does) and prints ms per image for each worker
count, plus the split between drawing (`render_image`) and PNG encoding + writing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=200, help="images per measurement (default: 200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per measurement; the best is reported (default: 2)")
    args = parser.parse_args()

    from detcore import synth

    print(f"python {platform.python_version()}, {platform.machine()}, {args.num_images} images per run")
    # Drawing alone, one core (no disk, no PNG).
    synth.render_image(0, "train", 0)  # warm-up: imports, first allocations
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for index in range(args.num_images):
            synth.render_image(0, "train", index)
        best = min(best, time.perf_counter() - start)
    draw_ms = 1000.0 * best / args.num_images
    print(f"draw only (render_image), 1 process: {draw_ms:.1f} ms per image")

    for workers in args.workers:
        best = float("inf")
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="synth-speed-") as tmp:
                start = time.perf_counter()
                summary = synth.generate(Path(tmp), num_train=args.num_images, num_val=0, seed=0, workers=workers, progress=False)
                best = min(best, time.perf_counter() - start)
        per_image = 1000.0 * best / args.num_images
        print(
            f"generate (draw + PNG + JSON), workers={workers}: {per_image:.1f} ms per image "
            f"({summary['num_train_objects'] / args.num_images:.2f} objects per image); "
            f"5000 + 500 images would take {5500 * per_image / 1000.0:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
