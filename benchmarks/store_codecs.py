"""Label-store codecs: bytes per view, ratio vs fp32, loss error, and encode/decode speed.

For every target group (cls, box, fpn, optionally backbone) and candidate codec this
measures, on teacher-like synthetic views (`label_store.testing.synthetic_targets`):
    bytes per view   compressed codes + crc32c + scale/offset, summed over the levels
    ratio            fp32 bytes / stored bytes
    loss error       relative error of the group's reference loss over all levels
                     (`label_store.fidelity`: BCE for cls, LD KL at T=10 for box, MSE for
                     features) against fp32 targets; also the worst single level, the
                     relative error of the loss gradient, and each method's own loss
                     (class KD at T=2 for cls, FGD's attention-weighted loss for features)
    encode / decode  MB/s of float32 target data per core (one thread: quantize +
                     compress, decompress + dequantize)
and picks per group the smallest codec under the budget (0.5% cls/box, 1% features),
which is how `label_store.schema.DEFAULT_CODECS` was chosen.

    python benchmarks/store_codecs.py                      # defaults: 320x320 canvas, 8 views
    python benchmarks/store_codecs.py --texture 0.1        # smoother (more compressible) maps
    python benchmarks/store_codecs.py --student-noise 1.0  # a reference student further away
    python benchmarks/store_codecs.py --groups backbone --views 4
    python benchmarks/store_codecs.py --teacher T.pt --annotations A.json --images DIR --views 16
                                                           # a trained teacher's real outputs

With ``--teacher``, the views are real: the first ``--views`` images of the dataset, rendered
at the checkpoint's canvas (scale 1.0, unflipped) and passed through the teacher in fp32;
the canvas, K, R and channels are the checkpoint's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _speed(codec, arrays, repeats: int) -> tuple[float, float]:
    """(encode MB/s, decode MB/s) of float32 input per core, single thread."""
    import numpy as np

    compressor = codec.numcodecs_compressor()
    total = sum(a.nbytes for a in arrays)
    encoded = []
    start = time.process_time()
    for _ in range(repeats):
        encoded = []
        for array in arrays:
            codes, scale, offset = codec.encode(array)
            blob = compressor.encode(codes) if compressor is not None else codes.tobytes()
            encoded.append((blob, codes.shape, scale, offset))
    encode_s = (time.process_time() - start) / repeats
    start = time.process_time()
    for _ in range(repeats):
        for blob, shape, scale, offset in encoded:
            raw = compressor.decode(blob) if compressor is not None else blob
            codec.decode(np.frombuffer(raw, codec.dtype).reshape(shape), scale, offset)
    decode_s = (time.process_time() - start) / repeats
    return total / encode_s / 1e6, total / decode_s / 1e6


def teacher_views(checkpoint: str, annotations: str, images: str, count: int, groups: tuple[str, ...]):
    """(specs, fp32 targets of ``count`` real views, description) from a trained teacher."""
    import numpy as np
    import torch

    from detcore.checkpoint import load_detector_with_meta
    from detcore.coco import CocoDataset
    from detcore.datasets import ViewDataset, collate_views
    from detcore.views import plan_views
    from label_store import default_target_specs

    model, meta = load_detector_with_meta(checkpoint, map_location="cpu")
    config = meta["detector_config"]
    dataset = CocoDataset(annotations, images)
    ids = dataset.image_ids[:count]
    canvas = tuple(meta["canvas_hw"])
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in ids], canvas_hw=canvas, flip=False)
    rendered = ViewDataset(dataset, views)
    batch = collate_views([rendered[i] for i in range(len(rendered))])
    with torch.no_grad():
        outputs = model(batch["images"], with_backbone="backbone" in groups)
    backbone = [f.shape[1] for f in outputs.backbone_features] if outputs.backbone_features is not None else None
    specs = default_target_specs(model.num_classes, model.reg_max, canvas, model.strides, outputs.fpn_features[0].shape[1],
                                 backbone_channels=backbone, groups=groups)
    arrays = {name: value.float().numpy() for name, value in outputs.to_targets(groups).items()}
    targets = [{spec.name: np.ascontiguousarray(arrays[spec.name][i]) for spec in specs} for i in range(len(ids))]
    what = (f"teacher {config.arch} ({config.fpn_channels} ch) {checkpoint}, canvas {canvas}, K={model.num_classes}, "
            f"R={model.reg_max}, {len(ids)} real views")
    return specs, targets, what


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, nargs=2, default=(320, 320), metavar=("H", "W"), help="canvas size")
    parser.add_argument("--views", type=int, default=8, help="synthetic views measured")
    parser.add_argument("--texture", type=float, default=0.3, help="per-point noise of the synthetic maps (see label_store.testing)")
    parser.add_argument("--student-noise", type=float, default=None, help="override the reference student's noise (sensitivity only)")
    parser.add_argument("--groups", nargs="+", default=["cls", "box", "fpn"], choices=["cls", "box", "fpn", "backbone"], help="target groups (backbone: ResNet-50 stages c3..c5)")
    parser.add_argument("--speed-repeats", type=int, default=2, help="repeats of the speed measurement")
    parser.add_argument("--codecs", nargs="*", default=None, help="candidate codec names (default: label_store.fidelity.DEFAULT_CANDIDATES)")
    parser.add_argument("--teacher", help="a detector checkpoint: measure its real outputs instead of synthetic maps")
    parser.add_argument("--annotations", help="COCO json of the images the teacher sees (with --teacher)")
    parser.add_argument("--images", help="image folder (with --teacher)")
    args = parser.parse_args()
    if args.teacher and not (args.annotations and args.images):
        parser.error("--teacher needs --annotations and --images")

    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)  # per-core figures
    import label_store.fidelity as fidelity
    from label_store import DEFAULT_CODECS, choose_codecs, default_target_specs, parse_codec
    from label_store.testing import synthetic_targets

    if args.student_noise is not None:
        fidelity.STUDENT_NOISE = args.student_noise
    groups = tuple(args.groups)
    if args.teacher:
        specs, views, what = teacher_views(args.teacher, args.annotations, args.images, args.views, groups)
    else:
        specs = default_target_specs(80, 16, tuple(args.canvas), (8, 16, 32, 64, 128), 256, backbone_channels=(512, 1024, 2048), groups=groups)
        views = [synthetic_targets(specs, seed=1000 + i, texture=args.texture) for i in range(args.views)]
        what = f"canvas {tuple(args.canvas)}, K=80, R=16, FPN C=256, {args.views} synthetic views, texture {args.texture}"
    candidates = args.codecs if args.codecs is not None else list(fidelity.DEFAULT_CANDIDATES)
    candidates += [DEFAULT_CODECS[g] for g in groups if DEFAULT_CODECS[g] not in candidates]
    # compression levels of likely winners: reported, not chosen from (level 5 is the write-speed compromise)
    levels = [f"{DEFAULT_CODECS[g].split('+')[0]}+zstd{level}" for g in groups for level in (1, 9, 15)]
    print(f"# {what}, reference student noise {fidelity.STUDENT_NOISE} x std")
    start = time.perf_counter()
    result = choose_codecs(views, specs, candidates=candidates)
    level_rows = choose_codecs(views, specs, candidates=levels)["rows"] if args.codecs is None else []
    print(f"# fidelity sweep: {time.perf_counter() - start:.1f} s")
    header = "| group | codec | bytes/view | ratio vs fp32 | loss err | worst level | grad err | max abs err | method loss err | encode MB/s | decode MB/s |"
    print(header)
    print("|" + "---|" * 11)
    for row in result["rows"] + [r for r in level_rows if r["codec"] != "fp32"]:
        codec = parse_codec(row["codec"])
        arrays = [view[spec.name] for view in views[:2] for spec in specs if spec.group == row["group"]]
        encode_mbs, decode_mbs = _speed(codec, arrays, args.speed_repeats)
        chosen_row = result["chosen"][row["group"]] == row["codec"] and row in result["rows"]
        methods = ", ".join(f"{name} {100 * error:.3f}%" for name, error in row["method_loss_rel_error"].items())
        mark = " (chosen)" if chosen_row else ("" if row["passes"] else " x")
        if row not in result["rows"]:
            mark += " (level sweep)"
        print(
            f"| {row['group']} | {row['codec']}{mark} | {row['bytes_per_view']:,.0f} | {row['ratio']:.2f} | "
            f"{100 * row['loss_rel_error']:.3f}% | {100 * row['worst_level_loss_rel_error']:.3f}% | {100 * row['grad_rel_error']:.2f}% | "
            f"{row['max_abs_error']:.3f} | {methods or '-'} | {encode_mbs:.0f} | {decode_mbs:.0f} |"
        )
    print()
    chosen = result["chosen"]
    rows = {(r["group"], r["codec"]): r for r in result["rows"]}
    print("chosen:", chosen)
    print("DEFAULT_CODECS:", {g: DEFAULT_CODECS[g] for g in groups})
    for label, mapping in (("chosen", chosen), ("defaults", {g: DEFAULT_CODECS[g] for g in groups})):
        if mapping.get("cls") and mapping.get("box"):
            cls, box = rows[("cls", mapping["cls"])], rows[("box", mapping["box"])]
            ratio = (cls["fp32_bytes_per_view"] + box["fp32_bytes_per_view"]) / (cls["bytes_per_view"] + box["bytes_per_view"])
            worst = max(cls["loss_rel_error"], box["loss_rel_error"])
            print(f"goal cls+box >= 10x at < 0.5% ({label}): {ratio:.2f}x, worst loss error {100 * worst:.3f}% -> {'met' if ratio >= 10 and worst < 0.005 else 'NOT met'}")
        if mapping.get("fpn"):
            fpn = rows[("fpn", mapping["fpn"])]
            print(
                f"goal fpn >= 3.5x at < 1% ({label}): {fpn['ratio']:.2f}x, loss error {100 * fpn['loss_rel_error']:.3f}% "
                f"-> {'met' if fpn['ratio'] >= 3.5 and fpn['loss_rel_error'] < 0.01 else 'NOT met'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
