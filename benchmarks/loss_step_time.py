"""Forward + backward time per training step of each distillation loss and recipe.

Canvas-sized tensors: canvas 256 x 256, B = 8 images, K = 8 classes, R = 16, FPN levels
P3..P7 (strides 8..128, maps 32..2), FPN channels 64 (student) / 128 (teacher), backbone
stages C3..C5 with 64/128/256 (student) and 128/256/512 (teacher) channels, 8 random GT
boxes per image. Each line gives the median and the minimum over --repeats steps after
--warmup steps (on a shared machine the minimum is the steadier figure).

    python benchmarks/loss_step_time.py [--threads 2] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time


def build_inputs(torch, device, batch=8, canvas=256, num_classes=8, reg_max=16, boxes_per_image=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    strides = (8, 16, 32, 64, 128)
    shapes = [(math.ceil(canvas / s), math.ceil(canvas / s)) for s in strides]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    data = {
        "strides": strides,
        "shapes": shapes,
        "reg_max": reg_max,
        "canvas_hw": (canvas, canvas),
        "student_cls": [randn(batch, num_classes, h, w, scale=2) for h, w in shapes],
        "teacher_cls": [randn(batch, num_classes, h, w, scale=2) for h, w in shapes],
        "student_box": [randn(batch, 4 * (reg_max + 1), h, w, scale=2) for h, w in shapes],
        "teacher_box": [randn(batch, 4 * (reg_max + 1), h, w, scale=2) for h, w in shapes],
        "student_fpn": [randn(batch, 64, h, w) for h, w in shapes],
        "teacher_fpn": [randn(batch, 128, h, w) for h, w in shapes],
    }
    stage_channels_s = {"c3": 64, "c4": 128, "c5": 256}
    stage_channels_t = {"c3": 128, "c4": 256, "c5": 512}
    stage_sizes = {s: canvas // stride for s, stride in zip(stage_channels_s, strides)}
    student_feats = {s: randn(batch, c, stage_sizes[s], stage_sizes[s]) for s, c in stage_channels_s.items()}
    teacher_feats = {s: randn(batch, c, stage_sizes[s], stage_sizes[s]) for s, c in stage_channels_t.items()}
    for level, (h, w) in enumerate(shapes):
        name = f"p{3 + level}"
        student_feats[name] = data["student_fpn"][level]
        teacher_feats[name] = data["teacher_fpn"][level]
        stage_channels_s[name], stage_channels_t[name] = 64, 128
    data.update(
        student_feats=student_feats,
        teacher_feats=teacher_feats,
        stage_channels_s=stage_channels_s,
        stage_channels_t=stage_channels_t,
    )
    gt_boxes = []
    for _ in range(batch):
        xy = torch.rand(boxes_per_image, 2, generator=gen) * (canvas - 40)
        wh = torch.rand(boxes_per_image, 2, generator=gen) * 120 + 8
        gt_boxes.append(torch.cat([xy, (xy + wh).clamp(max=canvas)], dim=1).to(device))
    data["gt_boxes"] = gt_boxes
    return data


def loop_masks(torch, gt_boxes, canvas_hw, H, W):
    """The released per-box loop (for comparison with the vectorised `fgd_masks`)."""
    foreground = torch.zeros(len(gt_boxes), H, W, device=gt_boxes[0].device)
    background = torch.ones_like(foreground)
    for i, boxes in enumerate(gt_boxes):
        x1 = torch.floor(boxes[:, 0] * W / canvas_hw[1]).int()
        x2 = torch.ceil(boxes[:, 2] * W / canvas_hw[1]).int()
        y1 = torch.floor(boxes[:, 1] * H / canvas_hw[0]).int()
        y2 = torch.ceil(boxes[:, 3] * H / canvas_hw[0]).int()
        area = 1.0 / (y2 + 1 - y1) / (x2 + 1 - x1)
        for j in range(len(boxes)):
            region = foreground[i][y1[j] : y2[j] + 1, x1[j] : x2[j] + 1]
            foreground[i][y1[j] : y2[j] + 1, x1[j] : x2[j] + 1] = torch.maximum(region, area[j])
        background[i] = torch.where(foreground[i] > 0, 0.0, 1.0)
        if background[i].sum():
            background[i] /= background[i].sum()
    return foreground, background


def time_ms(torch, fn, device, warmup, repeats):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples), min(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
    import torch

    from student_trainer.losses import (
        BCDConfig,
        FGDConfig,
        HGDConfig,
        LDConfig,
        assign_points,
        bcd_recipe,
        build_fgd_modules,
        build_hgd_module,
        fgd_masks,
        fgd_recipe,
        hgd_recipe,
        ld_recipe,
    )

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = build_inputs(torch, device)
    fgd_modules = build_fgd_modules(FGDConfig.for_family("gfl"), 64, 128, len(data["strides"])).to(device)
    hgd_module = build_hgd_module(HGDConfig(), data["stage_channels_s"], data["stage_channels_t"]).to(device)
    assignment = assign_points(data["gt_boxes"], data["strides"], data["shapes"], topk=9, vlr_alpha=0.25, device=device)

    def student_leaves():
        leaves = {}
        for key in ("student_cls", "student_box", "student_fpn"):
            leaves[key] = [t.detach().requires_grad_() for t in data[key]]
        leaves["student_feats"] = {s: t.detach().requires_grad_() for s, t in data["student_feats"].items()}
        return leaves

    def dense_args(leaves):
        return (
            leaves["student_cls"],
            leaves["student_box"],
            data["teacher_cls"],
            data["teacher_box"],
            data["gt_boxes"],
            data["strides"],
            data["reg_max"],
        )

    def step(losses, keys=None):
        sum(losses[k] for k in (keys or losses)).backward()

    gt_boxes, canvas_hw = data["gt_boxes"], data["canvas_hw"]

    cases = {
        "assign_points (ATSS + VLR, 8 images, no backward)": lambda: assign_points(
            data["gt_boxes"], data["strides"], data["shapes"], device=device
        ),
        "ld_recipe incl. ATSS + VLR": lambda: step(ld_recipe(*dense_args(student_leaves()), config=LDConfig())),
        "ld_recipe, precomputed assignment": lambda: step(
            ld_recipe(*dense_args(student_leaves()), config=LDConfig(), assignment=assignment)
        ),
        "bcd_recipe, precomputed assignment": lambda: step(
            bcd_recipe(*dense_args(student_leaves()), config=BCDConfig(), assignment=assignment)
        ),
        "fgd_recipe (5 levels, 64 -> 128 ch)": lambda: step(
            fgd_recipe(fgd_modules, student_leaves()["student_fpn"], data["teacher_fpn"], gt_boxes, canvas_hw),
            keys=("fgd",),
        ),
        "hgd_recipe (c3-c5 + p3-p7)": lambda: step(
            hgd_recipe(hgd_module, student_leaves()["student_feats"], data["teacher_feats"], gt_boxes, canvas_hw),
            keys=("hgd",),
        ),
        "fgd_masks, vectorised (P3 32x32, 8 images x 8 boxes)": lambda: fgd_masks(data["gt_boxes"], data["canvas_hw"], 32, 32),
        "fgd masks, released per-box loop (same)": lambda: loop_masks(torch, data["gt_boxes"], data["canvas_hw"], 32, 32),
    }
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, canvas 256, B=8, K=8, R=16")
    print(f"{'case':58s} {'median ms':>10s} {'min ms':>8s}")
    for name, fn in cases.items():
        median, fastest = time_ms(torch, fn, device, args.warmup, args.repeats)
        print(f"{name:58s} {median:10.2f} {fastest:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
