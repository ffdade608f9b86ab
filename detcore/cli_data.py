"""`distill data`: make the synthetic benchmark, check a COCO-format dataset.

Exit codes: 0 ok; 2 unusable input (bad arguments, unusable annotation file); 3 done,
but some images could not be decoded (listed in the report).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_USAGE, EXIT_PARTIAL = 0, 2, 3


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``data synth`` and ``data check`` to the `distill` command."""
    data = subparsers.add_parser(
        "data",
        help="make the synthetic benchmark dataset; check a COCO-format dataset",
        description="Datasets in COCO format: the built-in synthetic benchmark, and a check of any dataset.",
    )
    data.set_defaults(func=None, _parser=data)
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", title="subcommands")

    synth = commands.add_parser(
        "synth",
        help="write the synthetic benchmark (COCO format, byte-identical per arguments)",
        description=(
            "Write the built-in synthetic detection benchmark: DIR/train/*.png, DIR/val/*.png, "
            "DIR/annotations/{train,val}.json. 12 classes of rotated, textured shapes with occlusion, "
            "look-alike distractors and noisy backgrounds; the same arguments give byte-identical files."
        ),
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    synth.add_argument("--num-train", type=int, default=5000, metavar="N", help="training images (default: 5000)")
    synth.add_argument("--num-val", type=int, default=500, metavar="M", help="validation images (default: 500)")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    synth.add_argument(
        "--variant", default="standard", choices=("standard", "easy"),
        help="'standard': the benchmark (default); 'easy': 4 distinct classes, large objects, little clutter "
        "(the quickstart's data)",
    )
    synth.add_argument("--workers", type=int, default=1, help="processes; the output does not depend on it (default: 1)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar (also when TQDM_DISABLE=1 is set)")
    synth.set_defaults(func=run_synth)

    check = commands.add_parser(
        "check",
        help="decode every image of a COCO dataset; report bad images and annotation repairs",
        description=(
            "Load a COCO annotation file (reporting every repair made to it), then decode every image and "
            "report those that cannot be used (id, path, reason). Exit 0 if clean, 3 if some images are "
            "bad, 2 if the annotation file is unusable."
        ),
    )
    check.add_argument("--annotations", required=True, metavar="FILE", help="COCO annotation JSON")
    check.add_argument("--images", required=True, metavar="DIR", help="folder the file names are relative to")
    check.add_argument(
        "--strict",
        action="store_true",
        help="treat repairable annotation problems (degenerate or out-of-image boxes) as errors (exit 2)",
    )
    check.add_argument("--no-progress", action="store_true", help="no progress bar (also when TQDM_DISABLE=1 is set)")
    check.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    from detcore.cli_detector import progress_wanted
    from detcore.synth import generate

    if args.num_train < 0 or args.num_val < 0 or args.workers < 1:
        print("data synth expects --num-train >= 0, --num-val >= 0 and --workers >= 1.", file=sys.stderr)
        return EXIT_USAGE
    summary = generate(
        args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed, workers=args.workers,
        progress=progress_wanted(args.no_progress), variant=args.variant,
    )
    print(
        f"wrote {summary['num_train_images']} train images ({summary['num_train_objects']} objects) and "
        f"{summary['num_val_images']} val images ({summary['num_val_objects']} objects), "
        f"{summary['num_classes']} classes ({summary['variant']} variant), to {summary['out_dir']} in {summary['seconds']:.1f} s "
        f"({summary['ms_per_image']:.1f} ms per image)"
    )
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from detcore.cli_detector import progress_wanted
    from detcore.coco import AnnotationError, CocoDataset
    from detcore.images import ImageDecodeError

    try:
        dataset = CocoDataset(args.annotations, args.images, repair=not args.strict)
    except AnnotationError as error:
        print(f"unusable annotation file: {error}", file=sys.stderr)
        return EXIT_USAGE

    bad: list[ImageDecodeError] = []
    for image_id in tqdm(dataset.image_ids, desc="decode", unit="img", disable=not progress_wanted(args.no_progress)):
        try:
            dataset.load(image_id)
        except ImageDecodeError as error:
            bad.append(error)

    num_objects = sum(len(dataset.targets(i).gt_boxes) for i in dataset.image_ids)
    num_crowd = sum(len(dataset.targets(i).ignore_boxes) for i in dataset.image_ids)
    num_negative = sum(len(dataset.targets(i).gt_boxes) == 0 for i in dataset.image_ids)
    print(f"annotations: {args.annotations}")
    print(
        f"  {len(dataset)} images ({num_negative} without objects), {num_objects} objects, "
        f"{num_crowd} crowd regions, {len(dataset.classes)} classes"
    )
    print(f"annotation repairs: {len(dataset.repairs)}")
    for line in dataset.repairs:
        print(f"  {line}")
    print(f"bad images: {len(bad)} of {len(dataset)}")
    for error in bad:
        print(f"  image_id={error.image_id}\t{error.path}\t{error.reason}")
    return EXIT_PARTIAL if bad else EXIT_OK
