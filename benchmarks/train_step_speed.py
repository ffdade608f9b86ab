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
codecs, all four target groups. Each configuration holds the training loop's own parts
(`StoreViewDataset` + DataLoader, the target source, `DistillationModel`, AdamW); a step
covers loading its batch (render, hash check, and the store read and decode when the
DataLoader workers are 0), completing its targets, the student forward and backward, the
losses, clipping and the optimizer step. The configurations' steps alternate, so the
shared machine's changing load hits them alike; a ratio is the median over steps of the
ratio of two configurations' adjacent steps. With DataLoader workers, alternation lets
each loader prefetch while the other configurations step, which hides loading time:
``--sequential`` runs one configuration at a time instead (ratios of medians; for a
dedicated machine such as a lent GPU one, where load does not drift between blocks).

    python benchmarks/train_step_speed.py [--threads 2] [--steps 30] [--num-workers 0] [--sequential]

``--device cuda`` puts the student (and the in-process teacher) on a GPU under the
trainer's autocast (`detcore.train.autocast_context`: bf16 where supported), moves each batch and
its targets there as `train_student` does, and ends each step's time at
`torch.cuda.synchronize()`; loading stays on the CPU (use ``--num-workers``).
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

    from detcore.checkpoint import load_detector_with_meta, teacher_fingerprint
    from detcore.coco import CocoDataset
    from detcore.views import content_hash, plan_views, render
    from label_store import TeacherFingerprint, create_store, default_target_specs

    teacher, meta = load_detector_with_meta(teacher_path)
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
            outputs = teacher(torch.stack([r.image for r in rendered]), with_backbone=True).to_targets(("cls", "box", "fpn", "backbone"))
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


