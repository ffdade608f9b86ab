"""Training step time of `distill train`: offline targets vs no distillation vs the in-process teacher.

The figures the product exists for, measured in ONE run on the same data so the ratios
are comparable:
    offline / none       step time with targets read from the label store, over step time
                         of the same student without distillation (goal <= 1.15);
    in-process / offline step time with the teacher in the training process (forward under
                         no_grad on the same views), over step time with offline targets.

Setup (realistic sizes for this machine): the synthetic benchmark's images
(`detcore.synth`), canvas 256, batch 8, a gfl_tiny student, a gfl_r18 teacher with 64 FPN
and head channels (random weights: speed does not depend on them), a store written with
`label_store` from that teacher's forward over {original, flip} views with the default
codecs, all four target groups. Every configuration runs the product's own loop
(`student_trainer.train.train_student`) for --warmup + --steps steps with a metrics line
per step; a step's time covers loading its batch (render, hash check, store read and
decode when DataLoader workers are 0), the student forward and backward, the losses and
the optimizer step. Configurations are interleaved over --rounds rounds and each figure
is the median step time over every measured step of every round (and the minimum, the
steadier figure on a shared machine).

    python benchmarks/train_step_speed.py [--threads 2] [--steps 12] [--rounds 2] [--num-workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_store(url: Path, teacher_path: Path, annotations: Path, images: Path, batch: int = 8) -> None:
    """Teacher forward over {original, flip} views of every image -> a committed store (label_store only)."""
    import torch

    from detcore.checkpoint import load_detector, teacher_fingerprint
    from detcore.coco import CocoDataset
    from detcore.views import content_hash, plan_views, render
    from label_store import TeacherFingerprint, create_store, default_target_specs

    teacher, meta = load_detector(teacher_path)
    coco = CocoDataset(annotations, images)
    config = teacher.config
    specs = default_target_specs(
        config.num_classes, config.reg_max, tuple(meta["canvas_hw"]), list(config.strides), config.fpn_channels,
        backbone_channels=list(teacher.backbone.out_channels), groups=("cls", "box", "fpn", "backbone"),
    )
    store = create_store(str(url), TeacherFingerprint.from_dict(teacher_fingerprint(teacher_path)), specs)
    views = plan_views([(i, coco.record(i).height, coco.record(i).width) for i in coco.image_ids],
                       canvas_hw=tuple(meta["canvas_hw"]), flip=True)
    part = store.open_part("bench-0")
    for start in range(0, len(views), batch):
        chunk = views[start : start + batch]
        pixels = [coco.load(v.image_id) for v in chunk]
        rendered = [render(p, v) for p, v in zip(pixels, chunk)]
        with torch.no_grad():
            outputs = teacher(torch.stack([r.image for r in rendered]), with_backbone=True).targets()
        for index, (view, pix, item) in enumerate(zip(chunk, pixels, rendered)):
            part.append(
                {"image_id": view.image_id, "view_id": view.view_id, "view": view.to_json(),
                 "content_hash": content_hash(pix), "valid_region": list(item.valid_region)},
                {spec.name: outputs[spec.name][index].numpy() for spec in specs},
            )
    part.commit()


def prepare(work: Path, num_images: int, canvas: int) -> dict[str, Path]:
    import torch

    from detcore.checkpoint import save_checkpoint
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector
    from detcore.synth import generate

    data = work / "data"
    annotations = data / "annotations" / "train.json"
    if not annotations.exists():
        generate(data, num_train=num_images, num_val=0, seed=0, workers=1, progress=False)
    teacher = work / f"teacher_r18_{canvas}.pt"
    if not teacher.exists():
        classes = CocoDataset(annotations, data / "train").classes
        torch.manual_seed(0)
        model = build_detector("gfl_r18", len(classes), fpn_channels=64, head_channels=64)
        save_checkpoint(teacher, model, classes=list(classes), canvas_hw=(canvas, canvas))
    store = work / f"store_{canvas}.zarr"
    if not (store / "manifest").exists():
        write_store(store, teacher, annotations, data / "train")
    return {"annotations": annotations, "images": data / "train", "teacher": teacher, "store": store}


def measure(paths: dict[str, Path], out: Path, *, losses: str, source: str, args) -> list[float]:
    """Per-step seconds of the measured steps of one train_student run."""
    import shutil

    from student_trainer.config import build_run_config
    from student_trainer.train import train_student

    shutil.rmtree(out, ignore_errors=True)
    overrides = {
        "store": str(paths["store"]), "annotations": str(paths["annotations"]), "images": str(paths["images"]),
        "student": "gfl_tiny", "out": str(out), "losses": losses, "source": source, "iters": args.warmup + args.steps,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "threads": args.threads, "device": args.device,
        "log_every": 1, "checkpoint_every": 10**6, "seed": 0,
    }
    if source == "inprocess":
        overrides["teacher"] = str(paths["teacher"])
    config = build_run_config(None, overrides, ["schedule.tensorboard=false"])
    train_student(config, progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [args.batch_size / line["img_s"] for line in lines if "img_s" in line][args.warmup :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/distillery-train-step-speed", help="working folder (data, teacher, store)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=48, help="synthetic images in the store (x2 views)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: loading is inside the step time)")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--losses", default="ld,all", help="distillation configurations to compare (comma: ld,all,...)")
    parser.add_argument("--json-out", help="also write the figures to this JSON file")
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = prepare(work, args.num_images, args.canvas)
    print(f"setup {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)

    configs = [("none", "store")]
    for losses in args.losses.split(","):
        configs += [(losses, "store"), (losses, "inprocess")]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    load = []
    for round_index in range(args.rounds):
        for losses, source in configs:
            load.append(os.getloadavg()[0])
            steps = measure(paths, work / "runs" / f"{losses}-{source}", losses=losses, source=source, args=args)
            times[(losses, source)] += steps
            print(f"round {round_index + 1} {losses:>5} {source:>9}: median {statistics.median(steps) * 1e3:.0f} ms/step",
                  file=sys.stderr)

    def med(key):
        return statistics.median(times[key])

    def low(key):
        return min(times[key])

    rows = []
    base = ("none", "store")
    for losses in args.losses.split(","):
        offline, online = (losses, "store"), (losses, "inprocess")
        rows.append({
            "losses": losses,
            "none_ms": med(base) * 1e3, "offline_ms": med(offline) * 1e3, "inprocess_ms": med(online) * 1e3,
            "offline_over_none": med(offline) / med(base), "inprocess_over_offline": med(online) / med(offline),
            "offline_over_none_min": low(offline) / low(base), "inprocess_over_offline_min": low(online) / low(offline),
        })
    print(f"\ncanvas {args.canvas}, batch {args.batch_size}, student gfl_tiny, teacher gfl_r18 (64 ch), "
          f"threads {args.threads}, DataLoader workers {args.num_workers}, {args.steps} steps x {args.rounds} rounds, "
          f"load average {min(load):.1f}-{max(load):.1f}\n")
    print("| losses | no KD ms/step | offline ms/step | in-process ms/step | offline / no KD (goal <= 1.15) | in-process / offline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['losses']} | {r['none_ms']:.0f} | {r['offline_ms']:.0f} | {r['inprocess_ms']:.0f} | "
              f"{r['offline_over_none']:.3f} (min-based {r['offline_over_none_min']:.3f}) | "
              f"{r['inprocess_over_offline']:.2f} (min-based {r['inprocess_over_offline_min']:.2f}) |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows, "load": load,
                                                   "times_s": {f"{k[0]}|{k[1]}": v for k, v in times.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
