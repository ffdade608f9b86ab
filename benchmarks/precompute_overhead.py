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
`distill precompute` starts (`teacher_service.ray_runtime.init_ray`: logical CPUs for the
actor plus a decode and a write task, the CPU teacher pinned to a core of its own unless
``--no-pin-cpus``).

Setup: synthetic benchmark images (`detcore.synth`, 160-320 px), canvas 256x256, views
{original, flip} per image, a random-init gfl_r18 teacher with 64 FPN/head channels,
cls/box/fpn targets with the default codecs, one teacher actor with ``--threads``
torch threads; decode and write tasks share the remaining CPU. The baseline forward uses
the same thread count (on this 2-core machine: the actor owns one core, the pipeline's
CPU work runs on the other).

    python benchmarks/precompute_overhead.py --num-images 64 --threads 1 [--no-pin-cpus]

``--codec-profile small|fast`` chooses the codecs as `distill precompute` does, and
``--also-codec-profile`` adds one more warm job with the other profile (same-run comparison).

``--teacher CKPT`` uses a trained teacher instead (its classes must be the synthetic
benchmark's), ``--targets`` other target groups, e.g. the reproduction's job:

    python benchmarks/precompute_overhead.py --num-images 1600 --threads 1 --canvas 128 \
        --targets cls,box,fpn,backbone --teacher runs/repro/teacher/final.pt

``--device cuda`` runs the teacher on a GPU, in the job (one actor, ``num_gpus=1``, the
autocast of ``--precision``) and in the baseline (the same autocast, the same host-to-device
copy of each batch, timed to ``torch.cuda.synchronize()``; the device-to-host copy of the
outputs is timed apart, as "forward + transfer"). ``--check-views N`` then compares N
stored views of the warm store with a float32 forward of the same teacher on the same
device, and a forward under the job's autocast with the same float32 forward, so the error
of the GPU's reduced precision and the codec's can be told apart. On a GPU machine:

    python benchmarks/precompute_overhead.py --device cuda --num-images 1600 --batch-size 32 \
        --views-per-part 64 --synth-workers 8 --check-views 16
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


def prepare(
    work: Path, num_images: int, canvas: int, seed: int = 0, *, arch: str = "gfl_r18", channels: int = 64, workers: int = 1,
) -> dict[str, Path]:
    """Synthetic images and a random ``arch`` teacher checkpoint (``channels`` FPN/head channels), cached under ``work``."""
    import torch

    from detcore import synth
    from detcore.checkpoint import save_checkpoint
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector

    data = work / f"synth-{num_images}"
    annotations = data / "annotations" / "train.json"
    if not annotations.exists():
        synth.generate(data, num_train=num_images, num_val=0, seed=seed, workers=workers, progress=False)
    teacher = work / f"{arch}-{channels}-{canvas}.pt"
    if not teacher.exists():
        classes = CocoDataset(annotations, data / "train").classes
        torch.manual_seed(seed)
        model = build_detector(arch, num_classes=len(classes), fpn_channels=channels, head_channels=channels)
        save_checkpoint(teacher, model, classes=classes, canvas_hw=(canvas, canvas))
    return {"annotations": annotations, "images": data / "train", "teacher": teacher}


def render_views(paths: dict[str, Path], canvas: int):
    """Every {original, flip} view of the benchmark images and their rendered pixels [N, 3, H, W]."""
    import numpy as np

    from detcore.coco import CocoDataset
    from detcore.views import plan_views, render_array

    dataset = CocoDataset(paths["annotations"], paths["images"])
    views = plan_views(
        [(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids],
        canvas_hw=(canvas, canvas),
    )
    return views, np.stack([render_array(dataset.load(v.image_id), v) for v in views])


def load_teacher(paths: dict[str, Path], device: str):
    from detcore.checkpoint import load_detector

    model = load_detector(paths["teacher"], map_location=device)
    model.eval()
    return model


def teacher_forward(model, pixels, device: str, amp_dtype, with_backbone: bool) -> dict:
    """The actor's forward (`TeacherPredictor.forward`): host batch -> device, autocast, targets on the device."""
    import torch

    images = torch.from_numpy(pixels).to(device, non_blocking=True)
    with torch.inference_mode():
        if amp_dtype is None:
            return model(images, with_backbone=with_backbone).to_targets(("cls", "box", "fpn") + (("backbone",) if with_backbone else ()))
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype):
            return model(images, with_backbone=with_backbone).to_targets(("cls", "box", "fpn") + (("backbone",) if with_backbone else ()))


def forward_alone(
    paths: dict[str, Path], canvas: int, batch_size: int, threads: int, with_backbone: bool = False,
    device: str = "cpu", precision: str = "auto", rendered=None,
) -> dict[str, float]:
    """Wall time of the teacher's forward pass over every view, rendered beforehand (not timed).

    On a GPU the time runs to `torch.cuda.synchronize()` after the last batch (inputs are
    copied to the device per batch, as in the job); ``transfer_seconds`` is the extra time
    of copying every output back to the host (float32), which the job does too.
    """
    import torch

    from teacher_service.pipeline_stages import autocast_dtype

    torch.set_num_threads(threads)
    views, pixels = rendered if rendered is not None else render_views(paths, canvas)
    model = load_teacher(paths, device)
    amp_dtype = autocast_dtype(device, precision)
    cuda = device.startswith("cuda")

    def run(copy_back: bool) -> float:
        teacher_forward(model, pixels[:batch_size], device, amp_dtype, with_backbone)  # warm-up, untimed
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(views), batch_size):
            outputs = teacher_forward(model, pixels[first : first + batch_size], device, amp_dtype, with_backbone)
            if copy_back or not cuda:
                for tensor in outputs.values():
                    tensor.float().cpu().numpy()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds = run(copy_back=False)
    result = {"views": len(views), "seconds": seconds}
    if cuda:
        result["transfer_seconds"] = run(copy_back=True) - seconds
    return result


