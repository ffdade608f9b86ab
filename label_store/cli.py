"""``distill store ...``: inspect, verify and clean a label store.

Only argparse is imported at module level; the store code loads inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--storage-options expects a JSON object. Got {text!r}: {error}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options expects a JSON object. Got {text!r}.")
    return value


def storage_option(text: str) -> tuple[str, object]:
    """argparse type of ``--storage-option KEY=VALUE`` (`distill precompute`, `distill train`).

    JSON literals become their values (``anon=false`` -> False, ``max_concurrency=4`` -> 4);
    anything else stays a string. Credentials belong in the environment (``AWS_ACCESS_KEY_ID``
    ...), not here: a command line is visible in ``ps``.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"--storage-option expects KEY=VALUE. Got {text!r}.")
    try:
        return (key.strip(), json.loads(value.strip()))
    except json.JSONDecodeError:
        return (key.strip(), value.strip())


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_inspect(info: dict) -> None:
    teacher = info["teacher"]
    print(f"store            {info['url']}")
    print(f"schema version   {info['schema_version']} (created {info['created_at']})")
    print(
        f"teacher          {teacher['architecture']}  sha256 {teacher['checkpoint_sha256'][:12]}...  "
        f"{len(teacher['classes'])} classes  canvas {tuple(teacher['canvas_hw'])}  strides {tuple(teacher['strides'])}  reg_max {teacher['reg_max']}"
    )
    mapping = teacher.get("class_mapping")
    if mapping is not None:
        print(
            f"classes          {len(mapping['dataset_classes'])} dataset categories from the teacher's {len(mapping['teacher_classes'])} classes "
            f"(by name; renames {mapping.get('class_map') or 'none'})"
        )
        renamed = [
            f"{mapping['teacher_classes'][i]} -> {name}"
            for name, i in zip(mapping["dataset_classes"], mapping["teacher_index"])
            if i >= 0 and mapping["teacher_classes"][i] != name
        ]
        for label, names in (
            ("matched as", renamed),
            ("dropped", mapping["dropped_teacher_classes"]),
            ("missing", [f"{n} (no class distillation)" for n in mapping["missing_dataset_classes"]]),
        ):
            if names:
                print(f"  {label:11s} {', '.join(names)}")
    print(
        f"views            {info['views']} in {info['images']} images, {info['parts']} parts "
        f"({info['duplicate_views']} duplicate copies ignored, {info['uncommitted_parts']} uncommitted parts)"
    )
    origins = info["views_by_origin"]
    print(f"origin           {origins.get('precompute', 0)} views precomputed, {origins.get('endpoint', 0)} fetched from the endpoint (read-through)")
    print(f"failures         {len(info['failures'])}")
    for canvas in info.get("canvases", []):
        share = canvas["padding_share"]
        print(
            f"canvas {canvas['canvas_hw'][0]}x{canvas['canvas_hw'][1]:<6d} {canvas['views']} views, {_human_bytes(canvas['target_bytes'])} stored, "
            f"{_human_bytes(canvas['bytes_per_view'])} per view, padding {'%.1f%%' % (100 * share) if share is not None else 'n/a'} of its bytes"
        )
    if info.get("padding_share") is not None:
        print(f"padding          {100 * info['padding_share']:.1f}% of the stored target bytes encode padding")
    region = info.get("region")
    if region is not None:
        from label_store.schema import StoreRegion

        print(f"region           {StoreRegion.from_dict(region).describe()}; elsewhere not stored")
    ratio = info["ratio_vs_fp32"]
    print(
        f"size on disk     {_human_bytes(info['bytes_on_disk'])}; {_human_bytes(info['bytes_per_view'])} per view "
        f"vs {_human_bytes(info['fp32_bytes_per_view'])} fp32 ({'%.1fx' % ratio if ratio else 'n/a'})"
    )
    fidelity = info["fidelity"]["targets"]
    print()
    print(f"{'target':14s} {'shape':>16s} {'codec':36s} {'bytes/view':>11s} {'vs fp32':>8s} {'max|err|':>9s} {'loss err':>9s} {'grad err':>9s}")
    for target in info["targets"]:
        fid = fidelity.get(target["name"])
        ratio = target["ratio_vs_fp32"]
        print(
            f"{target['name']:14s} {str(tuple(target['shape'])):>16s} {target['codec']:36s} {target['stored_bytes_per_view']:11.0f} "
            f"{('%.1fx' % ratio) if ratio else 'n/a':>8s} "
            + (f"{fid['max_abs_error']:9.4f} {100 * fid['loss_rel_error']:8.3f}% {100 * fid['grad_rel_error']:8.2f}%" if fid else f"{'-':>9s} {'-':>9s} {'-':>9s}")
        )
    groups = info["fidelity"]["groups"]
    print()
    print(f"{'group':10s} {'bytes/view':>11s} {'vs fp32':>8s} {'stored':>7s} {'loss':>20s} {'loss err':>9s} {'worst level':>12s}  method losses")
    for group in info["groups"]:
        fid = groups.get(group["group"])
        ratio = group["ratio_vs_fp32"]
        stored = group.get("region_share", 1.0)
        print(
            f"{group['group']:10s} {group['stored_bytes_per_view']:11.0f} {('%.1fx' % ratio) if ratio else 'n/a':>8s} "
            f"{100 * stored:6.1f}% "
            + (f"{fid['loss']:>20s} {100 * fid['loss_rel_error']:8.3f}% {100 * fid['worst_level_loss_rel_error']:11.3f}%" if fid else "")
            + (
                "  " + ", ".join(f"{name} {100 * error:.3f}%" for name, error in fid.get("method_loss_rel_error", {}).items())
                if fid else ""
            )
        )
    for failure in info["failures"][:20]:
        print(f"failed image_id={failure['image_id']} view_id={failure['view_id']}: {failure['reason']}")
    if len(info["failures"]) > 20:
        print(f"... and {len(info['failures']) - 20} more failures (use --json for all)")


