"""Codecs judged by the distillation methods' own losses, with their bytes and write CPU per view.

For a trained teacher's real outputs on ``--views`` views and a trained student's outputs
on the same views, every codec setting below encodes the teacher's cls, box and fpn
targets view by view (as a store's write task does: quantize, predict, compress) and
decodes them; then each method's loss, as the trainer computes it
(`student_trainer.losses.recipes`), is evaluated with the decoded targets and with the
float32 targets:

    ld_main, ld_vlr   LD's KL at T=10 on the edge distributions, at ATSS positives / in the VLR
    ld_kd             LD's class KD at T=2 at the positives
    bcd_cls, bcd_iou  BCD's class term (all points) and its box IoU term (decoded teacher boxes)
    fgd               FGD's total (attention-weighted foreground/background feature loss,
                      attention and global terms; per-level modules with fixed-seed init)
    ld_im             LD's released feature imitation at its fine-grained region (teacher-RMS
                      normalised MSE; fixed-seed adapters where the widths differ)
    hgd               HGD over the FPN stages p3..p7 (its micro/macro weights; fixed-seed adapters)
    bce_all, kd_all   BCE with sigmoid targets and class KD at T=2 over every point (the
                      losses a method reading cls at all points sees)

and reported as the relative error ``|L(decoded) - L(fp32)| / L(fp32)`` over the batch.
Per group: stored bytes per view (compressed codes + crc32c + scale/offset, as
`TargetCodec.compressed_nbytes`) and the ratio to float32; per setting: write CPU per view
(quantize + predict + compress of every target, one thread, process time) against the
teacher's forward per view (same process, same thread count, fp32 on the CPU), and read CPU
per view (decompress + decode of every target, one thread); after the table, per setting and
group, the order-0 entropy of the stored codes (``n * H0 / 8`` bytes per view: the floor of any
entropy coder that codes each code alone, whatever the compressor).

Settings: ``small`` (label_store.schema.DEFAULT_CODECS, the fpn default's step growing per
level as `label_store.schema.level_step_codecs` writes it), ``fast`` (the same under the
``fast`` codec profile), ``small`` with cls in its int codec (`label_store.schema.BASIS_FREE_CODECS`,
the default of stores before cls was transform-coded) floored at each ``--floors`` value, and
``small`` with fpn transform-coded (``--pca-steps``: ``pca-std<k>``, its per-level bases
fitted on the ``--fit-views`` images after the measured ones, as a store fits them on its
first views; their fit is not counted in the write CPU; ``--pca-spatial dct`` adds the
``pca-std<k>-dct`` codecs, coefficients also DCT-transformed along the map), and ``small``
with each cls codec of ``--cls-codecs`` (any codec names, e.g. ``pca-std48-dct+blosc-zstd5-bitshuffle``),
and ``small`` with fpn at one ``pca-std<k>`` per level (``--fpn-level-steps 2,4,8,16,32``: finest
level first, as ``distill precompute --codec fpn/p3=... --codec fpn/p4=...`` writes it), and
each fpn setting of the default and ``--fpn-level-steps`` also quantized with a step G times
coarser outside LD's region (``--fpn-outside G``; a lever measured here, not a store codec: each
view's region from its GT as `detcore.assign.stored_region` computes it for a region store, ATSS
topk 9, VLR alpha 0.25, the mask's bytes not counted, as a region store keeps it anyway).

    python benchmarks/store_method_fidelity.py --teacher T.pt --student S.pt \\
        --annotations A.json --images DIR --views 8 --canvas 256 --floors -4 -6 -8 -10

The teacher and student are detector checkpoints of the same classes (`distill detector
train`, `distill student train`); views are the first ``--views`` images rendered onto
``--canvas`` (scale 1.0, unflipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = ("cls", "box", "fpn")
METHOD_KEYS = ("ld_main", "ld_vlr", "ld_kd", "bcd_cls", "bcd_iou", "fgd", "ld_im", "hgd", "bce_all", "kd_all")
METHODS_BY_GROUP = {"cls": ("ld_kd", "bcd_cls", "bce_all", "kd_all"), "box": ("ld_main", "ld_vlr", "bcd_iou"), "fpn": ("fgd", "ld_im", "hgd")}


def load_views(teacher_path: str, student_path: str, annotations: str, images: str, count: int, canvas: tuple[int, int]):
    """Rendered batch, teacher and student outputs (fp32, no grad), the models' metadata."""
    import torch

    from detcore.checkpoint import load_detector_with_meta
    from detcore.coco import CocoDataset
    from detcore.datasets import ViewDataset, collate_views
    from detcore.views import plan_views

    teacher, _ = load_detector_with_meta(teacher_path, map_location="cpu")
    student, _ = load_detector_with_meta(student_path, map_location="cpu")
    teacher.eval(), student.eval()
    dataset = CocoDataset(annotations, images)
    ids = dataset.image_ids[:count]
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in ids], canvas_hw=canvas, flip=False)
    rendered = ViewDataset(dataset, views)
    batch = collate_views([rendered[i] for i in range(len(rendered))])
    with torch.no_grad():
        teacher(batch["images"][:1])  # warm-up
        start = time.process_time()
        teacher_out = teacher(batch["images"])
        forward_cpu = (time.process_time() - start) / len(ids)
        student_out = student(batch["images"])
    return batch, teacher, teacher_out, student_out, forward_cpu


