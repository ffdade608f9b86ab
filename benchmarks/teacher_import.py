"""An imported mmdetection GFL teacher at COCO shapes: CPU forward time and stored bytes per view.

Builds a random-weight GFL R50-FPN256 (80 classes, reg_max 16, 4 convs per head tower) in
mmdetection's checkpoint layout, imports it with `detcore.importers.import_teacher` (the
code behind `distill teacher import`), loads it with `load_detector`, renders random
images onto the 800x1333 canvas with `detcore.views.render`, then
    forward   process CPU time per view of ``model(images, with_backbone=True)`` (batch 1,
              after one warm-up view)
    store     the views' targets written into a label store with the default codecs;
              fp32 and stored bytes per view per target group (`inspect_store`)

    python benchmarks/teacher_import.py --views 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = ("cls", "box", "edges", "fpn", "backbone")
R50 = {"depth": 50, "block": "bottleneck", "stem_channels": 64, "stage_blocks": [3, 4, 6, 3], "stage_planes": [64, 128, 256, 512]}


def mmdet_gfl_r50_file(path: str, num_classes: int, seed: int) -> None:
    """A random-weight GFL R50-FPN256 checkpoint in mmdetection 2.x's layout (meta['CLASSES'], 'state_dict')."""
    import torch

    from detcore.importers.mmdet_gfl import build_mmdet_gfl

    torch.manual_seed(seed)
    architecture = {
        "family": "mmdet-gfl",
        "backbone": R50,
        "neck": {"in_channels": [512, 1024, 2048], "out_channels": 256, "num_outs": 5},
        "head": {"in_channels": 256, "feat_channels": 256, "stacked_convs": 4, "num_classes": num_classes, "reg_max": 16,
                 "gn_groups": 32},
        "strides": [8, 16, 32, 64, 128],
        "reg_max": 16,
    }
    model = build_mmdet_gfl(architecture)
    with torch.no_grad():  # mmdetection's head init: normal(0.01) convs, the classifier's prior bias
        for name, parameter in model.bbox_head.named_parameters():
            if name.endswith("conv.weight") or name in ("gfl_cls.weight", "gfl_reg.weight"):
                parameter.normal_(0.0, 0.01)
        model.bbox_head.gfl_cls.bias.fill_(-4.595)
    classes = tuple(f"class{i}" for i in range(num_classes))
    torch.save({"meta": {"mmdet_version": "2.28.2", "CLASSES": classes}, "state_dict": model.state_dict()}, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=3, help="timed views (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--canvas", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=80)
    args = parser.parse_args()

    import numcodecs.blosc
    import numpy as np
    import torch

    from detcore.checkpoint import load_detector_with_meta
    from detcore.importers import import_teacher
    from detcore.views import plan_views, render
    from label_store import TeacherFingerprint, create_store, default_target_specs, inspect_store

    torch.set_num_threads(args.threads)
    numcodecs.blosc.set_nthreads(1)
    canvas = tuple(args.canvas)
    with tempfile.TemporaryDirectory(prefix="teacher_import_") as tmp:
        source = os.path.join(tmp, "gfl_r50_mmdet.pth")
        mmdet_gfl_r50_file(source, args.classes, seed=0)
        start = time.perf_counter()
        summary = import_teacher("mmdet-gfl", source, os.path.join(tmp, "teacher.pt"), canvas_hw=canvas)
        import_s = time.perf_counter() - start
        model, meta = load_detector_with_meta(summary["out"])

        rng = np.random.default_rng(0)
        image_hw = (480, 640)  # COCO's typical size, scaled up onto the canvas as mmdetection's keep-ratio rule does
        views = plan_views([(i, *image_hw) for i in range(args.views + 1)], canvas_hw=canvas, flip=False)
        targets, cpu_s, wall_s = [], [], []
        with torch.inference_mode():
            for index, view in enumerate(views):
                pixels = rng.integers(0, 256, size=(*image_hw, 3), dtype=np.uint8)
                image = render(pixels, view).image[None]
                cpu, wall = time.process_time(), time.perf_counter()
                outputs = model(image, with_backbone=True)
                if index > 0:
                    cpu_s.append(time.process_time() - cpu)
                    wall_s.append(time.perf_counter() - wall)
                targets.append({k: v[0].float().numpy() for k, v in outputs.to_targets(GROUPS).items()})

        groups = GROUPS
        backbone_channels = [int(targets[0][f"backbone/{s}"].shape[0]) for s in ("c3", "c4", "c5")]
        specs = default_target_specs(args.classes, 16, canvas, meta["architecture"]["strides"], 256,
                                     backbone_channels=backbone_channels, groups=groups)
        fingerprint = TeacherFingerprint("mmdet-gfl", summary["source_sha256"], meta["classes"], canvas,
                                         tuple(meta["architecture"]["strides"]), 16, dict(meta["preprocessing"]))
        url = os.path.join(tmp, "store.zarr")
        store = create_store(url, fingerprint, specs, views_per_shard=1)
        with store.open_part("bench") as part:
            for view, view_targets in zip(views, targets):
                record = {"image_id": view.image_id, "view_id": 0, "view": "{}", "content_hash": "h",
                          "valid_region": (0, 0, canvas[1], canvas[0])}
                part.append(record, view_targets)
            part.commit()
        info = inspect_store(url)

    params = sum(p.numel() for p in model.parameters())
    print(f"# imported GFL R50-FPN256, {args.classes} classes, {params:,} parameters; import took {import_s:.1f} s")
    print(f"# canvas {canvas[0]}x{canvas[1]}, {args.threads} thread(s), {len(cpu_s)} timed views")
    print(f"# forward with backbone features: CPU {np.mean(cpu_s):.2f} s/view (min {min(cpu_s):.2f}), wall {np.mean(wall_s):.2f} s/view")
    print("| group | codec | fp32 MB/view | stored MB/view | stored / fp32 |")
    print("|---|---|---|---|---|")
    total_fp32 = total_stored = 0.0
    for group in info["groups"]:
        entry = info["groups"][group] if isinstance(info["groups"], dict) else group
        fp32, stored = entry["fp32_bytes_per_view"], entry["stored_bytes_per_view"]
        total_fp32 += fp32
        total_stored += stored
        print(f"| {entry['group']} | {', '.join(sorted(set(entry['codecs'])))} | {fp32 / 1e6:.2f} | {stored / 1e6:.3f} | {stored / fp32:.3f} |")
    print(f"| all | | {total_fp32 / 1e6:.2f} | {total_stored / 1e6:.3f} | {total_stored / total_fp32:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
