"""`distill train`: train a student against teacher targets (a label store by default).

Exit codes: 0 ok; 1 failure; 2 bad usage or input (bad arguments or config file, a store
that does not fit the student, a teacher fingerprint mismatch, a resume with another
configuration, only the old token variable DISTILL_TOKEN set); 3 done, but some images
were skipped (changed on disk since precompute, or undecodable; listed by id); 130 / 143
stopped by Ctrl-C / SIGTERM with last.pt written (re-run to resume).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

DESCRIPTION = """\
Train a student detector with any combination of the LD, BCD, FGD and HGD distillation
losses, against targets from a label store (offline, the default: no teacher in this
process), the teacher endpoint (--source remote), the store with misses filled by the
endpoint (--source read-through), or, as a comparison baseline only, the teacher loaded in
this process (--source inprocess --teacher CKPT).

Each epoch samples one of the K stored views per image and renders it with exactly the
stored recipe; an image whose pixels changed since precompute is skipped and reported by
id (--strict-hash to stop instead). Re-running the same command resumes from OUT/last.pt.
Outputs: OUT/final.pt (a detcore checkpoint: `distill detector eval` loads it),
OUT/results.json (final COCO AP), OUT/metrics.jsonl, OUT/tb/ (TensorBoard), OUT/run_config.json.
Ctrl-C or SIGTERM ends the current step, writes OUT/last.pt and exits 130 / 143; re-run
the same command to resume.
"""

EPILOG = """\
losses (--losses, comma-separated): ld (= ld_main,ld_vlr,ld_kd, the paper's LD), ld_main,
  ld_vlr, ld_kd, ld_im, bcd, fgd, hgd, all (= ld,bcd,fgd,hgd), none (the student baseline).
  ld_im is the feature imitation that LD's released training configs add to LD (FPN
  features at the fine-grained region, weight 2; needs fpn targets in the store): use
  --losses ld,ld_im for everything those configs turn on. Weights default to the papers'
  released recipes; change them in a --config file or with --set, e.g.
  --set losses.fgd.alpha=2e-3 --set losses.ld.kd_weight=5 --set losses.ld.im_weight=1.

examples:
  distill train --store stores/t.zarr --annotations train.json --images train/ \\
      --student gfl_tiny --losses ld --out runs/ld --val-annotations val.json --val-images val/
  distill train --config runs/ld.yaml --ray-workers 2          # data-parallel with Ray Train
  distill train ... --source remote --endpoint http://teacher:8000   # token from $DISTILLERY_TOKEN
  distill train --store s3://bucket/t.zarr --storage-option endpoint_url=http://minio:9000 ...
