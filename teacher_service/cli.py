"""`distill precompute` (and, from `teacher_service.serve_cli`, `distill serve`).

Heavy imports (torch, ray, zarr) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

PRECOMPUTE_DESCRIPTION = """\
Run a teacher once over every view of a COCO-format dataset on a Ray cluster and write
its outputs (class logits, box-edge distributions, FPN and backbone features) into a
compressed label store.

Views: each image is resized by mmdetection's keep-ratio rule for --canvas HxW (scale =
min(long canvas side / long image side, short / short), upscaling included); landscape
images go on the HxW canvas, portrait ones on WxH. One view per --scales factor of that
size (or --views-per-image N scales spread over --scale-range LO:HI), plus a mirrored twin
unless --no-flip. Re-running the same command resumes: committed
views are skipped. A store made by another teacher, canvas or target set is refused.
A corrupt or missing image does not stop the job: its views go to the store's failures
table with the reason, and the exit code is 3.

With no arguments, runs on the built-in default (synthetic dataset and default teacher,
made by the project's own commands if missing).

The summary's "bound by" row says which side limited the job: the teacher, or decoding
and writing on the CPU. With a GPU teacher it is usually the CPU side (writing, i.e. the
codecs' compression): give the cluster more CPUs (--address, CPU-only Ray nodes) or use
cheaper codecs: --codec-profile fast (the default with a GPU teacher), or e.g.
--codec fpn=int6-view-dhw+zstd3 --codec backbone=int6-view+zstd3.
"""

PRECOMPUTE_EPILOG = """\
examples:
  distill precompute --annotations data/synth/annotations/train.json --images data/synth/train \\
      --teacher runs/teacher/final.pt --store stores/t.zarr
  distill precompute ... --store s3://bucket/t.zarr --storage-option anon=false --codec fpn=int8-channel
  distill precompute ... --address 10.0.0.1:6379 --num-actors 8      # join a running cluster

Ctrl-C (SIGINT) or SIGTERM stops the job within seconds: committed parts stay, parts in
flight stay invisible, the local Ray cluster is shut down, the summary counts what was
committed; re-run the same command to resume.

exit codes: 0 all views stored, 2 bad input (missing file, teacher/store mismatch),
            3 finished with some views failed (see the store's failures table), 1 other failure,
            130 interrupted (Ctrl-C), 143 terminated (SIGTERM)
"""


def _canvas(text: str) -> tuple[int, int]:
    parts = text.lower().replace(" ", "").split("x")
    try:
        if len(parts) == 1:
            h = w = int(parts[0])
        elif len(parts) == 2:
            h, w = int(parts[0]), int(parts[1])
        else:
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--canvas expects HxW (e.g. 256x256) or one side. Got {text!r}.") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"--canvas expects positive sides. Got {text!r}.")
    return (h, w)


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales expects comma-separated numbers in (0, 1]. Got {text!r}.") from None
    if not values or any(not (0 < v <= 1) for v in values):
        raise argparse.ArgumentTypeError(f"--scales expects comma-separated numbers in (0, 1]. Got {text!r}.")
    return values


def _scale_range(text: str) -> tuple[float, float]:
    from detcore.views import parse_scale_range

    try:
        return parse_scale_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _targets(text: str) -> tuple[str, ...]:
    from label_store.schema import TARGET_GROUPS

    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if not groups or unknown:
        raise argparse.ArgumentTypeError(f"--targets expects a comma-separated subset of {','.join(TARGET_GROUPS)}. Got {text!r}.")
    return groups


def _key_value(option: str):
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{option} expects KEY=VALUE. Got {text!r}.")
        return (key.strip(), value.strip())

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a positive integer. Got {text!r}.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer. Got {text!r}.")
    return value


def add_precompute_parser(subparsers) -> argparse.ArgumentParser:
    from label_store.cli import storage_option

    parser = subparsers.add_parser(
        "precompute",
        help="run a teacher over every view of a dataset on Ray and fill a label store",
        description=PRECOMPUTE_DESCRIPTION,
        epilog=PRECOMPUTE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("inputs (all four, or none for the built-in default)")
    data.add_argument("--annotations", metavar="FILE", help="COCO annotation JSON of the images to precompute")
    data.add_argument("--images", metavar="DIR", help="folder that the annotations' file_name entries are relative to")
    data.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (distill detector train writes one)")
    data.add_argument("--store", metavar="PATH_OR_URL", help="label store path or fsspec URL; created, or resumed if it exists")
    views = parser.add_argument_group("views and targets (fixed per store)")
    views.add_argument("--canvas", type=_canvas, metavar="HxW",
                       help="store canvas: landscape views on HxW, portrait views on WxH, sized by mmdetection's "
                            "keep-ratio rule (default: the teacher checkpoint's canvas)")
    views.add_argument("--scales", type=_scales, default=None, metavar="S[,S...]",
                       help="view scales relative to mmdetection's size for the canvas, each in (0, 1] (default: 1.0; "
                            "the built-in default uses its preset's scales)")
    views.add_argument("--scale-range", type=_scale_range, default=None, metavar="LO:HI",
                       help="instead of --scales: --views-per-image scales per image spread over LO:HI (0 < LO <= HI <= 1), "
                            "as mmdetection's multi-scale training draws them; recorded with every view")
    views.add_argument("--views-per-image", type=int, default=None, metavar="N",
                       help="views (before flips) per image with --scale-range")
    views.add_argument("--no-flip", action="store_true", help="do not add a mirrored twin of every view")
    views.add_argument("--targets", type=_targets, default=None, metavar="GROUPS",
                       help="target groups to store, from cls,box,edges,fpn,backbone (edges: the decoded box "
                            "edges, 4 channels per point, which BCD reads when there is no box) (default: "
                            "cls,box,fpn; the built-in default stores cls,box,fpn,backbone, as `distill "
                            "quickstart` does)")
    views.add_argument("--codec", type=_key_value("--codec"), action="append", default=[], metavar="NAME=CODEC",
                       help="codec override for a group or target, e.g. fpn=int8-channel or cls/p3=fp16 (repeatable); "
                            "a group named here gets the codec on every level (fpn's default, pca-std3 on the finest "
                            "level, doubles k on each coarser one; cls's default is pca-std24-dct, or int5-view-dchw "
                            "with --cls-region ld)")
    views.add_argument("--codec-profile", choices=("small", "fast"), default=None,
                       help="default codecs: small (zstd 15, fewest bytes) or fast (the same quantizers with a fast "
                            "zstd level, for writers that keep up with a GPU teacher); --codec overrides win "
                            "(default: fast when the teacher runs on a GPU, else small)")
    views.add_argument("--basis-views", type=_positive_int, default=16, metavar="N",
                       help="a new store's transform codecs (pca-std<k>, the fpn and dense cls defaults) fit their per-level "
                            "channel basis on the first N planned views, through the teacher before the job; a "
                            "resumed store keeps its basis (default: 16)")
    views.add_argument("--box-region", choices=("dense", "ld"), default="dense",
                       help="dense: box distributions at every point (default; every method reads them); ld: only at "
                            "the points LD reads (ATSS candidates and the VLR of --region-topk / --region-vlr-alpha, from "
                            "each view's GT), about a quarter of the box bytes at canvas 256; BCD reads boxes at every "
                            "point, so add edges to --targets to train BCD from such a store")
    views.add_argument("--cls-region", choices=("dense", "ld"), default="dense",
                       help="dense: class logits at every point (default); ld: only in LD's region, the one "
                            "--box-region ld uses (same --region-* settings; with or without --box-region ld), which "
                            "holds the ATSS positives where LD's KD term reads them: about half the cls bytes at canvas "
                            "256; BCD reads class logits at every point and cannot train from such a store")
    views.add_argument("--region-topk", type=_positive_int, default=9, metavar="K",
                       help="ATSS topk the --box-region / --cls-region ld store serves (default: 9, LD's and GFL's)")
    views.add_argument("--region-vlr-alpha", type=float, default=0.25, metavar="A",
                       help="smallest VLR alpha the --box-region / --cls-region ld store serves; a run may use a larger one "
                            "(default: 0.25)")
    views.add_argument("--region-vlr-diou", choices=("standard", "released"), default="standard",
                       help="VLR DIoU flavour the --box-region / --cls-region ld store serves (default: standard)")
    classes = parser.add_argument_group("classes (the store holds the dataset's categories, in its order)")
    classes.add_argument("--class-map", metavar="FILE",
                         help="JSON object of teacher class name -> dataset category name, for names that differ beyond "
                              "case and '_' vs space; teacher classes the dataset lacks are dropped")
    classes.add_argument("--allow-missing-classes", action="store_true",
                         help="accept dataset categories the teacher has no class for: recorded in the store and left out "
                              "of class distillation (without it they are an error)")
    job = parser.add_argument_group("execution")
    job.add_argument("--batch-size", type=_positive_int, default=8, help="views per teacher forward pass (default: 8)")
    job.add_argument("--num-actors", type=_positive_int, default=1,
                     help="teacher actors; one GPU each where the cluster has GPUs (default: 1)")
    job.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per teacher actor (default: 1)")
    job.add_argument("--cpus-per-task", type=float, default=1.0,
                     help="CPUs Ray reserves per decode/render and write task (default: 1; 0.5 packs two per core)")
    job.add_argument("--torch-threads", type=_positive_int, default=None,
                     help="intra-op threads of each CPU teacher actor (default: --cpus-per-actor)")
    job.add_argument("--views-per-part", type=_positive_int, default=32,
                     help="views decoded, forwarded (in --batch-size batches), written and committed together "
                          "by one task of each stage; rounded up to whole batches (default: 32)")
    job.add_argument("--device", default="auto", help="teacher device: auto, cpu, cuda (default: auto)")
    job.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                     help="autocast on GPU: auto = bf16 where supported, else fp16; fp32 on CPU (default: auto)")
    job.add_argument("--quantize-on-device", default="auto", choices=("auto", "on", "off"),
                     help="quantize int-coded targets in the teacher stage, so uint8 codes instead of float32 "
                          "cross to the host, the object store and the writers (same stored bytes); auto = with a "
                          "GPU teacher (default: auto)")
    job.add_argument("--max-views", type=int, default=None, help="process at most this many remaining views (resume later)")
    job.add_argument("--address", default=None,
                     help="join this Ray cluster (host:port of `ray start --head`); default: start a local one")
    job.add_argument("--num-cpus", type=_positive_int, default=None,
                     help="CPUs of the local Ray cluster started without --address (default: all; raised to fit "
                          "the teacher actors plus a decode task, and a write task beside it when the teacher is pinned)")
    job.add_argument("--no-pin-cpus", action="store_true",
                     help="do not keep a CPU teacher on cores of its own (default on a local cluster: teacher actors "
                          "on the first cores, decoding and writing on the rest)")
    job.add_argument("--storage-option", type=storage_option, action="append", default=[], metavar="KEY=VALUE",
                     help="fsspec option for a remote store, e.g. endpoint_url=http://minio:9000 (repeatable); "
                          "credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    job.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON to FILE")
    job.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_precompute_command, _parser=parser)
    return parser


def register(subparsers) -> None:
    """Add `precompute` (and `serve`, when its module is present) to the `distill` parser."""
    add_precompute_parser(subparsers)
    try:
        from teacher_service.serve_cli import register_serve
    except ModuleNotFoundError as error:
        if error.name != "teacher_service.serve_cli":
            raise
    else:
        register_serve(subparsers)


@dataclass(frozen=True, slots=True)
class _Inputs:
    """What `distill precompute` runs on, after the built-in default filled what was not given."""

    annotations: str
    """COCO annotation file."""
    images: str
    """Image folder."""
    teacher: str
    """Teacher checkpoint."""
    store: str
    """Store path or URL."""
    scales: tuple[float, ...]
    """View scales."""
    targets: tuple[str, ...]
    """Target groups."""


def _resolve_inputs(args: argparse.Namespace) -> _Inputs | str:
    """Explicit inputs, or the built-in default's; an error message if only some were given."""
    from label_store.schema import DEFAULT_STORED_GROUPS, LOSS_TARGET_GROUPS, loss_target_groups

    given = {name: getattr(args, name) for name in ("annotations", "images", "teacher")}
    if all(given.values()):
        if not args.store:
            return "distill precompute expects --store with --annotations, --images and --teacher. Got no --store."
        return _Inputs(
            args.annotations, args.images, args.teacher, args.store,
            args.scales or (1.0,), args.targets or DEFAULT_STORED_GROUPS,
        )
    if any(given.values()):
        missing = ", ".join(f"--{name}" for name, value in given.items() if not value)
        return (
            "distill precompute expects --annotations, --images and --teacher together (or none of them, for the "
            f"built-in default). Missing: {missing}."
        )
    # The built-in default: the same store, views and targets (those of every term) as `distill
    # quickstart` (quick preset), so either command resumes the other's work instead of meeting a
    # target-set mismatch.
    from detcore import defaults

    preset = defaults.PRESETS["quick"]
    train_annotations, train_images, _, _ = defaults.ensure_default_dataset(preset)
    teacher = defaults.ensure_default_teacher(preset)
    store = args.store or str(defaults.default_paths(preset)["store"])
    return _Inputs(
        str(train_annotations), str(train_images), str(teacher), store,
        args.scales or tuple(preset.scales), args.targets or loss_target_groups(LOSS_TARGET_GROUPS),
    )


def _quiet_ray_data_console() -> None:
    """Ray Data logs every execution to the console at INFO; the progress bar and summary say it
    better. Its log file under the Ray cluster's temporary folder keeps everything."""
    import ray.data  # noqa: F401  (importing configures the "ray.data" logger; adjust it after)

    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:  # keep the file handler: the full log
            handler.setLevel(logging.WARNING)


def run_precompute_command(args: argparse.Namespace) -> int:
    """`distill precompute`: returns 0, 2 or 3 (module docstring of `distillery.cli`)."""
    from detcore.cli_detector import progress_wanted
    from teacher_service.precompute import PrecomputeConfig, PrecomputeInputError, run_precompute

    inputs = _resolve_inputs(args)
    if isinstance(inputs, str):
        print(f"error: {inputs}", file=sys.stderr)
        return EXIT_USAGE
    from detcore.classes import ClassMappingError, read_class_map

    try:
        class_map = read_class_map(args.class_map) if args.class_map else {}
    except ClassMappingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    config = PrecomputeConfig(
        annotations=inputs.annotations,
        images_dir=inputs.images,
        teacher=inputs.teacher,
        store=inputs.store,
        canvas_hw=args.canvas,
        scales=inputs.scales,
        scale_range=args.scale_range,
        views_per_image=args.views_per_image,
        flip=not args.no_flip,
        target_groups=inputs.targets,
        codecs=tuple(args.codec),
        codec_profile=args.codec_profile or "auto",
        basis_views=args.basis_views,
        box_region=args.box_region,
        cls_region=args.cls_region,
        region_topk=args.region_topk,
        region_vlr_alpha=args.region_vlr_alpha,
        region_vlr_diou=args.region_vlr_diou,
        class_map=tuple(class_map.items()),
        allow_missing_classes=args.allow_missing_classes,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        cpus_per_task=args.cpus_per_task,
        torch_threads=args.torch_threads,
        device=args.device,
        precision=args.precision,
        quantize_on_device=args.quantize_on_device,
        views_per_part=args.views_per_part,
        storage_options=tuple(args.storage_option),
        max_views=args.max_views,
        ray_address=args.address,
        num_cpus=args.num_cpus,
        pin_cpus=not args.no_pin_cpus,
        show_progress=progress_wanted(args.no_progress),
    )
    from detcore.checkpoint import CheckpointError
    from label_store.errors import StoreMismatchError

    if not getattr(args, "verbose", False):
        _quiet_ray_data_console()

    try:
        summary = run_precompute(config)
    except (PrecomputeInputError, StoreMismatchError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.format())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if summary.interrupted_by:
        import signal

        from detcore.interrupt import Interrupted

        raise Interrupted(
            signal.Signals[summary.interrupted_by],
            f"{summary.views_stored} view(s) committed by this run stay in {summary.store}, "
            f"{summary.views_left} left; re-run the same command to resume",
        )
    if summary.views_failed:
        print(
            f"{summary.views_failed} view(s) failed; they are listed with their reasons in the failures table of "
            f"{summary.store} (`distill store inspect {summary.store}`). Fix or remove the images and re-run "
            f"the same command to retry them.",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK
