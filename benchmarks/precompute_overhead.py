"""Overhead of the precompute job over the teacher's forward pass alone.

    ratio = wall time of the whole job (`run_precompute`: plan, decode, render, forward,
            encode, write, commit) / wall time of the teacher's forward pass alone over
            the same views (pre-rendered, in this process), same device, batch size and
            torch threads.

Both are measured in one run, interleaved (forward, job, forward) because the machine is
shared; the ratio uses the mean of the two forward timings. A "cold" job runs first on a
fresh local Ray cluster (worker processes and the teacher actor start inside the timed
job); a "warm" job then runs again into a new store on the same cluster, as on a
long-lived cluster. Ray's own start-up is reported apart. The cluster is the one
`distill precompute` starts (`teacher_service.precompute.init_ray`: logical CPUs for the
actor plus a decode and a write task, the CPU teacher pinned to a core of its own unless
``--no-pin-cpus``).

Setup: synthetic benchmark images (`detcore.synth`, 160-320 px), canvas 256x256, views
{original, flip} per image, a random-init gfl_r18 teacher with 64 FPN/head channels,
cls/box/fpn targets with the default codecs, one teacher actor with ``--threads``
torch threads; decode and write tasks share the remaining CPU. The baseline forward uses
the same thread count (on this 2-core machine: the actor owns one core, the pipeline's
CPU work runs on the other).

    python benchmarks/precompute_overhead.py --num-images 64 --threads 1 [--no-pin-cpus]

``--teacher CKPT`` uses a trained teacher instead (its classes must be the synthetic
benchmark's), ``--targets`` other target groups, e.g. the reproduction's job:

    python benchmarks/precompute_overhead.py --num-images 1600 --threads 1 --canvas 128 \
        --targets cls,box,fpn,backbone --teacher runs/repro/teacher/final.pt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def prepare(work: Path, num_images: int, canvas: int, seed: int = 0) -> dict[str, Path]:
    """Synthetic images and a random gfl_r18 (64 channels) teacher checkpoint, cached under ``work``."""
    import torch

    from detcore import synth
    from detcore.checkpoint import save_checkpoint
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector

    data = work / f"synth-{num_images}"
    annotations = data / "annotations" / "train.json"
    if not annotations.exists():
        synth.generate(data, num_train=num_images, num_val=0, seed=seed, workers=1, progress=False)
    teacher = work / f"gfl_r18-64-{canvas}.pt"
    if not teacher.exists():
        classes = CocoDataset(annotations, data / "train").classes
        torch.manual_seed(seed)
        model = build_detector("gfl_r18", num_classes=len(classes), fpn_channels=64, head_channels=64)
        save_checkpoint(teacher, model, classes=classes, canvas_hw=(canvas, canvas))
    return {"annotations": annotations, "images": data / "train", "teacher": teacher}


def forward_alone(paths: dict[str, Path], canvas: int, batch_size: int, threads: int, with_backbone: bool = False) -> dict[str, float]:
    """Wall time of the teacher's forward pass over every view, rendered beforehand (not timed)."""
    import numpy as np
    import torch

    from detcore.checkpoint import load_detector
    from detcore.coco import CocoDataset
    from detcore.views import plan_views, render_array

    torch.set_num_threads(threads)
    dataset = CocoDataset(paths["annotations"], paths["images"])
    views = plan_views(
        [(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids],
        canvas_hw=(canvas, canvas),
    )
    pixels = np.stack([render_array(dataset.load(v.image_id), v) for v in views])
    model, _ = load_detector(paths["teacher"], map_location="cpu")
    model.eval()
    with torch.inference_mode():
        model(torch.from_numpy(pixels[:batch_size]), with_backbone=with_backbone)  # warm-up, untimed (allocator, kernels)
        start = time.perf_counter()
        for first in range(0, len(views), batch_size):
            outputs = model(torch.from_numpy(pixels[first : first + batch_size]), with_backbone=with_backbone)
            for tensor in outputs.targets().values():
                tensor.numpy()
        seconds = time.perf_counter() - start
    return {"views": len(views), "seconds": seconds}


def job_config(paths: dict[str, Path], store: Path, args: argparse.Namespace):
    from teacher_service.precompute import PrecomputeConfig

    return PrecomputeConfig(
        annotations=str(paths["annotations"]),
        images_dir=str(paths["images"]),
        teacher=str(paths["teacher"]),
        store=str(store),
        canvas_hw=(args.canvas, args.canvas),
        target_groups=tuple(args.targets.split(",")),
        batch_size=args.batch_size,
        num_actors=1,
        cpus_per_actor=1.0,
        torch_threads=args.threads,
        views_per_part=args.views_per_part,
        num_cpus=args.num_cpus,
        pin_cpus=not args.no_pin_cpus,
        show_progress=False,
    )


def run_job(paths: dict[str, Path], store: Path, args: argparse.Namespace):
    from teacher_service.precompute import run_precompute

    if store.exists():
        shutil.rmtree(store)
    return run_precompute(job_config(paths, store, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64, help="synthetic images (2 views each)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the teacher (actor and baseline)")
    parser.add_argument("--views-per-part", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray cluster (default: as `distill precompute` starts it)")
    parser.add_argument("--no-pin-cpus", action="store_true", help="as `distill precompute --no-pin-cpus`")
    parser.add_argument("--targets", default="cls,box,fpn", help="target groups stored (default: cls,box,fpn)")
    parser.add_argument("--teacher", type=Path, help="a trained teacher checkpoint (default: a random gfl_r18, 64 channels)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distillery-bench-precompute"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import ray

    from teacher_service.precompute import init_ray

    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.num_images, args.canvas)
    if args.teacher:
        paths["teacher"] = args.teacher.resolve()
    with_backbone = "backbone" in args.targets.split(",")
    os.environ.setdefault("RAY_TMPDIR", str(args.work / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    forward_1 = forward_alone(paths, args.canvas, args.batch_size, args.threads, with_backbone)
    started = time.perf_counter()
    # the local cluster `distill precompute` would start (logical CPUs, CPU pinning)
    _, pinning = init_ray(job_config(paths, args.work / "unused.zarr", args))
    ray_init_seconds = time.perf_counter() - started
    try:
        cold = run_job(paths, args.work / "store-cold.zarr", args)
        forward_2 = forward_alone(paths, args.canvas, args.batch_size, args.threads, with_backbone)
        warm = run_job(paths, args.work / "store-warm.zarr", args)
        forward_3 = forward_alone(paths, args.canvas, args.batch_size, args.threads, with_backbone)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()

    cold_forward = (forward_1["seconds"] + forward_2["seconds"]) / 2
    warm_forward = (forward_2["seconds"] + forward_3["seconds"]) / 2
    results = {
        "views": forward_1["views"],
        "canvas": args.canvas,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "views_per_part": args.views_per_part,
        "targets": args.targets,
        "teacher": str(paths["teacher"]),
        "ray_init_seconds": ray_init_seconds,
        "pinning": [list(p) for p in pinning] if pinning else None,
        "forward_seconds": [forward_1["seconds"], forward_2["seconds"], forward_3["seconds"]],
        "cold": {**cold.to_dict(), "ratio": cold.seconds / cold_forward},
        "warm": {**warm.to_dict(), "ratio": warm.seconds / warm_forward},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    for name in ("cold", "warm"):
        results[name].pop("failures")
    print(f"views {results['views']}, canvas {args.canvas}, batch {args.batch_size}, torch threads {args.threads}, "
          f"targets {args.targets}, teacher {paths['teacher']}")
    print(f"ray.init: {ray_init_seconds:.2f} s (not in the job times); CPU pinning: "
          f"{'teacher %s, the rest %s' % pinning if pinning else 'off'}")
    print("forward alone: " + ", ".join(f"{s:.2f} s" for s in results["forward_seconds"]))
    for name, summary, forward in (("cold", cold, cold_forward), ("warm", warm, warm_forward)):
        print(
            f"{name} job: {summary.seconds:.2f} s, {summary.views_per_second:.2f} views/s, stored {summary.views_stored}, "
            f"failed {summary.views_failed}, {summary.bytes_written / 2**20:.1f} MiB; ratio {summary.seconds / forward:.3f} "
            f"(forward alone {forward:.2f} s)"
        )
        print(
            f"  stage worker-seconds: decode {summary.decode_seconds:.2f}, forward {summary.forward_seconds:.2f}, "
            f"encode {summary.encode_seconds:.2f}, write {summary.write_seconds:.2f}"
        )
    print(f"load average before {load_before}, after {load_after}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
