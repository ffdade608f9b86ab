"""`distill teacher`: bring a trained detector from another framework as a teacher.

Exit codes: 0 ok; 2 bad usage or input (a missing flag, an unreadable or foreign file,
missing or unknown keys, class names of another count than the classifier's outputs).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_USAGE = 0, 2

IMPORT_DESCRIPTION = """\
Convert a trained detector into a native, self-describing distillery teacher checkpoint
(format version 2: architecture, classes, preprocessing, point convention, the source
format and the source file's sha256). The result loads wherever a teacher is expected
(distill precompute --teacher OUT.pt, distill serve, --source inprocess).

formats:
  mmdet-gfl              an mmdetection 2.x / 3.x GFL checkpoint ({'meta', 'state_dict'}),
                         ResNet-18..101 + FPN + GFL head; depth, widths, head convs, reg_max and
                         class count are read from the tensor shapes. Class names come from the
                         file (meta['CLASSES'] or meta['dataset_meta']['classes']) unless
                         --class-names is given.
  torchvision-fcos       the state_dict of torchvision's fcos_resnet50_fpn (--class-names required)
  torchvision-retinanet  the state_dict of retinanet_resnet50_fpn or _v2 (--class-names required)

Inputs are the views detcore.views.render produces (RGB, ImageNet mean/std, zero
padding after normalisation), which is what mmdetection's and torchvision's COCO models
were trained on; mmdetection's data preprocessor and torchvision's transform are not used.
"""

IMPORT_EPILOG = """\
example:
  distill teacher import --format mmdet-gfl --checkpoint gfl_r101_fpn_mstrain_2x_coco.pth --out teachers/gfl_r101.pt
  distill precompute --teacher teachers/gfl_r101.pt --annotations ... --images ... --store stores/gfl.zarr
"""


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``teacher import`` to the `distill` command."""
    teacher = subparsers.add_parser(
        "teacher",
        help="bring your own teacher: import mmdetection GFL or torchvision FCOS / RetinaNet checkpoints",
        description="Teachers from other frameworks, converted once into native distillery checkpoints.",
    )
    teacher.set_defaults(func=None, _parser=teacher)
    commands = teacher.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND", title="subcommands")
    imp = commands.add_parser(
        "import",
        help="convert an mmdetection / torchvision checkpoint into a distillery teacher",
        description=IMPORT_DESCRIPTION,
        epilog=IMPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("--format", required=True, choices=("mmdet-gfl", "torchvision-fcos", "torchvision-retinanet"),
                     help="the source's framework and detector")
    imp.add_argument("--checkpoint", required=True, metavar="IN", help="the source file (.pth)")
    imp.add_argument("--out", required=True, metavar="OUT.pt", help="the distillery checkpoint to write (atomically)")
    imp.add_argument("--class-names", metavar="FILE",
                     help="one class name per line, in the classifier's channel order (required for torchvision; "
                          "overrides the names stored in an mmdetection file)")
    imp.add_argument("--canvas", default="800x1333", metavar="HxW",
                     help="canvas recorded as the teacher's serving size (default: 800x1333, the COCO test scale)")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="read a source that holds objects other than tensors (runs code from the file: trusted files only)")
    imp.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from detcore.importers import TeacherImportError, import_teacher
    from detcore.train import parse_canvas

    try:
        canvas_hw = parse_canvas(args.canvas)
    except ValueError as error:
        print(f"error: --canvas: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = import_teacher(
            args.format,
            args.checkpoint,
            args.out,
            class_names=args.class_names,
            canvas_hw=canvas_hw,
            allow_pickle=args.allow_pickle,
        )
    except TeacherImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote {summary['out']}: {summary['family']}, {summary['classes']} classes, strides {summary['strides']}, "
        f"reg_max {summary['reg_max']}, source sha256 {summary['source_sha256'][:12]}..."
    )
    return EXIT_OK
