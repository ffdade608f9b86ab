"""Bytes per view and padding at ``--canvas 800x1333`` on COCO-like image sizes: one canvas vs two.

A teacher trained with mmdetection saw every image resized by ``Resize(scale=(1333, 800),
keep_ratio=True)``. Three ways to store its views, compared on a mix of COCO's common
image sizes (a quarter of them portrait):

    one canvas 800x1333 (fit)   every view fitted into 800x1333: portrait images shrink
                                to 0.75 of mmdetection's size (the layout before canvases)
    one canvas 1333x1333        mmdetection's sizes, every view on one square canvas
    two canvases                mmdetection's sizes; landscape on 800x1333, portrait on
                                1333x800 (`detcore.views.plan_views`)

Bytes are arithmetic from the target shapes of an 80-class R50-FPN256 GFL teacher (cls 80,
box 4 x 17, fpn 256 channels at strides 8-128), per view: float32, and one byte per value
(the int5/int6 codes before zstd); the padding share is the share of those values whose
cell lies outside the view's image (`label_store.schema.padding_fraction`).

Then a short measured step time of a gfl_tiny student (GFL loss, AdamW) at a small canvas
(``--small-canvas``, default 128x213, the same aspect): batches from
`detcore.datasets.CanvasBatchSampler` (one canvas each) for the two-canvas layout, against
one canvas; the configurations' steps alternate so the shared machine's load hits them alike.

    python benchmarks/views_canvas.py [--images 400] [--steps 12] [--batch-size 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# COCO's most common (height, width) sizes; the last four are portrait (25% of the mix).
LANDSCAPE = [(480, 640), (427, 640), (375, 500), (426, 640), (428, 640), (424, 640)]
PORTRAIT = [(640, 480), (640, 427), (500, 375), (640, 428)]


def coco_like_sizes(num_images: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    portrait = num_images // 4
    sizes = [PORTRAIT[i] for i in rng.integers(len(PORTRAIT), size=portrait)]
    sizes += [LANDSCAPE[i] for i in rng.integers(len(LANDSCAPE), size=num_images - portrait)]
    return [sizes[i] for i in rng.permutation(num_images)]


def gfl_r50_specs(canvas_hw: tuple[int, int]):
    from label_store.schema import default_target_specs

    return default_target_specs(80, 16, canvas_hw, (8, 16, 32, 64, 128), 256, groups=("cls", "box", "fpn"))


def layout_figures(views, name: str) -> dict:
    """fp32 and one-byte-code MB per view, padding share, and portrait views' size vs mmdetection's."""
    from label_store.schema import padding_fraction

    fp32, padded, total = 0.0, 0.0, 0.0
    by_canvas: dict[tuple[int, int], list] = {}
    for view in views:
        by_canvas.setdefault((view.canvas_h, view.canvas_w), []).append(view)
    for canvas, members in by_canvas.items():
        specs = gfl_r50_specs(canvas)
        regions = np.asarray([v.valid_region for v in members])
        for spec in specs:
            values = spec.num_elements * len(members)
            total += values
            padded += float(spec.num_elements * padding_fraction(spec, canvas, regions).sum())
            fp32 += spec.fp32_nbytes * len(members)
    portrait = [v for v in views if v.image_h > v.image_w]
    mmdet = [min(1333 / max(v.image_h, v.image_w), 800 / min(v.image_h, v.image_w)) for v in portrait]
    return {
        "layout": name,
        "canvases": " + ".join(f"{h}x{w}" for h, w in sorted(by_canvas, key=lambda c: -len(by_canvas[c]))),
        "fp32_mb": fp32 / len(views) / 1e6,
        "code_mb": total / len(views) / 1e6,
        "padding": padded / total,
        "portrait_scale": float(np.mean([v.scale / m for v, m in zip(portrait, mmdet)])) if portrait else float("nan"),
    }


def on_square_canvas(views, side: int):
    """The same sizes (mmdetection's) on one square canvas of ``side``."""
    return [dataclasses.replace(v, canvas_h=side, canvas_w=side) for v in views]


def measure_steps(sizes, small_canvas, steps: int, batch_size: int, threads: int) -> dict[str, float]:
    """Median step ms of a gfl_tiny student on batches of one layout, steps alternating between layouts."""
    import torch

    from detcore.datasets import CanvasBatchSampler
    from detcore.models.gfl import build_detector
    from detcore.views import plan_views

    torch.set_num_threads(threads)
    images = [(i + 1, h, w) for i, (h, w) in enumerate(sizes)]
    side = max(small_canvas)
    two = plan_views(images, canvas_hw=small_canvas, flip=False)
    layouts = {
        "one canvas (fit)": plan_views(images, canvas_hw=small_canvas, flip=False, orient=False),
        "one square canvas": on_square_canvas(two, side),
        "two canvases (grouped)": two,
    }
    rng = np.random.default_rng(0)
    runs = {}
    for name, views in layouts.items():
        torch.manual_seed(0)
        model = build_detector("gfl_tiny", 80)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batches = [b for epoch in range(10) for b in CanvasBatchSampler(views, batch_size, seed=epoch).batches(epoch)]
        runs[name] = (model, optimizer, views, iter(batches), [])

    def step(model, optimizer, views, batch) -> float:
        canvas = (views[batch[0]].canvas_h, views[batch[0]].canvas_w)
        tensor = torch.zeros(len(batch), 3, *canvas)
        gt_boxes, gt_labels = [], []
        for row, index in enumerate(batch):
            x1, y1, x2, y2 = views[index].valid_region
            tensor[row, :, y1:y2, x1:x2] = torch.randn(3, y2 - y1, x2 - x1)
            corners = np.sort(rng.uniform([x1, y1, x1, y1], [x2, y2, x2, y2], size=(3, 4)).reshape(3, 2, 2), axis=1)
            boxes = np.concatenate([corners[:, 0], corners[:, 1] + 4], axis=1).clip(0, [x2, y2, x2, y2])
            gt_boxes.append(torch.as_tensor(boxes, dtype=torch.float32))
            gt_labels.append(torch.as_tensor(rng.integers(80, size=3)))
        start = time.perf_counter()
        outputs = model(tensor)
        loss = sum(model.loss(outputs, gt_boxes, gt_labels).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for index in range(steps + 2):
        for model, optimizer, views, batches, times in runs.values():
            elapsed = step(model, optimizer, views, next(batches))
            if index >= 2:  # the first two steps warm the allocator up
                times.append(elapsed)
    return {name: 1000 * statistics.median(run[4]) for name, run in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small-canvas", default="128x213")
    args = parser.parse_args(argv)

    from detcore.views import plan_views

    sizes = coco_like_sizes(args.images)
    images = [(i + 1, h, w) for i, (h, w) in enumerate(sizes)]
    rows = [
        layout_figures(plan_views(images, canvas_hw=(800, 1333), flip=False, orient=False), "one canvas 800x1333 (fit)"),
        layout_figures(on_square_canvas(plan_views(images, canvas_hw=(800, 1333), flip=False), 1333), "one canvas 1333x1333"),
        layout_figures(plan_views(images, canvas_hw=(800, 1333), flip=False), "two canvases"),
    ]
    portrait = sum(1 for h, w in sizes if h > w) / len(sizes)
    print(f"{len(sizes)} COCO-like images, {100 * portrait:.0f}% portrait; 80-class R50-FPN256 GFL targets (cls, box, fpn), strides 8-128")
    print()
    print("| layout | canvases | fp32 MB/view | 1-byte codes MB/view | padding share | portrait size vs mmdetection |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['layout']} | {row['canvases']} | {row['fp32_mb']:.1f} | {row['code_mb']:.2f} | "
              f"{100 * row['padding']:.1f}% | {row['portrait_scale']:.2f} |")
    small = tuple(int(v) for v in args.small_canvas.lower().split("x"))
    times = measure_steps(sizes[:64], small, args.steps, args.batch_size, args.threads)
    print()
    print(f"gfl_tiny student step (forward, GFL loss, backward, AdamW), batch {args.batch_size}, canvas {small[0]}x{small[1]}, "
          f"{args.threads} threads, median of {args.steps} alternating steps:")
    print()
    print("| layout | ms/step |")
    print("|---|---:|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