def check_store(paths: dict[str, Path], store: Path, rendered, device: str, precision: str, count: int) -> dict:
    """Stored targets of ``count`` views vs a float32 forward on ``device``; and the job's autocast vs float32.

    Per target group: relative L2 error ||a - b|| / ||b|| over the checked views, and the
    largest absolute error.
    """
    import numpy as np

    from label_store.reader import open_store
    from teacher_service.pipeline_stages import autocast_dtype

    views, pixels = rendered
    reader = open_store(str(store))
    model = load_teacher(paths, device)
    amp_dtype = autocast_dtype(device, precision)
    names = [spec.name for spec in reader.targets]
    with_backbone = any(name.startswith("backbone/") for name in names)
    index = {v.key: k for k, v in enumerate(views)}
    keys = sorted(reader.keys())[:count]
    sums: dict[str, dict[str, float]] = {}

    def add(kind: str, group: str, got, ref) -> None:
        entry = sums.setdefault(f"{kind} {group}", {"err2": 0.0, "ref2": 0.0, "max_abs": 0.0})
        diff = got.astype(np.float64) - ref.astype(np.float64)
        entry["err2"] += float((diff**2).sum())
        entry["ref2"] += float((ref.astype(np.float64) ** 2).sum())
        entry["max_abs"] = max(entry["max_abs"], float(np.abs(diff).max()))

    for key in keys:
        batch = pixels[index[key] : index[key] + 1]
        exact = {n: t[0].float().cpu().numpy() for n, t in teacher_forward(model, batch, device, None, with_backbone).items()}
        reduced = {n: t[0].float().cpu().numpy() for n, t in teacher_forward(model, batch, device, amp_dtype, with_backbone).items()}
        for name, array in reader.read(*key).items():
            group = name.split("/")[0]
            add("store vs fp32 forward:", group, array, exact[name])
            add("autocast vs fp32 forward:", group, reduced[name], exact[name])
    return {
        "views": len(keys),
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "fp32",
        "errors": {k: {"rel_l2": (v["err2"] / max(v["ref2"], 1e-30)) ** 0.5, "max_abs": v["max_abs"]} for k, v in sums.items()},
    }


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
        cpus_per_task=args.cpus_per_task,
        torch_threads=args.threads,
        device=args.device,
        precision=args.precision,
        quantize_on_device=args.quantize_on_device,
        codecs=tuple(tuple(item.split("=", 1)) for item in args.codec),
        codec_profile=args.codec_profile,
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
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="as `distill precompute --cpus-per-task`")
    parser.add_argument("--also-cpus-per-task", default="",
                        help="comma-separated values: after the warm job, one more warm job with each")
    parser.add_argument("--codec", action="append", default=[], metavar="NAME=CODEC",
                        help="codec override for a group or target, as distill precompute --codec (repeatable), "
                             "e.g. fpn=int6-view-dhw+zstd3")
    parser.add_argument("--codec-profile", default="auto", choices=("auto", "small", "fast"),
                        help="as `distill precompute --codec-profile` (auto: fast with a GPU teacher)")
    parser.add_argument("--also-codec-profile", choices=("small", "fast"),
                        help="after the warm job, one more warm job with this --codec-profile")
    parser.add_argument("--quantize-on-device", default="auto", choices=("auto", "on", "off"),
                        help="as `distill precompute --quantize-on-device`")
    parser.add_argument("--also-quantize-on-device", choices=("auto", "on", "off"),
                        help="after the warm job, one more warm job with this --quantize-on-device")
    parser.add_argument("--also-no-reservation", action="store_true",
                        help="after those, one more warm job with Ray Data's per-operator resource reservation off "
                             "(DataContext.op_resource_reservation_enabled = False)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray cluster (default: as `distill precompute` starts it)")
    parser.add_argument("--no-pin-cpus", action="store_true", help="as `distill precompute --no-pin-cpus`")
    parser.add_argument("--targets", default="cls,box,fpn", help="target groups stored (default: cls,box,fpn)")
    parser.add_argument("--teacher", type=Path, help="a trained teacher checkpoint (default: a random gfl_r18, 64 channels)")
    parser.add_argument("--device", default="cpu", help="teacher device, in the job and the baseline: cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="autocast of the teacher (auto: bf16 on a GPU, fp32 on the CPU), as `distill precompute`")
    parser.add_argument("--arch", default="gfl_r18", help="the random teacher's architecture (without --teacher)")
    parser.add_argument("--channels", type=int, default=64, help="the random teacher's FPN/head channels")
    parser.add_argument("--synth-workers", type=int, default=1, help="processes generating the synthetic images")
    parser.add_argument("--check-views", type=int, default=0,
                        help="compare this many stored views with a float32 forward on the device (default: none)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distillery-bench-precompute"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import ray

    from teacher_service.ray_runtime import init_ray

    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.num_images, args.canvas, arch=args.arch, channels=args.channels,
                    workers=args.synth_workers)
    if args.teacher:
        paths["teacher"] = args.teacher.resolve()
    with_backbone = "backbone" in args.targets.split(",")
    os.environ.setdefault("RAY_TMPDIR", str(args.work / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    rendered = render_views(paths, args.canvas)

    def forward() -> dict[str, float]:
        return forward_alone(paths, args.canvas, args.batch_size, args.threads, with_backbone,
                             args.device, args.precision, rendered)

    forward_1 = forward()
    started = time.perf_counter()
    # the local cluster `distill precompute` would start (logical CPUs, CPU pinning)
    _, pinning = init_ray(job_config(paths, args.work / "unused.zarr", args))
    ray_init_seconds = time.perf_counter() - started
    try:
        cold = run_job(paths, args.work / "store-cold.zarr", args)
        forward_2 = forward()
        warm = run_job(paths, args.work / "store-warm.zarr", args)
        forward_3 = forward()
        extra = []
        profile = args.codec_profile
        variants = [(float(v), True, args.quantize_on_device, profile) for v in args.also_cpus_per_task.split(",") if v.strip()]
        if args.also_no_reservation:
            variants.append((args.cpus_per_task, False, args.quantize_on_device, profile))
        if args.also_quantize_on_device:
            variants.append((args.cpus_per_task, True, args.also_quantize_on_device, profile))
        if args.also_codec_profile:
            variants.append((args.cpus_per_task, True, args.quantize_on_device, args.also_codec_profile))
        if variants:
            from ray.data import DataContext

            context = DataContext.get_current()
            for cpus_per_task, reservation, quantize, codec_profile in variants:
                saved = (args.cpus_per_task, context.op_resource_reservation_enabled, args.quantize_on_device, args.codec_profile)
                (args.cpus_per_task, context.op_resource_reservation_enabled, args.quantize_on_device,
                 args.codec_profile) = (cpus_per_task, reservation, quantize, codec_profile)
                try:
                    summary = run_job(paths, args.work / "store-extra.zarr", args)
                finally:
                    args.cpus_per_task, context.op_resource_reservation_enabled, args.quantize_on_device, args.codec_profile = saved
                extra.append((f"warm job, cpus per task {cpus_per_task:g}, reservation {'on' if reservation else 'off'}, "
                              f"quantize on device {quantize}, codec profile {codec_profile}", summary))
            forward_4 = forward()
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    check = None
    if args.check_views:
        check = check_store(paths, args.work / "store-warm.zarr", rendered, args.device, args.precision, args.check_views)

    cold_forward = (forward_1["seconds"] + forward_2["seconds"]) / 2
    warm_forward = (forward_2["seconds"] + forward_3["seconds"]) / 2
    results = {
        "views": forward_1["views"],
        "canvas": args.canvas,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "views_per_part": args.views_per_part,
        "targets": args.targets,
        "teacher": str(paths["teacher"]),
        "ray_init_seconds": ray_init_seconds,
        "pinning": [list(p) for p in pinning] if pinning else None,
        "forward_seconds": [forward_1["seconds"], forward_2["seconds"], forward_3["seconds"]],
        "transfer_seconds": [f["transfer_seconds"] for f in (forward_1, forward_2, forward_3) if "transfer_seconds" in f],
        "check": check,
        "cold": {**cold.to_dict(), "ratio": cold.seconds / cold_forward},
        "warm": {**warm.to_dict(), "ratio": warm.seconds / warm_forward},
        "cpus_per_task": args.cpus_per_task,
        "extra": [],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    for name in ("cold", "warm"):
        results[name].pop("failures")
    jobs = [("cold job", cold, cold_forward), ("warm job", warm, warm_forward)]
    if extra:
        results["forward_seconds"].append(forward_4["seconds"])
        extra_forward = (forward_3["seconds"] + forward_4["seconds"]) / 2
        for name, summary in extra:
            entry = {"name": name, **summary.to_dict(), "ratio": summary.seconds / extra_forward}
            entry.pop("failures")
            results["extra"].append(entry)
            jobs.append((name, summary, extra_forward))
    print(f"views {results['views']}, canvas {args.canvas}, batch {args.batch_size}, torch threads {args.threads}, "
          f"device {args.device}, precision {args.precision}, targets {args.targets}, teacher {paths['teacher']}")
    print(f"ray.init: {ray_init_seconds:.2f} s (not in the job times); CPU pinning: "
          f"{'teacher %s, the rest %s' % pinning if pinning else 'off'}")
    print("forward alone: " + ", ".join(f"{s:.2f} s" for s in results["forward_seconds"]))
    if results["transfer_seconds"]:
        print("device-to-host copy of the outputs on top (forward + transfer minus forward): "
              + ", ".join(f"{s:.2f} s" for s in results["transfer_seconds"]))
    print(f"jobs with {args.cpus_per_task:g} CPU per decode/write task and codec profile {args.codec_profile} unless said")
    for name, summary, forward in jobs:
        print(
            f"{name}: {summary.seconds:.2f} s, {summary.views_per_second:.2f} views/s, stored {summary.views_stored}, "
            f"failed {summary.views_failed}, {summary.bytes_written / 2**20:.1f} MiB; ratio {summary.seconds / forward:.3f} "
            f"(forward alone {forward:.2f} s)"
        )
        print(
            f"  stage worker-seconds: decode {summary.decode_seconds:.2f}, forward {summary.forward_seconds:.2f}, "
            f"encode {summary.encode_seconds:.2f}, write {summary.write_seconds:.2f}"
        )
        print(f"  bound by: {summary.bottleneck}")
    print(f"load average before {load_before}, after {load_after}")
    if check:
        print(f"fidelity over {check['views']} stored views (autocast {check['precision']}):")
        for name, error in check["errors"].items():
            print(f"  {name} relative L2 {error['rel_l2']:.2e}, max abs {error['max_abs']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