"""


def register(subparsers) -> None:
    """Add ``train`` to the `distill` command."""
    from label_store.cli import storage_option

    parser = subparsers.add_parser(
        "train",
        help="train a student from the label store (LD, BCD, FGD, HGD; no teacher in the process)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--store", metavar="URL", help="label store path or URL (fsspec)")
    data.add_argument("--storage-option", type=storage_option, action="append", default=None, metavar="KEY=VALUE",
                      help="fsspec option for a remote store, e.g. endpoint_url=http://minio:9000 (repeatable); "
                           "credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    data.add_argument("--annotations", metavar="FILE", help="COCO annotation JSON of the training images")
    data.add_argument("--images", metavar="DIR", help="folder the training file names are relative to")
    data.add_argument("--val-annotations", metavar="FILE", help="COCO annotation JSON for evaluation (AP per --eval-every and at the end)")
    data.add_argument("--val-images", metavar="DIR", help="folder of the validation images")
    data.add_argument("--canvas", metavar="HxW", help="canvas the student expects, landscape views on HxW and portrait ones on WxH (default: the store's); required without a store")
    data.add_argument("--max-images", type=int, metavar="N", help="train on the first N images only")
    data.add_argument("--strict-hash", action="store_true", default=None,
                      help="stop on an image that changed since precompute (default: skip it and report its id)")
    data.add_argument("--photometric", action="store_true", default=None,
                      help="student-side brightness/contrast jitter (an approximation: recorded in run_config.json)")
    data.add_argument("--num-workers", type=int, metavar="N", help="DataLoader worker processes (default: 2)")

    model = parser.add_argument_group("student and losses")
    model.add_argument("--student", metavar="ARCH", help="student architecture: gfl_tiny (default), gfl_r18, gfl_r34, gfl_r50, gfl_r101")
    model.add_argument("--student-init", metavar="CKPT", help="initialise the student from a detcore checkpoint")
    model.add_argument("--backbone-weights", metavar="FILE",
                       help="ResNet state_dict (e.g. torchvision's ImageNet file; never downloaded) for a ResNet student; "
                            "stem and first stage frozen, BatchNorm statistics frozen, as mmdetection does")
    model.add_argument("--train-backbone-all", action="store_true", default=None,
                       help="with --backbone-weights: also train the stem, the first stage and BatchNorm")
    model.add_argument("--losses", metavar="LIST", help="distillation terms, e.g. ld, ld,fgd, bcd, hgd, ld_main,ld_kd, none (default: ld)")
    model.add_argument("--config", metavar="FILE", help="run config file (JSON or YAML); flags override it")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config field, e.g. losses.fgd.alpha=2e-3 (repeatable)")

    source = parser.add_argument_group("target source")
    source.add_argument("--source", choices=("store", "remote", "read-through", "inprocess"),
                        help="where teacher targets come from (default: store)")
    source.add_argument("--endpoint", metavar="URL", help="teacher endpoint base URL (remote, read-through)")
    source.add_argument("--token", help="bearer token for the endpoint (default: $DISTILLERY_TOKEN, the variable "
                                        "distill serve reads; prefer it: a command line is visible in ps)")
    source.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (in-process baseline only)")
    source.add_argument("--class-map", metavar="FILE",
                        help="in-process teacher: JSON of teacher class name -> dataset category name (as distill precompute)")
    source.add_argument("--allow-missing-classes", action="store_true", default=None,
                        help="in-process teacher: accept dataset categories it lacks, left out of class distillation")

    optim = parser.add_argument_group("schedule")
    length = optim.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the images, one view each (default: 12)")
    length.add_argument("--iters", type=int, metavar="N", help="optimizer steps (overrides epochs)")
    optim.add_argument("--batch-size", type=int, metavar="B", help="images per step, per worker: the global batch is B x --ray-workers (default: 8)")
    optim.add_argument("--lr", type=float, help="peak learning rate, never rescaled by the number of workers; for a k times larger global "
                       "batch, scale it by k (sgd) or sqrt(k) (adamw) yourself (default: 2e-3 adamw, 0.01 sgd)")
    optim.add_argument("--optimizer", choices=("adamw", "sgd"), help="optimizer and schedule (default: adamw, cosine)")
    optim.add_argument("--seed", type=int, help="initialisation and view-sampling seed (default: 0)")
    optim.add_argument("--eval-every", type=int, metavar="EPOCHS", help="COCO AP every N epochs (default: 0, only at the end)")
    optim.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="write last.pt every N steps (default: 200)")
    optim.add_argument("--log-every", type=int, metavar="STEPS", help="metrics line every N steps (default: 10)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="output folder (default: runs/student)")
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads")
    run.add_argument("--ray-workers", type=int, metavar="N", help="data-parallel Ray Train workers (0: train in this process); the global batch is --batch-size x N "
                     "and --lr is not rescaled (see docs/operations.md, 'Training on many workers')")
    run.add_argument("--address", help="Ray cluster address for --ray-workers (default: a local cluster)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar, log lines instead (also when TQDM_DISABLE is set)")
    parser.set_defaults(func=run_train, _parser=parser)


def _overrides(args: argparse.Namespace) -> dict:
    from student_trainer.config import CLI_KEYS

    return {key: getattr(args, key) for key in CLI_KEYS if getattr(args, key, None) is not None}


def run_train(args: argparse.Namespace) -> int:
    from student_trainer.config import ConfigError, build_run_config

    try:
        config = build_run_config(args.config, _overrides(args), args.set)
    except ConfigError as error:
        print(f"distill train: {error}", file=sys.stderr)
        return EXIT_USAGE
    from detcore.cli_detector import progress_wanted

    return run_config(config, progress=progress_wanted(args.no_progress))


def run_config(config, *, progress: bool = True) -> int:
    """Run a resolved config (local or Ray Train) and map errors to exit codes."""
    from detcore.checkpoint import CheckpointError
    from detcore.classes import ClassMappingError
    from detcore.coco import AnnotationError
    from detcore.models.backbones import BackboneWeightsError
    from label_store.errors import FingerprintMismatchError, SchemaVersionError, StoreNotFoundError
    from student_trainer.data import ImageChangedError, StoreFitError
    from student_trainer.distill import TargetShapeError
    from student_trainer.sources import RemoteSourceError, TeacherMismatchError, TokenVariableError, endpoint_token
    from student_trainer.train import ResumeMismatchError

    usage_errors = (
        StoreFitError, FingerprintMismatchError, TeacherMismatchError, ResumeMismatchError, StoreNotFoundError,
        SchemaVersionError, AnnotationError, CheckpointError, TargetShapeError, ImageChangedError, TokenVariableError,
        BackboneWeightsError, ClassMappingError,
    )
    try:
        if config.source.kind in ("remote", "read-through"):
            endpoint_token(config.source.token)  # refuse the old variable before any work
        if config.num_ray_workers > 0:
            from student_trainer.ray_train import train_with_ray

            summary = train_with_ray(config, progress=progress)
        else:
            from student_trainer.train import train_student

            summary = train_student(config, progress=progress)
    except usage_errors as error:
        print(f"distill train: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteSourceError as error:
        print(f"distill train: {error}", file=sys.stderr)
        return EXIT_FAILURE
    skipped = summary.get("skipped_images") or {}
    if any(skipped.get(k) for k in ("changed", "undecodable")):
        return EXIT_PARTIAL
    return EXIT_OK