def fit_sample(teacher, annotations: str, images: str, first: int, count: int, canvas: tuple[int, int], names):
    """Teacher targets (name -> float32 array[C, H, W]) of images ``first .. first + count``: the views a store fits its transform bases on."""
    import torch

    from detcore.coco import CocoDataset
    from detcore.datasets import ViewDataset, collate_views
    from detcore.views import plan_views

    dataset = CocoDataset(annotations, images)
    ids = dataset.image_ids[first : first + count]
    if len(ids) < count:
        raise SystemExit(f"store_method_fidelity: --fit-views {count} needs {first + count} images. Got {len(dataset.image_ids)}.")
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in ids], canvas_hw=canvas, flip=False)
    rendered = ViewDataset(dataset, views)
    batch = collate_views([rendered[i] for i in range(len(rendered))])
    with torch.no_grad():
        arrays = {name: value.float().numpy() for name, value in teacher(batch["images"]).to_targets(GROUPS).items()}
    return [{name: arrays[name][i] for name in names} for i in range(len(ids))]


def region_stepped(codec, x, keep, outside: int):
    """``pca-std<k>`` codes of ``x`` with the step ``outside`` times coarser at the points outside
    ``keep`` (bool array[H, W]): (zigzag uint8 codes array[C, H, W], decoded float32 array[C, H, W])."""
    import numpy as np

    from label_store.codecs import _zigzag

    basis = codec.basis
    flat = x.reshape(x.shape[0], -1)
    factor = np.where(keep.reshape(-1), np.float32(1), np.float32(outside))
    coefficients = (basis.basis_array.T @ (flat - basis.mean_array[:, None])) / factor
    rms = float(np.sqrt(np.mean(np.square(flat, dtype=np.float64))))
    step = np.float32(max(rms / codec.steps_per_std, float(np.abs(coefficients).max()) / 127))
    signed = np.clip(np.rint(coefficients / step), -127, 127).astype(np.int8)
    codes = _zigzag(signed).reshape(x.shape)
    decoded = basis.basis_array @ (signed * (step * factor)) + basis.mean_array[:, None]
    return codes, decoded.astype(np.float32).reshape(x.shape)


