"""`distill detector`: train and evaluate GFL detectors (teachers and student baselines).

Exit codes: 0 ok; 1 failure; 2 bad usage or input (bad arguments, unusable annotation
file or checkpoint, a resume with another configuration); 3 done, but some images could
not be decoded (listed by id); 130 / 143 `detector train` stopped by Ctrl-C / SIGTERM
with last.pt written (re-run to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def progress_wanted(no_progress: bool) -> bool:
    """Whether a command shows its progress bar: not with ``--no-progress`` nor with TQDM_DISABLE set (not "0")."""
    return not no_progress and os.environ.get("TQDM_DISABLE", "") in ("", "0")
ARCH_NAMES = ("gfl_tiny", "gfl_r18", "gfl_r34", "gfl_r50", "gfl_r101")


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``detector train`` and ``detector eval`` to the `distill` command."""
    detector = subparsers.add_parser(
        "detector",
        help="train and evaluate GFL detectors (teachers and student baselines)",
        description="GFL dense detectors: train one on a COCO-format dataset, or evaluate a checkpoint.",
    )
    detector.set_defaults(func=None, _parser=detector)
    commands = detector.add_subparsers(dest="detector_command", metavar="SUBCOMMAND", title="subcommands")

    train = commands.add_parser(
        "train",
        help="train a detector; writes OUT/final.pt, OUT/last.pt and OUT/metrics.json",
        description=(
            "Train a GFL detector on a COCO-format dataset, views of one canvas (original and flipped). "
            "Re-running the same command with the same --out resumes from OUT/last.pt; Ctrl-C or SIGTERM ends the "
            "current step, writes OUT/last.pt and exits 130 / 143. Images that cannot be "
            "decoded are skipped and reported by id (exit 3). With --val-annotations/--val-images, COCO AP is "
            "measured at the end."
        ),
    )
    train.add_argument("--annotations", required=True, metavar="FILE", help="COCO annotation JSON of the training set")
    train.add_argument("--images", required=True, metavar="DIR", help="folder the training file names are relative to")
    train.add_argument("--arch", required=True, choices=ARCH_NAMES, help="architecture")
    train.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoints, metrics.json)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, metavar="N", help="training steps")
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the images, one view each (default: 12)")
    train.add_argument("--batch-size", type=int, default=8, metavar="B", help="views per step (default: 8)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 2e-3 for adamw, 0.01 for sgd)")
    train.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="adamw: warm-up + cosine (from scratch; default); sgd: warm-up + steps at 8/12, 11/12 (mmdet 1x)",
    )
    train.add_argument("--weight-decay", type=float, help="default 0.05 for adamw, 1e-4 for sgd")
    train.add_argument("--canvas", default="256", metavar="SIZE", help="canvas SIZE or HxW in pixels: views sized by mmdetection's keep-ratio rule, portrait ones on WxH (default: 256)")
    train.add_argument("--fpn-channels", type=int, metavar="C", help="FPN width (default per arch: tiny 32, r18 64, r34 128, r50/r101 256)")
    train.add_argument("--head-channels", type=int, metavar="C", help="head tower width (default: the FPN width)")
    train.add_argument("--num-convs", type=int, metavar="N", help="convs per head tower (default: 2 for tiny, 4 otherwise)")
    train.add_argument("--backbone-weights", metavar="FILE", help="ResNet state_dict file to start from (never downloaded)")
    train.add_argument("--val-annotations", metavar="FILE", help="COCO annotation JSON of the validation set")
    train.add_argument("--val-images", metavar="DIR", help="folder of the validation images")
    train.add_argument("--seed", type=int, default=0, help="initialisation and view-order seed (default: 0)")
    train.add_argument("--num-workers", type=int, default=2, metavar="N", help="data-loading processes (default: 2)")
    train.add_argument("--checkpoint-every", type=int, default=200, metavar="N", help="write last.pt every N steps (default: 200)")
    train.add_argument("--eval-every", type=int, default=0, metavar="N", help="val AP every N steps (default: 0, only at the end)")
    train.add_argument(
        "--scales", default="1.0", metavar="S[,S...]", help="view scales in (0, 1] relative to the canvas fit (default: 1.0)"
    )
    train.add_argument("--no-flip", action="store_true", help="do not add mirrored views")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    train.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    train.add_argument("--no-channels-last", action="store_true", help="keep the default (NCHW) memory format")
    train.add_argument("--threads", type=int, metavar="N", help="torch threads (default: one per core)")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar (also when TQDM_DISABLE=1 is set); the summary is printed at the end")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser(
        "eval",
        help="COCO AP of a checkpoint on a dataset",
        description=(
            "Evaluate a detector checkpoint on a COCO-format dataset at the checkpoint's canvas (one unflipped "
            "view per image, detections mapped back to image pixels) and print the AP table."
        ),
    )
    evaluate.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint written by `detector train`")
    evaluate.add_argument("--annotations", required=True, metavar="FILE", help="COCO annotation JSON")
    evaluate.add_argument("--images", required=True, metavar="DIR", help="folder the file names are relative to")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="B", help="views per forward pass (default: 8)")
    evaluate.add_argument("--num-workers", type=int, default=0, metavar="N", help="data-loading processes (default: 0)")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    evaluate.set_defaults(func=run_eval)