def _run_inspect(args: argparse.Namespace) -> int:
    from label_store.errors import StoreFormatError, StoreNotFoundError
    from label_store.maintenance import inspect_store

    try:
        info = inspect_store(args.path, storage_options=_storage_options(args.storage_options))
    except (StoreNotFoundError, StoreFormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_inspect(info)
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from label_store.errors import StoreFormatError, StoreNotFoundError
    from label_store.maintenance import verify_store

    bar = tqdm(total=0, unit="view", desc="verify", disable=args.quiet or None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = verify_store(args.path, storage_options=_storage_options(args.storage_options), on_progress=progress)
    except (StoreNotFoundError, StoreFormatError, ValueError) as error:
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    bar.close()
    for bad in report.bad_views:
        print(f"BAD image_id={bad['image_id']} view_id={bad['view_id']} part={bad['part']}: {bad['reason']}")
    if report.ok:
        print(f"ok: {report.checked_views} views in {report.parts} parts verified")
        return 0
    print(f"{len(report.bad_views)} of {report.checked_views} views failed verification", file=sys.stderr)
    return 1


def _run_gc(args: argparse.Namespace) -> int:
    from label_store.errors import StoreFormatError, StoreNotFoundError
    from label_store.maintenance import gc_store

    try:
        removed = gc_store(args.path, older_than_s=args.older_than, dry_run=args.dry_run, storage_options=_storage_options(args.storage_options))
    except (StoreNotFoundError, StoreFormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    verb = "would remove" if args.dry_run else "removed"
    for name in removed:
        print(f"{verb} uncommitted part {name}")
    print(f"{verb} {len(removed)} uncommitted parts")
    return 0


def register(subparsers) -> None:
    """Add ``store`` with ``inspect``, ``verify`` and ``gc`` to an argparse subparsers object."""
    store = subparsers.add_parser(
        "store",
        help="inspect, verify or clean a label store",
        description="Inspect, verify or clean a label store (a local path or an fsspec URL such as s3://bucket/store.zarr).",
    )
    commands = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)

    def add_common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", metavar="PATH", help="store root: a local path or an fsspec URL")
        parser.add_argument(
            "--storage-options",
            metavar="JSON",
            default=None,
            help='fsspec options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
        )

    inspect = commands.add_parser(
        "inspect",
        help="schema, teacher, counts, views and bytes per canvas, padding share, bytes per view per target, ratio vs fp32, fidelity",
        description="Describe a store: schema, teacher fingerprint, view/image/part counts, failures, views and bytes per canvas "
        "with the share of stored bytes that encode padding, size on disk, "
        "bytes per view per target and its ratio to fp32, and the codec fidelity measured at write time.",
    )
    add_common(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON document (includes views, images and failures)")
    inspect.set_defaults(func=_run_inspect)

    verify = commands.add_parser(
        "verify",
        help="check every committed view's bytes; exit 1 and list bad views on corruption",
        description="Read every committed view and check shard indexes and chunks (crc32c), decompression, and the "
        "view checksum recorded at write time. Exits 1 and lists the bad views when any check fails.",
    )
    add_common(verify)
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(func=_run_verify)

    gc = commands.add_parser(
        "gc",
        help="remove parts that were never committed",
        description="Remove part directories that no manifest entry references (crashed, killed or aborted writers). "
        "A part is removed when its writer ran on this host and is gone, or when it has not changed for --older-than "
        "seconds. Committed parts are never touched.",
    )
    add_common(gc)
    gc.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="also remove uncommitted parts untouched for this long (default 3600; 0 once no writer runs anywhere)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    gc.set_defaults(func=_run_gc)