def encode_decode(specs, targets, codecs: dict[str, str], sample=(), regions=(), outside: int = 0):
    """Per view, encode and decode every target; (decoded per view, bytes per group per view, write and
    read CPU per view, `order0_bytes` of each group's stored codes per view).

    A transform codec (``pca-std<k>``) is bound to a basis fitted on ``sample`` (other views' targets);
    with ``outside``, its fpn targets step that many times coarser outside each view's region
    (``regions``: per view, name -> bool array[H, W]; `region_stepped`).
    """
    import numpy as np

    from label_store.codecs import parse_codec
    from label_store.schema import TargetSpec, fit_target_bases

    named = {spec.name: codecs.get(spec.name, codecs[spec.group]) for spec in specs}  # a target's own codec wins
    bound = fit_target_bases([TargetSpec(spec.name, spec.shape, named[spec.name]) for spec in specs], sample) if any(
        parse_codec(codec).needs_basis for codec in named.values()) else None
    decoded, stored = [], {g: 0 for g in GROUPS}
    histograms = {g: np.zeros(1 << 16, np.int64) for g in GROUPS}  # stored code values, for `order0_bytes`
    cpu, read_cpu = 0.0, 0.0
    for number, view in enumerate(targets):
        out = {}
        for index, spec in enumerate(specs):
            codec = bound[index].target_codec if bound is not None else parse_codec(named[spec.name])
            compressor = codec.numcodecs_compressor()
            if outside and spec.group == "fpn" and codec.storage == "pca" and not codec.spatial:
                start = time.process_time()
                codes, out[spec.name] = region_stepped(codec, view[spec.name], regions[number][spec.name], outside)
                stored[spec.group] += len(compressor.encode(codes)) + 4 + 8
                cpu += time.process_time() - start
                histograms[spec.group][: 1 << 8] += np.bincount(codes.reshape(-1), minlength=1 << 8)
                continue
            start = time.process_time()
            codes, scale, offset = codec.encode(view[spec.name])
            blob = compressor.encode(np.ascontiguousarray(codes)) if compressor is not None else codes.tobytes()
            cpu += time.process_time() - start
            stored[spec.group] += len(blob) + 4 + 8 * scale.size
            if codec.quantized:
                histograms[spec.group][: 1 << (8 * codes.itemsize)] += np.bincount(codes.reshape(-1), minlength=1 << (8 * codes.itemsize))
            start = time.process_time()
            raw = compressor.decode(blob) if compressor is not None else blob
            out[spec.name] = codec.decode(np.frombuffer(raw, codec.dtype).reshape(codes.shape), scale, offset)
            read_cpu += time.process_time() - start
        decoded.append(out)
    views = len(targets)
    return decoded, {g: b / views for g, b in stored.items()}, cpu / views, read_cpu / views, {
        g: order0_bytes(h) / views for g, h in histograms.items()}


def order0_bytes(histogram) -> float:
    """Bytes of the values a histogram counts at their order-0 entropy: ``n * H0 / 8``, the size no
    entropy coder that codes each value alone (without context) goes below."""
    import numpy as np

    counts = histogram[histogram > 0].astype(np.float64)
    if not counts.size:
        return 0.0
    p = counts / counts.sum()
    return float(counts.sum() * -(p * np.log2(p)).sum() / 8)


def method_losses(batch, student_out, teacher_levels, strides, reg_max, canvas, modules) -> dict[str, float]:
    """Each method's loss of the student against teacher targets given per level as Tensors[B, C, H, W]
    (``modules``: the FGD, ld_im and HGD modules of `feature_modules`)."""
    import torch

    from student_trainer.losses import bcd_recipe, fgd_recipe, kd_cls_loss, ld_recipe
    from student_trainer.losses.recipes import hgd_recipe, ld_im_recipe

    def points(levels):  # Tensors[B, K, H, W] per level -> Tensor[P, K], every point of every level
        return torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in levels])

    gt = batch["gt_boxes"]
    t_cls, t_box, t_fpn = teacher_levels["cls"], teacher_levels["box"], teacher_levels["fpn"]
    s_cls, s_box = list(student_out.cls_logits), list(student_out.box_logits)
    with torch.no_grad():
        out = {k: float(v) for k, v in ld_recipe(s_cls, s_box, t_cls, t_box, gt, strides, reg_max).items()}
        out.update({k: float(v) for k, v in bcd_recipe(s_cls, s_box, t_cls, t_box, gt, strides, reg_max).items()})
        s_fpn = list(student_out.fpn_features)
        out["fgd"] = float(fgd_recipe(modules["fgd"], s_fpn, t_fpn, gt, canvas)["fgd"])
        out["ld_im"] = float(ld_im_recipe(modules["ld_im"], s_fpn, t_fpn, gt, strides)["ld_im"])
        names = [f"p{stride.bit_length() - 1}" for stride in strides]
        out["hgd"] = float(hgd_recipe(modules["hgd"], dict(zip(names, s_fpn)), dict(zip(names, t_fpn)), gt, canvas)["hgd"])
        s_all, t_all = points(s_cls).double(), points(t_cls).double()
        out["bce_all"] = float(torch.nn.functional.binary_cross_entropy_with_logits(s_all, t_all.sigmoid()))
        out["kd_all"] = float(kd_cls_loss(s_all.float(), t_all.float(), None, float(s_all.shape[0]), 2.0))
    return out


def feature_modules(student_channels: int, teacher_channels: int, strides) -> dict:
    """The feature losses' modules (default configs, FPN stages for HGD), fixed-seed, in eval mode."""
    import torch

    from student_trainer.config import HGDConfig, LDConfig
    from student_trainer.losses import FGDConfig, build_fgd_modules
    from student_trainer.losses.recipes import build_hgd_module, build_imitation

    torch.manual_seed(0)
    names = [f"p{stride.bit_length() - 1}" for stride in strides]
    modules = {
        "fgd": build_fgd_modules(FGDConfig(), student_channels, teacher_channels, len(strides)),
        "ld_im": build_imitation(LDConfig(), student_channels, teacher_channels, len(strides)),
        "hgd": build_hgd_module(HGDConfig(stages=tuple(names)), dict.fromkeys(names, student_channels), dict.fromkeys(names, teacher_channels)),
    }
    for module in modules.values():
        module.eval()
    return modules