def _print_failures(failed: list) -> None:
    if failed:
        print(f"{len(failed)} image(s) could not be decoded and were skipped:", file=sys.stderr)
        for item in failed:
            if isinstance(item, dict):
                print(f"  image_id={item['image_id']} {item.get('path', '')}: {item.get('reason', '')}", file=sys.stderr)
            else:
                print(f"  image_id={item}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    from detcore.checkpoint import CheckpointError
    from detcore.coco import AnnotationError
    from detcore.evaluate import format_ap_table
    from detcore.models.backbones import BackboneWeightsError
    from detcore.train import TrainConfig, TrainConfigMismatchError, parse_canvas, train_detector

    try:
        canvas = parse_canvas(args.canvas)
        scales = tuple(float(s) for s in str(args.scales).split(",") if s.strip())
        config = TrainConfig(
            annotations=args.annotations,
            images=args.images,
            arch=args.arch,
            out_dir=args.out,
            canvas=canvas,
            iters=args.iters,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            fpn_channels=args.fpn_channels,
            head_channels=args.head_channels,
            num_convs=args.num_convs,
            backbone_weights=args.backbone_weights,
            scales=scales,
            flip=not args.no_flip,
            num_workers=args.num_workers,
            seed=args.seed,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            val_annotations=args.val_annotations,
            val_images=args.val_images,
            device=args.device,
            amp=not args.no_amp,
            channels_last=not args.no_channels_last,
            num_threads=args.threads,
        )
        config.validate()
        summary = train_detector(config, progress=progress_wanted(args.no_progress))
    except (ValueError, AnnotationError, CheckpointError, BackboneWeightsError, TrainConfigMismatchError) as error:
        print(f"detector train: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"trained {summary['arch']} for {summary['step']} steps ({summary['epochs']:.2f} epochs) in "
        f"{summary['train_seconds']:.0f} s, {summary['images_per_second']} img/s; wrote {args.out}/final.pt"
    )
    if summary["val"]:
        print(format_ap_table([(summary["arch"], summary["val"])]))
    _print_failures(summary["failed_images"])
    return EXIT_PARTIAL if summary["failed_images"] else EXIT_OK


def run_eval(args: argparse.Namespace) -> int:
    from detcore.checkpoint import CheckpointError
    from detcore.coco import AnnotationError
    from detcore.evaluate import format_ap_table
    from detcore.train import evaluate_detector

    try:
        metrics = evaluate_detector(
            args.checkpoint,
            args.annotations,
            args.images,
            args.batch_size,
            device=args.device,
            num_workers=args.num_workers,
        )
    except (ValueError, AnnotationError, CheckpointError) as error:
        print(f"detector eval: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_ap_table([(args.checkpoint, metrics)]))
    print(f"{metrics['num_images']} images evaluated")
    _print_failures(metrics["failed_image_ids"])
    return EXIT_PARTIAL if metrics["failed_image_ids"] else EXIT_OK
