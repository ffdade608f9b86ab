"""Box and class targets stored only where LD reads them (`label_store.StoreRegion`): bytes, share, loss error.

For a trained teacher's real outputs on ``--views`` views (the first images at ``--canvas``,
unflipped) and a trained student's outputs on them, per view:

- the region (`detcore.assign.stored_region`, ATSS topk 9, VLR alpha >= 0.25) from the
  view's GT, and the shares of the points it holds beside the ATSS positives and the VLR
  that LD reads (`student_trainer.losses.recipes.assign_points`);
- the box targets encoded dense (as a dense store), zero-filled outside the region (codes 0
  in place, prediction as dense) and in the region layout a region store writes
  (`TargetCodec.stored_codes(keep=)`: the region's points first, then zeros), both with the
  packed mask (the ``region`` array), for the default box codec under each codec profile;
  bytes per view are compressed codes + crc32c + scale/offset (+ mask), as a store writes them;
- LD's terms (``ld_main``, ``ld_vlr``) from the region store's decoded box (NaN outside the
  region) and BCD's IoU term from the dense ``edges`` it is trained with beside such a box,
  against float32 targets (relative error), and whether LD from the region store equals LD
  from a dense store of the same codec bit for bit;
- the same for the class logits (``--cls-region ld``: the same region and mask): cls bytes
  per view dense, zero-filled and in the region layout (+ mask) for the default cls codec
  under each profile, and ``ld_kd`` (LD's class KD at the ATSS positives, the one term that
  reads cls in such a store) from the region store's decoded cls against float32, and
  against a dense store of the same codec.

Then a projection to COCO shapes (800x1333 canvas, strides 8-128: 22,400 points, 68 box
channels): the region share of random GT sets drawn from COCO train2017's published
statistics (7.3 instances per image; 41% small < 32^2, 34% medium, 24% large > 96^2 px
of area in a 640x480 original, which the keep-ratio view scales by 800/480; sides
log-uniform in each band, aspect ratio log-normal), times the
bytes per stored box element measured here, plus the mask; and for cls the same with 80
class channels (the bytes per stored cls element measured on this teacher's classes).

    python benchmarks/store_box_region.py --teacher T.pt --student S.pt \\
        --annotations A.json --images DIR --views 16 --canvas 256
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.store_method_fidelity import load_views  # noqa: E402

TOPK, ALPHA = 9, 0.25
PARAMS_COMPRESSOR_LEVEL = 3  # the store's ``quant`` / ``region`` arrays: zstd 3


def level_slices(strides, canvas):
    out, start = [], 0
    for stride in strides:
        h, w = math.ceil(canvas[0] / stride), math.ceil(canvas[1] / stride)
        out.append((start, h, w))
        start += h * w
    return out


def mask_bytes(mask) -> int:
    import numpy as np
    from numcodecs import Zstd

    return len(Zstd(level=PARAMS_COMPRESSOR_LEVEL).encode(np.packbits(mask))) + 4


def encode_levels(codec, levels, mask, slices):
    """(dense bytes, zero-filled bytes, region-layout bytes, region decoded levels) of one view's levels of one group.

    zero-filled: the codes of the points outside the mask set to 0 in place (prediction as dense);
    region layout: what a region store writes (`TargetCodec.stored_codes(keep=)`).
    """
    import numpy as np

    dense = zero = packed = 0
    decoded = []
    compressor = codec.numcodecs_compressor()
    for x, (start, h, w) in zip(levels, slices):
        keep = mask[start : start + h * w].reshape(h, w)
        codes, scale, offset = codec.encode(x)
        dense += len(compressor.encode(np.ascontiguousarray(codes))) + 4 + 8 * scale.size
        plain = codec._unpredict(codes) if codec.predict else codes
        filled = codec.stored_codes(plain * keep[None].astype(np.uint8))
        zero += len(compressor.encode(np.ascontiguousarray(filled))) + 4 + 8 * scale.size
        region_codes, region_scale, region_offset = codec.encode(x, keep)
        packed += len(compressor.encode(np.ascontiguousarray(region_codes))) + 4 + 8 * region_scale.size
        decoded.append(codec.decode(region_codes, region_scale, region_offset, keep))
    return dense, zero, packed, decoded


def measure_cls(codec, cls_levels, masks, slices):
    """Bytes per view (dense, zero-filled + mask, region layout + mask, mask) of the cls levels, and
    their decoded levels as Tensor[B, K, H, W] per level: from the region layout and from a dense store."""
    import numpy as np
    import torch

    totals = {"dense": 0, "zero": 0, "packed": 0, "mask": 0}
    region_levels, dense_levels = [[] for _ in slices], [[] for _ in slices]
    for i, mask in enumerate(masks):
        view_cls = [np.ascontiguousarray(level[i]) for level in cls_levels]
        dense, zero, packed, decoded = encode_levels(codec, view_cls, mask, slices)
        mask_cost = mask_bytes(mask)
        for key, value in (("dense", dense), ("zero", zero + mask_cost), ("packed", packed + mask_cost), ("mask", mask_cost)):
            totals[key] += value
        for level, value in enumerate(decoded):
            region_levels[level].append(value)
            dense_levels[level].append(codec.decode(*codec.encode(view_cls[level])))
    per_view = {key: value / len(masks) for key, value in totals.items()}
    stack = lambda levels: [torch.from_numpy(np.stack(v)) for v in levels]  # noqa: E731
    return per_view, stack(region_levels), stack(dense_levels)


def codec_rows(group: str, extra) -> list[tuple[str, str]]:
    """(row label, codec name) of ``group``: the default codec of a region store under each profile
    (`label_store.schema.basis_free_defaults`), then each of ``extra``."""
    from label_store.codecs import parse_codec, profile_codec
    from label_store.schema import basis_free_defaults

    default = basis_free_defaults([group])[group]
    return [(p, profile_codec(default, p)) for p in ("small", "fast")] + [(name, parse_codec(name).name) for name in extra]


def report_cls(teacher_out, student_out, gt, strides, reg_max, masks, slices, reference, extra=()):
    """Print the cls table (one row per profile, then per codec of ``extra``); returns row label -> bytes per view."""
    import torch

    from label_store.codecs import parse_codec
    from student_trainer.losses import ld_recipe

    cls_levels = [level.float().numpy() for level in teacher_out.cls_logits]
    fp32_cls = sum(level[0].nbytes for level in cls_levels)
    s_cls, s_box, t_box = list(student_out.cls_logits), list(student_out.box_logits), list(teacher_out.box_logits)
    print(f"# cls: {cls_levels[0].shape[1]} classes, fp32 cls bytes per view {fp32_cls:,}; fp32 ld_kd {reference['ld_kd']:.5g}")
    print("| profile | cls codec | dense B/view (x) | zero-filled + mask B/view (x) | region layout + mask B/view (x) | "
          "ld_kd err | ld_kd equals dense store |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for profile, name in codec_rows("cls", extra):
        codec = parse_codec(name)
        per_view, region_cls, dense_cls = measure_cls(codec, cls_levels, masks, slices)
        with torch.no_grad():
            region_kd = float(ld_recipe(s_cls, s_box, region_cls, t_box, gt, strides, reg_max)["ld_kd"])
            dense_kd = float(ld_recipe(s_cls, s_box, dense_cls, t_box, gt, strides, reg_max)["ld_kd"])
        error = abs(region_kd - reference["ld_kd"]) / reference["ld_kd"]
        rows[profile] = per_view
        print(f"| {profile} | {codec.name} | {per_view['dense']:,.0f} ({fp32_cls / per_view['dense']:.1f}) | "
              f"{per_view['zero']:,.0f} ({fp32_cls / per_view['zero']:.1f}) | {per_view['packed']:,.0f} ({fp32_cls / per_view['packed']:.1f}) | "
              f"{100 * error:.3f}% | {region_kd == dense_kd} |")
    return rows


def project_coco(group, rows, channels, coco_channels, share, points, coco_share, coco_points):
    """Print the COCO MB/view of ``group`` per profile: per stored element x region points x channels + mask."""
    for profile, per_view in rows.items():
        per_element = (per_view["packed"] - per_view["mask"]) / (share * points * channels)
        mask_per_point = per_view["mask"] / points
        region_mb = (coco_share * coco_points * coco_channels * per_element + mask_per_point * coco_points) / 1e6
        dense_element = per_view["dense"] / (points * channels)
        print(f"#   {group} {profile}: {per_element:.4f} B per stored {group} element (dense {dense_element:.4f}), mask "
              f"{mask_per_point:.3f} B/point -> {group} {region_mb:.3f} MB/view ({coco_channels} channels; dense "
              f"{coco_points * coco_channels * dense_element / 1e6:.3f})")


def coco_region_share(strides, images: int, seed: int = 0) -> tuple[float, int]:
    """Mean region share and points per view of random COCO-like GT sets on an 800x1333 canvas."""
    import numpy as np

    from detcore.assign import stored_region

    rng = np.random.default_rng(seed)
    canvas = (800, 1333)
    scale = 800 / 480  # a 640x480 image (COCO's typical size) at mmdetection's scale for 800x1333
    image_w = int(640 * scale)
    shares = []
    for _ in range(images):
        count = max(1, rng.poisson(7.3))
        bands = rng.choice(3, size=count, p=[0.41, 0.34, 0.25])
        lo, hi = np.array([4.0, 32.0, 96.0])[bands], np.array([32.0, 96.0, 480.0])[bands]
        side = np.exp(rng.uniform(np.log(lo), np.log(hi))) * scale
        aspect = np.exp(rng.normal(0.0, 0.5, size=count))
        w, h = np.minimum(side * np.sqrt(aspect), image_w - 1), np.minimum(side / np.sqrt(aspect), canvas[0] - 1)
        x1, y1 = rng.uniform(0, image_w - w), rng.uniform(0, canvas[0] - h)
        boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)
        mask = stored_region(boxes, canvas, strides, topk=TOPK, vlr_alpha=ALPHA).numpy()
        shares.append(mask.mean())
    points = sum(math.ceil(canvas[0] / s) * math.ceil(canvas[1] / s) for s in strides)
    return float(np.mean(shares)), points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--coco-images", type=int, default=100, help="random COCO-like GT sets for the projection")
    parser.add_argument("--box-codecs", nargs="*", default=[], help="also these box codecs (rows beside the defaults)")
    parser.add_argument("--cls-codecs", nargs="*", default=[], help="also these cls codecs (rows beside the defaults)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from detcore.assign import stored_region
    from label_store import default_target_specs
    from label_store.codecs import parse_codec, profile_codec  # noqa: F401
    from label_store.schema import DEFAULT_CODECS
    from student_trainer.losses import bcd_recipe, ld_recipe
    from student_trainer.losses.recipes import assign_points

    torch.set_num_threads(1)
    canvas = (args.canvas, args.canvas)
    batch, teacher, teacher_out, student_out, _ = load_views(args.teacher, args.student, args.annotations, args.images, args.views, canvas)
    strides, reg_max = tuple(teacher.strides), int(teacher.reg_max)
    slices = level_slices(strides, canvas)
    points = slices[-1][0] + slices[-1][1] * slices[-1][2]
    views = len(batch["views"])
    box = [level.float().numpy() for level in teacher_out.box_logits]
    edges = [level.float().numpy() for level in teacher_out.edge_distances()]
    gt = batch["gt_boxes"]
    masks = [stored_region(boxes, canvas, strides, topk=TOPK, vlr_alpha=ALPHA).numpy() for boxes in gt]
    shapes = [(h, w) for _, h, w in slices]
    assignment = assign_points(gt, strides, shapes, topk=TOPK, vlr_alpha=ALPHA)
    positives = (assignment.assigned_gt > 0).numpy()
    vlr = (assignment.vlr > 0).numpy()
    read = positives | vlr
    outside = int((read & ~np.stack(masks)).sum())
    share = float(np.mean([m.mean() for m in masks]))
    print(f"# teacher {args.teacher}, student {args.student}: {views} views at canvas {canvas}, {points} points per view, "
          f"{sum(len(b) for b in gt) / views:.1f} GT boxes per view")
    print(f"# shares of the points: ATSS positives {100 * positives.mean():.1f}%, VLR (alpha {ALPHA}) {100 * vlr.mean():.1f}%, "
          f"their union (what LD reads) {100 * read.mean():.1f}%, stored region {100 * share:.1f}%; points LD reads outside the region: {outside}")

    s_cls, s_box = list(student_out.cls_logits), list(student_out.box_logits)
    t_cls = list(teacher_out.cls_logits)
    with torch.no_grad():
        reference = {k: float(v) for k, v in ld_recipe(s_cls, s_box, t_cls, list(teacher_out.box_logits), gt, strides, reg_max).items()}
        reference.update({k: float(v) for k, v in bcd_recipe(s_cls, s_box, t_cls, list(teacher_out.box_logits), gt, strides, reg_max).items()})
    specs = default_target_specs(teacher.num_classes, reg_max, canvas, strides, teacher_out.fpn_features[0].shape[1], groups=("box", "edges"))
    fp32_box = sum(s.fp32_nbytes for s in specs if s.group == "box")
    print(f"# fp32 box bytes per view {fp32_box:,}; fp32 losses: " + ", ".join(f"{k} {v:.5g}" for k, v in reference.items()))
    print("| profile | box codec | dense B/view (x) | zero-filled + mask B/view (x) | region layout + mask B/view (x) | "
          "mask B/view | edges B/view | ld_main err | ld_vlr err | bcd_iou err (edges) | LD equals dense store |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for profile, name in codec_rows("box", args.box_codecs):
        codec = parse_codec(name)
        edges_codec = parse_codec(profile_codec(DEFAULT_CODECS["edges"], profile if profile in ("small", "fast") else "small"))
        totals = {"dense": 0, "zero": 0, "packed": 0, "mask": 0, "edges": 0}
        region_levels = [[] for _ in strides]
        dense_levels = [[] for _ in strides]
        edges_levels = [[] for _ in strides]
        for i in range(views):
            view_box = [np.ascontiguousarray(level[i]) for level in box]
            dense, zero, packed, decoded = encode_levels(codec, view_box, masks[i], slices)
            mask = mask_bytes(masks[i])
            totals["dense"] += dense
            totals["zero"] += zero + mask
            totals["packed"] += packed + mask
            totals["mask"] += mask
            for level, value in enumerate(decoded):
                region_levels[level].append(value)
                codes, scale, offset = codec.encode(view_box[level])
                dense_levels[level].append(codec.decode(codes, scale, offset))
                e = np.ascontiguousarray(edges[level][i])
                codes, scale, offset = edges_codec.encode(e)
                totals["edges"] += len(edges_codec.numcodecs_compressor().encode(np.ascontiguousarray(codes))) + 4 + 8 * scale.size
                edges_levels[level].append(edges_codec.decode(codes, scale, offset))
        stack = lambda levels: [torch.from_numpy(np.stack(v)) for v in levels]  # noqa: E731
        with torch.no_grad():
            region_ld = {k: float(v) for k, v in ld_recipe(s_cls, s_box, t_cls, stack(region_levels), gt, strides, reg_max).items()}
            dense_ld = {k: float(v) for k, v in ld_recipe(s_cls, s_box, t_cls, stack(dense_levels), gt, strides, reg_max).items()}
            bcd = {k: float(v) for k, v in bcd_recipe(s_cls, s_box, t_cls, None, gt, strides, reg_max, teacher_edges=stack(edges_levels)).items()}
        err = lambda value, key: abs(value - reference[key]) / reference[key]  # noqa: E731
        per_view = {k: v / views for k, v in totals.items()}
        rows[profile] = per_view
        print(f"| {profile} | {codec.name} | {per_view['dense']:,.0f} ({fp32_box / per_view['dense']:.1f}) | "
              f"{per_view['zero']:,.0f} ({fp32_box / per_view['zero']:.1f}) | {per_view['packed']:,.0f} ({fp32_box / per_view['packed']:.1f}) | "
              f"{per_view['mask']:,.0f} | {per_view['edges']:,.0f} | {100 * err(region_ld['ld_main'], 'ld_main'):.3f}% | "
              f"{100 * err(region_ld['ld_vlr'], 'ld_vlr'):.3f}% | {100 * err(bcd['bcd_iou'], 'bcd_iou'):.3f}% | "
              f"{region_ld['ld_main'] == dense_ld['ld_main'] and region_ld['ld_vlr'] == dense_ld['ld_vlr']} |")
    cls_rows = report_cls(teacher_out, student_out, gt, strides, reg_max, masks, slices, reference, args.cls_codecs)
    fp32_cls = sum(level[0].numel() * 4 for level in teacher_out.cls_logits)
    pairs = [(p, p) for p in ("small", "fast")] + [(b, c) for b in args.box_codecs or ["small"] for c in args.cls_codecs]
    for box_label, cls_label in pairs:
        both = rows[box_label]["packed"] + cls_rows[cls_label]["packed"] - cls_rows[cls_label]["mask"]
        print(f"# cls + box in one region (--cls-region ld --box-region ld, one mask), box {box_label} + cls {cls_label}: "
              f"{both:,.0f} B/view ({(fp32_box + fp32_cls) / both:.1f}x of the {fp32_box + fp32_cls:,} B of float32 cls + box)")
    coco_share, coco_points = coco_region_share(strides, args.coco_images)
    channels = 4 * (reg_max + 1)
    print(f"# COCO projection: {args.coco_images} random GT sets (7.3 per image, COCO's size bands) on 800x1333: region share "
          f"{100 * coco_share:.1f}% of {coco_points} points (one mask serves box and cls when both are in the region)")
    project_coco("box", rows, channels, channels, share, points, coco_share, coco_points)
    project_coco("cls", cls_rows, teacher.num_classes, 80, share, points, coco_share, coco_points)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
