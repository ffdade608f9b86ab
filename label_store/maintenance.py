"""Checking, cleaning and describing a store: `verify_store`, `gc_store`, `inspect_store`."""

from __future__ import annotations

import datetime as _dt
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from label_store._fs import LAYOUT, Location
from label_store._manifest import PART_ORIGINS, load_parts
from label_store.encoding import view_checksum
from label_store.errors import CorruptDataError
from label_store.reader import StoreReader, open_store
from label_store._fs import QUANT_ARRAY, WRITER_LEASE
from label_store.schema import REGION_ARRAY
from label_store.writer import _process_start_time


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of `verify_store`."""

    url: str
    """The store checked."""
    parts: int
    """Committed parts checked."""
    checked_views: int
    """Committed view rows checked (including copies shadowed by an earlier commit)."""
    bad_views: tuple[dict, ...] = field(default_factory=tuple)
    """One ``{image_id, view_id, part, reason}`` per view that failed a check."""

    @property
    def ok(self) -> bool:
        return not self.bad_views

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "parts": self.parts, "checked_views": self.checked_views, "ok": self.ok, "bad_views": list(self.bad_views)}


def verify_store(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    batch_views: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every committed view's stored bytes and check them.

    Checks, per view: the shard files exist and their indexes pass crc32c (a truncated or
    overwritten shard fails here), every chunk passes crc32c and decompresses to the
    right size (a flipped byte fails here), and the BLAKE2b-128 of the view's encoded
    bytes equals the checksum recorded at write time.

    Args:
        on_progress: called with (views checked, views total) after each batch.
    """
    reader = open_store(url, storage_options=storage_options, threads=1)
    table = reader._table
    total = 0 if table is None else table.num_rows
    names = [spec.name for spec in reader.targets]
    bad: list[dict] = []
    done = 0
    if total:
        import numpy as np

        image_ids = table.column("image_id").to_pylist()
        view_ids = table.column("view_id").to_pylist()
        checksums = table.column("checksum").to_pylist()
    for part_index, entry in enumerate(reader._parts):
        rows = np.flatnonzero(reader._part_index == part_index).tolist() if total else []
        for start in range(0, len(rows), batch_views):
            indexes = rows[start : start + batch_views]
            try:
                encoded = reader._read_encoded(indexes, names)
            except CorruptDataError as error:  # e.g. the part's array metadata is gone
                encoded = [error] * len(indexes)
            for index, item in zip(indexes, encoded):
                reason = None
                if isinstance(item, CorruptDataError):
                    reason = str(item)
                elif view_checksum(reader.canvases[int(reader._canvas[index])].targets, item) != checksums[index]:
                    reason = "view checksum mismatch (stored bytes differ from what was written)"
                if reason:
                    bad.append({"image_id": image_ids[index], "view_id": view_ids[index], "part": entry.part_id, "reason": reason})
            done += len(indexes)
            if on_progress is not None:
                on_progress(done, total)
    return VerifyReport(url=url, parts=len(reader._parts), checked_views=done, bad_views=tuple(bad))


def _newest_mtime(location: Location, path: str) -> float | None:
    try:
        infos = location.fs.find(path, detail=True)
    except FileNotFoundError:
        return None
    newest = None
    for info in infos.values():
        stamp = info.get("mtime", info.get("LastModified", info.get("last_modified")))
        if isinstance(stamp, _dt.datetime):
            stamp = stamp.timestamp()
        if stamp is not None:
            newest = float(stamp) if newest is None else max(newest, float(stamp))
    return newest


def _writer_dead(location: Location, part_path: str) -> bool:
    """True when the part's lease names a process on this host that no longer runs."""
    try:
        lease = json.loads(location.read_bytes(f"{part_path}/{WRITER_LEASE}"))
    except (FileNotFoundError, ValueError):
        return False
    if lease.get("host") != socket.gethostname():
        return False
    current = _process_start_time(int(lease["pid"]))
    return current is None or (lease.get("pid_start_time") is not None and current != lease["pid_start_time"])