def view_regions(gt_boxes, specs, canvas, strides) -> list[dict]:
    """Per view, name -> bool array[H, W]: LD's region (as a region store keeps it) at each target's level."""
    from benchmarks.store_box_region import level_slices  # imports this module: not at its top
    from detcore.assign import stored_region
    from label_store.schema import target_stride

    starts = {stride: start for stride, (start, _, _) in zip(strides, level_slices(strides, canvas))}
    out = []
    for boxes in gt_boxes:
        mask = stored_region(boxes, canvas, strides, topk=9, vlr_alpha=0.25).numpy()
        out.append({spec.name: mask[starts[target_stride(spec)] : starts[target_stride(spec)] + spec.shape[1] * spec.shape[2]]
                    .reshape(spec.shape[1:]) for spec in specs})
    return out


def levels_of(decoded_views, specs, group):
    """Per level Tensor[B, C, H, W] of one group, stacked over the views."""
    import numpy as np
    import torch

    return [torch.from_numpy(np.stack([view[spec.name] for view in decoded_views])) for spec in specs if spec.group == group]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="trained teacher checkpoint")
    parser.add_argument("--student", required=True, help="trained student checkpoint (same classes)")
    parser.add_argument("--annotations", required=True, help="COCO json of the images")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--views", type=int, default=8, help="views measured (the first images, unflipped)")
    parser.add_argument("--canvas", type=int, default=256, help="square canvas side")
    parser.add_argument("--floors", type=float, nargs="*", default=[-4.0, -6.0, -8.0, -10.0], help="cls floors to try")
    parser.add_argument("--cls-bits", type=int, nargs="*", default=[5, 4], help="bits of the floored cls codecs")
    parser.add_argument("--sweep", action="store_true", help="also finer box and fpn codecs (int7, int8), zstd 15")
    parser.add_argument("--zstd-levels", type=int, nargs="*", default=[], help="also the default quantizers at these zstd levels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the teacher forward")
    parser.add_argument("--pca-steps", type=int, nargs="*", default=[], help="also fpn pca-std<k> codecs at these k")
    parser.add_argument("--pca-compressors", nargs="*", default=["blosc-zstd5-bitshuffle"], help="compressors of the pca codecs")
    parser.add_argument("--pca-spatial", nargs="*", choices=("none", "dct"), default=["none"],
                        help="spatial transforms of the pca codecs: none (pca-std<k>), dct (pca-std<k>-dct)")
    parser.add_argument("--cls-codecs", nargs="*", default=[], help="also these cls codecs (codec names)")
    parser.add_argument("--fpn-level-steps", nargs="*", default=[], metavar="K3,K4,...",
                        help="also fpn pca-std<k> with one k per level, finest first (as --codec fpn/p3=... sets it)")
    parser.add_argument("--fpn-outside", type=int, nargs="*", default=[], metavar="G",
                        help="also the default and --fpn-level-steps fpn settings with a step G times coarser outside LD's region")
    parser.add_argument("--fit-views", type=int, default=8, help="views after the measured ones that the pca bases are fitted on")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from label_store import default_target_specs
    from label_store.codecs import parse_codec, profile_codec
    from label_store.schema import BASIS_FREE_CODECS, DEFAULT_CODECS, level_step_codecs

    canvas = (args.canvas, args.canvas)
    batch, teacher, teacher_out, student_out, forward_cpu = load_views(
        args.teacher, args.student, args.annotations, args.images, args.views, canvas)
    strides, reg_max = tuple(teacher.strides), int(teacher.reg_max)
    specs = default_target_specs(teacher.num_classes, reg_max, canvas, strides, teacher_out.fpn_features[0].shape[1], groups=GROUPS)
    arrays = {name: value.float().numpy() for name, value in teacher_out.to_targets(GROUPS).items()}
    views = [{spec.name: np.ascontiguousarray(arrays[spec.name][i]) for spec in specs} for i in range(len(batch["views"]))]
    fp32_bytes = {g: sum(spec.fp32_nbytes for spec in specs if spec.group == g) for g in GROUPS}
    points = sum(spec.shape[1] * spec.shape[2] for spec in specs if spec.group == "cls")
    modules = feature_modules(student_out.fpn_features[0].shape[1], teacher_out.fpn_features[0].shape[1], strides)

    def losses_of(decoded_views):
        levels = {g: levels_of(decoded_views, specs, g) for g in GROUPS}
        return method_losses(batch, student_out, levels, strides, reg_max, canvas, modules)

    reference = losses_of(views)
    settings = {"small": dict(DEFAULT_CODECS), "fast": {g: profile_codec(DEFAULT_CODECS[g], "fast") for g in GROUPS}}
    cls_storage, cls_compressor = BASIS_FREE_CODECS["cls"].split("+")  # the floors apply to the int codec
    for bits in args.cls_bits:
        storage = cls_storage.replace("int5-", f"int{bits}-", 1)
        for floor in args.floors:
            cls_codec = f"{storage}-floor{floor:g}+{cls_compressor}"
            settings[f"small, cls int{bits} floor {floor:g}"] = {**DEFAULT_CODECS, "cls": cls_codec}
            settings[f"fast, cls int{bits} floor {floor:g}"] = {**settings["fast"], "cls": profile_codec(cls_codec, "fast")}
    for level in args.zstd_levels:
        settings[f"zstd {level}"] = {g: DEFAULT_CODECS[g].replace("zstd15", f"zstd{level}") for g in GROUPS}
    if args.sweep:
        for bits in (7, 8):
            settings[f"small, box int{bits}"] = {**DEFAULT_CODECS, "box": f"int{bits}-view-dbhw+zstd15"}
            settings[f"small, fpn int{bits}"] = {**DEFAULT_CODECS, "fpn": f"int{bits}-view-dhw+zstd15"}

    for k in args.pca_steps:
        for spatial in args.pca_spatial:
            storage = f"pca-std{k}" + ("" if spatial == "none" else f"-{spatial}")
            for compressor in args.pca_compressors:
                settings[f"small, fpn {storage}" + ("" if len(args.pca_compressors) == 1 else f" {compressor}")] = {
                    **DEFAULT_CODECS, "fpn": f"{storage}+{compressor}"}
    for steps in args.fpn_level_steps:
        per_level = [int(k) for k in steps.split(",")]
        levels = [spec.name for spec in specs if spec.group == "fpn"]
        if len(per_level) != len(levels):
            raise SystemExit(f"store_method_fidelity: --fpn-level-steps expects {len(levels)} values per setting. Got {steps!r}.")
        compressor = args.pca_compressors[0]
        settings[f"small, fpn pca-std{'/'.join(map(str, per_level))}"] = {
            **DEFAULT_CODECS, "fpn": f"pca-std{per_level[0]}+{compressor}",  # the finest level's, in the codecs column
            **{name: f"pca-std{k}+{compressor}" for name, k in zip(levels, per_level)}}
    for codec in args.cls_codecs:
        settings[f"small, cls {codec}"] = {**DEFAULT_CODECS, "cls": parse_codec(codec).name}
    levels = [spec.name for spec in specs if spec.group == "fpn"]
    level_steps = [[parse_codec(c.codec).steps_per_std for c in level_step_codecs(
        [dataclasses.replace(spec, codec=DEFAULT_CODECS["fpn"]) for spec in specs if spec.group == "fpn"], ["fpn"])]]
    level_steps += [[int(k) for k in steps.split(",")] for steps in args.fpn_level_steps]
    outside_of = {}  # setting -> G of --fpn-outside
    for outside in args.fpn_outside:
        for per_level in level_steps:
            names = [f"pca-std{k}+{args.pca_compressors[0]}" for k in per_level]
            label = f"small, fpn pca-std{'/'.join(map(str, per_level))}, {outside}x step outside LD's region"
            settings[label] = {**DEFAULT_CODECS, "fpn": names[0], **dict(zip(levels, names))}
            outside_of[label] = outside
    # The default fpn codec is written as `distill precompute` writes it: its step grows per level.
    default_fpn = {profile_codec(DEFAULT_CODECS["fpn"], p) for p in ("small", "fast")}
    for name, codecs in settings.items():
        if codecs["fpn"] in default_fpn and not name.startswith("small, fpn") and not any("/" in key for key in codecs):
            fpn_specs = [dataclasses.replace(spec, codec=codecs["fpn"]) for spec in specs if spec.group == "fpn"]
            codecs.update({spec.name: spec.codec for spec in level_step_codecs(fpn_specs, ["fpn"])})
    sample = fit_sample(teacher, args.annotations, args.images, args.views, args.fit_views, canvas,
                        [spec.name for spec in specs]) if any(
        parse_codec(codec).needs_basis for codecs in settings.values() for codec in codecs.values()) else []

    regions = view_regions(batch["gt_boxes"], specs, canvas, strides) if args.fpn_outside else ()
    print(f"# teacher {args.teacher} (K={teacher.num_classes}, R={reg_max}, C={teacher_out.fpn_features[0].shape[1]}), "
          f"student {args.student}, {len(views)} views at canvas {canvas}, {points} points per view, {args.threads} thread(s)")
    print(f"# teacher forward: {1000 * forward_cpu:.1f} ms CPU per view; fp32 bytes per view: "
          + ", ".join(f"{g} {fp32_bytes[g]:,}" for g in GROUPS))
    from label_store.fidelity import group_summary, measure_fidelity

    store_report = group_summary(measure_fidelity(views, specs))
    print("# the store's own fidelity report of the small codecs (reference student = teacher + noise): " + "; ".join(
        f"{g} {row['loss']} {100 * row['loss_rel_error']:.3f}%"
        + "".join(f", {m} {100 * e:.3f}%" for m, e in row["method_loss_rel_error"].items())
        for g, row in store_report.items()))
    print("# fp32 losses: " + ", ".join(f"{k} {reference[k]:.5g}" for k in METHOD_KEYS))
    print("| setting | codecs (cls / box / fpn) | cls B/view (x) | box B/view (x) | fpn B/view (x) | all (x) | write CPU ms/view | write / forward | "
          + "read CPU ms/view | " + " | ".join(METHOD_KEYS) + " |")
    print("|" + "---|" * (9 + len(METHOD_KEYS)))
    rows, bounds = {}, {}
    for name, codecs in settings.items():
        decoded, stored, write_cpu, read_cpu, entropy = encode_decode(specs, views, codecs, sample, regions, outside_of.get(name, 0))
        losses = losses_of(decoded)
        errors = {k: abs(losses[k] - reference[k]) / reference[k] if reference[k] > 0 else 0.0 for k in METHOD_KEYS}
        total = sum(stored.values())
        rows[name] = (stored, errors, write_cpu)
        bounds[name] = entropy
        print(f"| {name} | {' / '.join(codecs[g] for g in GROUPS)} | "
              + " | ".join(f"{stored[g]:,.0f} ({fp32_bytes[g] / stored[g]:.1f})" for g in GROUPS)
              + f" | {total:,.0f} ({sum(fp32_bytes.values()) / total:.1f}) | {1000 * write_cpu:.1f} | {write_cpu / forward_cpu:.2f} | "
              + f"{1000 * read_cpu:.1f} | "
              + " | ".join(f"{100 * errors[k]:.3f}%" for k in METHOD_KEYS) + " |")
    print()
    print("# order-0 entropy of the stored codes (what an entropy coder that codes each code alone, without context, "
          "cannot go below), B/view (ratio to float32):")
    for name, entropy in bounds.items():
        print(f"#   {name}: " + ", ".join(
            f"{g} {entropy[g]:,.0f} ({fp32_bytes[g] / entropy[g]:.1f}x)" for g in GROUPS if entropy[g] > 0))
    print()
    # Projection to COCO shapes: bytes per stored element of each group times COCO's elements per view.
    coco_points, coco_k, coco_c = 22300, 80, 256
    box_channels = 4 * (reg_max + 1)
    channels = {"cls": teacher.num_classes, "box": box_channels, "fpn": teacher_out.fpn_features[0].shape[1]}
    coco_channels = {"cls": coco_k, "box": box_channels, "fpn": coco_c}
    print(f"# COCO projection: MB/view = {coco_points} points x sum_g (bytes per element_g x channels_g), "
          f"channels cls {coco_k}, box {box_channels}, fpn {coco_c}")
    for name, (stored, _, _) in rows.items():
        per_element = {g: stored[g] / (points * channels[g]) for g in GROUPS}
        mb = {g: coco_points * coco_channels[g] * per_element[g] / 1e6 for g in GROUPS}
        print(f"#   {name}: " + ", ".join(f"{g} {per_element[g]:.4f} B/el -> {mb[g]:.2f} MB" for g in GROUPS)
              + f"; total {sum(mb.values()):.2f} MB/view")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