class Config:
    """One measured configuration: its own data loader, target source, student and optimizer.

    A step is exactly the work of one iteration of `student_trainer.train.train_student`:
    take the next batch from the DataLoader (render, hash check, and the store read and
    decode when the workers are 0), complete its targets from the source, student forward,
    GFL + distillation losses, backward, gradient clipping, AdamW step.
    """

    def __init__(self, paths: dict[str, Path], losses: str, source_kind: str, args) -> None:
        import torch
        from torch.utils.data import DataLoader

        from detcore.coco import CocoDataset
        from detcore.models.gfl import build_detector
        from detcore.train import autocast_context
        from student_trainer.config import build_run_config
        from detcore.datasets import CanvasBatchSampler
        from student_trainer.data import StoreViewDataset, collate_train
        from student_trainer.distill import DistillationModel, needed_target_names
        from student_trainer.sources import InProcessTeacherSource, StoreSource

        self.name = f"{losses} ({'in-process teacher' if source_kind == 'inprocess' else 'offline'})" if losses != "none" else "none"
        self.losses, self.source_kind = losses, source_kind
        config = build_run_config(None, {"store": str(paths["store"]), "annotations": str(paths["annotations"]),
                                         "images": str(paths["images"]), "losses": losses})
        self.names = needed_target_names(config.losses, config.student.strides)
        store = StoreSource(str(paths["store"]), self.names)
        stored = store.stored_views()
        coco = CocoDataset(paths["annotations"], paths["images"])
        views = [v for v, _ in stored]
        offline = source_kind == "store" and bool(self.names)
        dataset = StoreViewDataset(coco, views, expected_hashes={v.key: h for v, h in stored},
                                   target_reader=store.worker_reader() if offline else None)
        self.device = torch.device(args.device)
        self.autocast, _ = autocast_context(self.device, True)
        self.source = (store if source_kind == "store"
                       else InProcessTeacherSource(str(paths["teacher"]), self.names, device=self.device))
        self.sampler = CanvasBatchSampler(views, args.batch_size, seed=0)  # as train_student
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate_train,
                                 num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
        self.epoch, self.iterator = 0, None
        torch.manual_seed(0)
        student = build_detector("gfl_tiny", len(coco.classes))
        self.model = DistillationModel(student, config.losses, tuple(store.fingerprint.canvas_hw),
                                       {spec.name: spec.shape[0] for spec in store.specs}).to(self.device)
        dataset.regions = self.model.region_spec()  # as train_student: the loader's workers compute them
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []

    def release(self) -> None:
        """Stop the loader's workers and free the models (the step times stay)."""
        import gc

        import torch

        self.iterator = None
        self.loader = self.model = self.optimizer = self.source = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _next_batch(self):
        while True:
            if self.iterator is None:
                self.sampler.set_epoch(self.epoch)
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.epoch += 1
                self.iterator = None

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        batch = self._next_batch()
        device = self.device
        teacher = self.source.complete(batch, device=device) if self.names else None
        with self.autocast:
            terms, _ = self.model(batch["images"].to(device, non_blocking=True), [b.to(device) for b in batch["gt_boxes"]],
                                  [lb.to(device) for lb in batch["gt_labels"]], teacher, batch.get("regions"))
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 35.0)
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/distillery-train-step-speed", help="working folder (data, teacher, store)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=48, help="synthetic images in the store (x2 views)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: loading is inside the step time)")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the student (and the in-process teacher) run: cpu or cuda")
    parser.add_argument("--losses", default="ld,all", help="distillation configurations to compare (comma: ld,all,...)")
    parser.add_argument("--sequential", action="store_true",
                        help="run each configuration's steps as one block, one configuration at a time, and take "
                             "ratios of medians (for --num-workers > 0: alternating steps let every loader "
                             "prefetch during the other configurations' steps, which hides its loading time)")
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

    specs = [("none", "store")]
    for losses in args.losses.split(","):
        specs += [(losses, "store"), (losses, "inprocess")]
    load = []
    if args.sequential:
        # One configuration at a time, built just before its block and released after it, so
        # no other loader prefetches meanwhile and the GPU holds one student at a time.
        configs = []
        for losses, kind in specs:
            config = Config(paths, losses, kind, args)
            for index in range(args.warmup + args.steps):
                load.append(os.getloadavg()[0])
                seconds = config.step()
                if index >= args.warmup:
                    config.times.append(seconds)
            print(f"{config.name}: median {statistics.median(config.times) * 1e3:.0f} ms", file=sys.stderr)
            config.release()
            configs.append(config)
    else:
        configs = [Config(paths, losses, kind, args) for losses, kind in specs]
        # Steps of the configurations alternate (order rotated every round), so a change in the
        # machine's load hits them alike; ratios are medians of ratios of adjacent steps.
        for index in range(args.warmup + args.steps):
            load.append(os.getloadavg()[0])
            order = configs[index % len(configs):] + configs[: index % len(configs)]
            for config in order:
                seconds = config.step()
                if index >= args.warmup:
                    config.times.append(seconds)
            if index >= args.warmup and (index - args.warmup) % 5 == 4:
                print(f"step {index + 1}: " + ", ".join(f"{c.name} {c.times[-1] * 1e3:.0f} ms" for c in configs), file=sys.stderr)

    by_name = {(c.losses, c.source_kind): c for c in configs}
    base = by_name[("none", "store")]

    def paired(a, b):
        if args.sequential:  # no adjacent steps to pair
            return statistics.median(a.times) / statistics.median(b.times)
        return statistics.median(x / y for x, y in zip(a.times, b.times))

    rows = []
    for losses in args.losses.split(","):
        offline, online = by_name[(losses, "store")], by_name[(losses, "inprocess")]
        rows.append({
            "losses": losses,
            "none_ms": statistics.median(base.times) * 1e3,
            "offline_ms": statistics.median(offline.times) * 1e3,
            "inprocess_ms": statistics.median(online.times) * 1e3,
            "offline_over_none": paired(offline, base),
            "inprocess_over_offline": paired(online, offline),
            "offline_over_none_of_medians": statistics.median(offline.times) / statistics.median(base.times),
            "inprocess_over_offline_of_medians": statistics.median(online.times) / statistics.median(offline.times),
        })
    print(f"\ncanvas {args.canvas}, batch {args.batch_size}, student gfl_tiny, teacher gfl_r18 (64 ch), "
          f"device {args.device}, threads {args.threads}, DataLoader workers {args.num_workers}, {args.steps} measured steps per configuration "
          f"(after {args.warmup}), {'one configuration at a time, ratios of medians' if args.sequential else 'steps alternating, medians of paired ratios'}, "
          f"load average {min(load):.1f}-{max(load):.1f}\n")
    print("| losses | no KD ms/step | offline ms/step | in-process ms/step | offline / no KD (goal <= 1.15) | in-process / offline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['losses']} | {r['none_ms']:.0f} | {r['offline_ms']:.0f} | {r['inprocess_ms']:.0f} | "
              f"{r['offline_over_none']:.3f} | {r['inprocess_over_offline']:.2f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows, "load": load,
                                                   "times_s": {c.name: c.times for c in configs}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