def gc_store(
    url: str,
    *,
    older_than_s: float = 3600.0,
    dry_run: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Remove parts that were never committed (crashed, killed or aborted writers).

    An uncommitted part directory is removed when its writer ran on this host and is no
    longer alive, or when nothing in it changed for ``older_than_s`` seconds (writers on
    other hosts: pass 0 once no writer is running). Committed parts are never touched.

    Returns:
        The removed (with ``dry_run``: removable) part directory names, sorted.
    """
    location = Location(url, dict(storage_options or {}))
    from label_store._manifest import read_store_meta

    read_store_meta(location)  # refuses a path that is not a store
    committed = {entry.part_dir for entry in load_parts(location)}
    parts_root = location.path(LAYOUT["parts"])
    now = time.time()
    removed = []
    for name in location.list_names(parts_root):
        if name == "zarr.json" or name in committed:
            continue
        path = f"{parts_root}/{name}"
        newest = _newest_mtime(location, path)
        stale = newest is None or now - newest >= older_than_s
        if stale or _writer_dead(location, path):
            removed.append(name)
            if not dry_run:
                location.remove_tree(path)
    if location.is_local and not dry_run:
        import os

        for directory in (LAYOUT["manifest_parts"], LAYOUT["manifest_failures"]):
            full = location.path(directory)
            if not os.path.isdir(full):
                continue
            for entry in os.scandir(full):
                if entry.name.startswith(".tmp-") and now - entry.stat().st_mtime >= older_than_s:
                    os.unlink(entry.path)
    return sorted(removed)


def inspect_store(url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able description of a store.

    Keys: url, schema_version, created_at, teacher (fingerprint), targets (name, shape, codec,
    fp32 and stored bytes per view, ratio vs fp32), groups (the same per group), views
    (visible views), images (distinct image ids with a committed view), parts, duplicate_views
    (copies shadowed by an earlier commit), uncommitted_parts, failures (list of
    {image_id, view_id, reason}), bytes_on_disk, bytes_committed, bytes_per_view,
    fp32_bytes_per_view, ratio_vs_fp32, fidelity, views_by_origin (visible views per
    part origin: ``precompute``, ``endpoint`` for views a read-through trainer fetched),
    canvases (per canvas: canvas_hw, path, views, rows, target_bytes, bytes_per_view,
    fp32_bytes_per_view, padding_bytes, padding_share), padding_share (the share of
    stored target bytes that encode padding, all canvases) and region (the store's
    `label_store.schema.StoreRegion` as a dict, or None). Each group also has region_share:
    the share of its points stored (1.0 for a dense group); a region group's bytes include
    its share of the packed masks (``region`` arrays).
    """
    reader: StoreReader = open_store(url, storage_options=storage_options, threads=1)
    failures = _store_failures(reader)
    bytes_on_disk, by_dir, by_array = _bytes_by_part(reader._location)
    committed_dirs = {entry.part_dir for entry in reader._parts}
    chunk_bytes = _committed_chunk_bytes(reader, by_array, committed_dirs)
    rows = sum(entry.num_views for entry in reader._parts)
    raw_params = {spec.name: 8 * spec.target_codec.num_params(spec.shape[0]) for spec in reader.targets}
    targets = _target_summary(reader, chunk_bytes, raw_params, rows)
    bytes_committed = sum(by_dir.get(part_dir, 0) for part_dir in committed_dirs)
    fp32_per_view = sum(spec.fp32_nbytes for spec in reader.targets)
    per_view = bytes_committed / rows if rows else 0.0
    visible = reader.views()
    canvases = _canvas_summary(reader, visible, chunk_bytes, raw_params)
    visible_bytes = sum(c["bytes_per_view"] * c["views"] for c in canvases)
    return {
        "url": url,
        "schema_version": reader.schema_version,
        "created_at": reader._meta.created_at,
        "teacher": reader.fingerprint.to_dict(),
        "targets": targets,
        "groups": _group_summary(reader, targets),
        "views": len(reader),
        "images": len(set(visible.column("image_id").to_pylist())),
        "parts": len(reader._parts),
        "duplicate_views": rows - len(reader),
        "uncommitted_parts": len(set(by_dir) - committed_dirs),
        "failures": failures,
        "bytes_on_disk": bytes_on_disk,
        "bytes_committed": bytes_committed,
        "bytes_per_view": per_view,
        "fp32_bytes_per_view": fp32_per_view,
        "ratio_vs_fp32": fp32_per_view / per_view if per_view else None,
        "fidelity": reader.fidelity,
        "views_by_origin": _views_by_origin(reader, visible),
        "canvases": canvases,
        "padding_share": sum(c["padding_bytes"] for c in canvases) / visible_bytes if visible_bytes else None,
        "region": None if reader.region is None else reader.region.to_dict(),
    }


def _store_failures(reader: StoreReader) -> list[dict]:
    """The store's recorded failures (``{image_id, view_id, reason}`` each), read through its writer-side `Store`."""
    from label_store.writer import Store

    return Store(reader._location, reader._meta, reader._meta.views_per_shard).failures()


def _bytes_by_part(location: Location) -> tuple[int, dict[str, int], dict[tuple[str, str], int]]:
    """(bytes of every file of the store, bytes per part directory, chunk bytes per
    ``(part directory, array path)``), from a fresh listing of the store."""
    location.refresh(location.root)
    try:
        listing = location.fs.find(location.root, detail=True)
    except FileNotFoundError:
        listing = {}
    sizes = {path: int(info.get("size") or 0) for path, info in listing.items() if info.get("type", "file") != "directory"}
    parts_root = location.path(LAYOUT["parts"])
    by_array: dict[tuple[str, str], int] = {}  # (part_dir, array name) -> chunk bytes
    by_dir: dict[str, int] = {}
    for path, size in sizes.items():
        if not path.startswith(parts_root + "/"):
            continue
        part_dir, _, rest = path[len(parts_root) + 1 :].partition("/")
        if not rest:
            continue  # parts/zarr.json
        by_dir[part_dir] = by_dir.get(part_dir, 0) + size
        if "/c/" in rest:
            key = (part_dir, rest.split("/c/", 1)[0])
            by_array[key] = by_array.get(key, 0) + size
    return sum(sizes.values()), by_dir, by_array


def _committed_chunk_bytes(
    reader: StoreReader, by_array: Mapping[tuple[str, str], int], committed_dirs: set[str],
) -> Callable[..., int]:
    """``chunk_bytes(array_name, canvases=None)``: the chunk bytes of an array in the committed
    parts, over ``canvases`` (None: all the store's canvases)."""

    def chunk_bytes(array_name: str, canvases=None) -> int:
        return sum(
            by_array.get((part_dir, canvas.array_path(array_name)), 0)
            for part_dir in committed_dirs
            for canvas in (canvases or reader.canvases)
        )

    return chunk_bytes


def _target_summary(reader: StoreReader, chunk_bytes, raw_params: Mapping[str, int], rows: int) -> list[dict[str, Any]]:
    """Per target: name, shape, codec, fp32 and stored bytes per view and their ratio.

    Stored bytes: the target's chunks, its share of ``quant`` (by parameter count) and, for
    a region target, its share of the packed masks, over every committed row.
    """
    params_total = chunk_bytes(QUANT_ARRAY) if sum(raw_params.values()) else 0
    region_targets = reader._meta.region_targets()
    masks_total = chunk_bytes(REGION_ARRAY) if region_targets else 0
    targets = []
    for spec in reader.targets:
        share = params_total * raw_params[spec.name] / sum(raw_params.values()) if params_total else 0.0
        if spec.name in region_targets:  # the masks are what the region groups cost beyond their codes
            share += masks_total / len(region_targets)
        stored = (chunk_bytes(spec.name) + share) / rows if rows else 0.0
        targets.append(
            {
                "name": spec.name,
                "shape": list(spec.shape),
                "codec": spec.codec,
                "fp32_bytes_per_view": spec.fp32_nbytes,
                "stored_bytes_per_view": stored,
                "ratio_vs_fp32": spec.fp32_nbytes / stored if stored else None,
            }
        )
    return targets


def _group_summary(reader: StoreReader, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target group: its codecs, fp32 and stored bytes per view (sums of ``targets``,
    `_target_summary`'s rows), their ratio and region_share (1.0 for a dense group)."""
    region_targets = reader._meta.region_targets()
    region_share = reader.region_share()
    groups: dict[str, dict[str, Any]] = {}
    for spec, target in zip(reader.targets, targets):
        group = groups.setdefault(
            spec.group,
            {
                "group": spec.group, "codecs": [], "fp32_bytes_per_view": 0, "stored_bytes_per_view": 0.0,
                "region_share": region_share if spec.name in region_targets else 1.0,
            },
        )
        if spec.codec not in group["codecs"]:
            group["codecs"].append(spec.codec)
        group["fp32_bytes_per_view"] += spec.fp32_nbytes
        group["stored_bytes_per_view"] += target["stored_bytes_per_view"]
    for group in groups.values():
        group["ratio_vs_fp32"] = group["fp32_bytes_per_view"] / group["stored_bytes_per_view"] if group["stored_bytes_per_view"] else None
    return list(groups.values())


def _views_by_origin(reader: StoreReader, visible) -> dict[str, int]:
    """Visible views per part origin (every `PART_ORIGINS` entry, 0 when it has none)."""
    origin_of_part = {entry.part_id: entry.origin for entry in reader._parts}
    views_by_origin = {origin: 0 for origin in PART_ORIGINS}
    for part_id in visible.column("part").to_pylist():
        views_by_origin[origin_of_part[part_id]] = views_by_origin.get(origin_of_part[part_id], 0) + 1
    return views_by_origin


def _canvas_summary(reader: StoreReader, visible, chunk_bytes, raw_params: Mapping[str, int]) -> list[dict[str, Any]]:
    """Per canvas: visible views, rows stored, target bytes (chunks of its arrays, shared
    ``quant`` split by parameter count), bytes per view, and the bytes that encode padding.

    Padding bytes: each view's stored bytes of a target times the share of that target's
    cells outside the view's valid region (`label_store.schema.padding_fraction`);
    compressed bytes are attributed in proportion to cells.
    """
    import numpy as np

    from label_store.schema import padding_fraction

    rows_per_canvas = np.zeros(len(reader.canvases), np.int64)
    if reader._table is not None:
        rows_per_canvas += np.bincount(reader._canvas, minlength=len(reader.canvases))
    visible_canvas = visible.column("canvas").to_numpy() if visible.num_rows else np.zeros(0, np.int32)
    regions = (
        np.asarray(visible.column("valid_region").to_pylist(), np.int64).reshape(-1, 4) if visible.num_rows else np.zeros((0, 4), np.int64)
    )
    out = []
    for index, canvas in enumerate(reader.canvases):
        rows = int(rows_per_canvas[index])
        mine = visible_canvas == index
        params = chunk_bytes(QUANT_ARRAY, [canvas]) if sum(raw_params.values()) else 0
        stored_total, padding = 0.0, 0.0
        for spec in canvas.targets:
            share = params * raw_params[spec.name] / sum(raw_params.values()) if params else 0.0
            stored = chunk_bytes(spec.name, [canvas]) + share
            stored_total += stored
            if rows and mine.any():
                per_view = stored / rows
                padding += float(per_view * padding_fraction(spec, canvas.canvas_hw, regions[mine]).sum())
        if reader.region is not None:
            stored_total += chunk_bytes(REGION_ARRAY, [canvas])
        out.append(
            {
                "canvas_hw": list(canvas.canvas_hw),
                "path": canvas.path,
                "views": int(mine.sum()),
                "rows": rows,
                "target_bytes": stored_total,
                "bytes_per_view": stored_total / rows if rows else 0.0,
                "fp32_bytes_per_view": sum(spec.fp32_nbytes for spec in canvas.targets),
                "padding_bytes": padding,
                "padding_share": padding * rows / (stored_total * int(mine.sum())) if rows and mine.any() and stored_total else None,
            }
        )
    return out
