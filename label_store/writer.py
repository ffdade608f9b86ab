"""Creating a store and writing parts to it.

Store layout (a zarr v3 hierarchy; N views in a part, S views per shard)::

    <root>/zarr.json                      group; attributes["label_store"]: schema version,
                                          teacher fingerprint, targets with codecs
    <root>/parts/<part_dir>/<group>/<level>   codes[N, C, H, W] (uint8 | float16 | float32),
                                          inner chunk [1, C, H, W] (one view), shard [S, C, H, W]
    <root>/parts/<part_dir>/quant         float32[N, P]: scale and offset of every int-coded
                                          target of a view (same chunking)
    <root>/parts/<part_dir>/region        uint8[N, ceil(A / 8)]: packed mask of the points where
                                          the region groups are stored (stores with a
                                          `label_store.schema.StoreRegion` only)
    <root>/parts/<part_dir>/canvas_<H>x<W>/...   the same arrays for the part's views on
                                          each further canvas (portrait: the transpose), so
                                          every array has one fixed chunk shape
    <root>/parts/<part_dir>/_writer.json  lease: host, pid and start time of the writer
    <root>/manifest/parts/<part_id>.parquet   the commit: one row per view (image id, view id,
                                          view recipe JSON, content hash, valid region, row,
                                          checksum); its appearance makes the part visible
    <root>/manifest/failures/<time>-<uuid>.parquet   views that could not be produced

The writer builds every shard file itself (`label_store._shard.encode_shard`: byte for byte
what zarr-python writes for the same codes) and takes every zarr.json from zarr-python, so
any zarr v3 reader opens the store; going through zarr-python's per-chunk pipeline cost
more CPU than the compression (benchmarks/RESULTS.md, "Store writes").

Concurrency and failure rules:
    * A part is written by one `PartWriter` into its own directory (``<part_id>.<attempt>``,
      a fresh attempt suffix each time), so no two writers ever touch the same shard and a
      retried task never collides with the wreck of its previous attempt.
    * Arrays are written whole, shard by shard; the manifest entry is published last and
      atomically (local: temporary file, fsync, link into place; object stores: one PUT).
      A task that crashes, is killed or aborts before that leaves only an unreferenced
      directory: invisible to readers, removed by `gc_store`.
    * A part id commits at most once (`PartExistsError` on a second commit): a retried task
      whose first attempt committed can skip (`Store.is_committed`).
    * A view committed by two different parts is read from the part committed first (then
      by part id): later copies are ignored, never mixed. `PartWriter.append` rejects a
      view already appended to the same part.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import socket
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from label_store._fs import LAYOUT, QUANT_ARRAY, WRITER_LEASE, Location
from label_store._shard import encode_shard, shard_key
from label_store._manifest import (
    MAX_IMAGE_ID,
    MAX_VIEW_ID,
    PART_ORIGINS,
    StoreMeta,
    failures_bytes,
    load_failures,
    load_parts,
    part_entry_bytes,
    read_store_meta,
    view_key,
)
from label_store.codecs import parse_codec
from label_store.encoding import (
    EncodedTarget,
    QuantizedTarget,
    check_targets,
    decode_encoded,
    encode_inputs,
    view_checksum,
)
from label_store.errors import PartExistsError, PartStateError, StoreMismatchError, StoreNotFoundError
from label_store.fidelity import FidelityAccumulator
from label_store.schema import (
    BACKBONE_STRIDES,
    REGION_ARRAY,
    REGION_SCHEMA_VERSION,
    SCHEMA_VERSION,
    StoreCanvas,
    StoreRegion,
    TargetSpec,
    TeacherFingerprint,
    ViewRecipe,
    default_canvases,
    level_name,
    region_num_points,
    store_canvases,
    target_stride,
)

DEFAULT_VIEWS_PER_SHARD = 16
"""Views per shard file: about one file per view, read as fast as larger shards (benchmarks/RESULTS.md, "Store reads")."""
DEFAULT_FIDELITY_VIEWS = 2
"""Views per part whose codec fidelity is measured at write time."""

_PART_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_GROUP_METADATA = json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


PARAMS_CODEC = "fp32+zstd3"
"""Codec of the quantization-parameter array ``quant`` (float32 scale and offset, zstd level 3);
its compressor also compresses the packed masks of the ``region`` array (uint8)."""


@functools.lru_cache(maxsize=None)
def _array_metadata(view_shape: tuple[int, ...], dtype: str, codec_name: str, views_per_shard: int) -> dict:
    """The zarr.json document zarr-python writes for a part's array of this layout (rows: S).

    Built once per layout by zarr-python itself, in memory, so the arrays the writer fills
    directly carry exactly zarr's metadata; the caller sets the row count.
    """
    import zarr
    from zarr.codecs import BytesCodec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    compressors = parse_codec(codec_name).zarr_compressors()
    array = zarr.create_array(
        MemoryStore(),
        shape=(views_per_shard, *view_shape),
        dtype=dtype,
        chunks=(1, *view_shape),
        shards=(views_per_shard, *view_shape),
        serializer=BytesCodec(),
        compressors=compressors,
        fill_value=0,
        dimension_names=("view",) + (("channel", "y", "x") if len(view_shape) == 3 else ("param",)),
        config={"write_empty_chunks": True},
    )
    return json.loads(array.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


def _process_start_time(pid: int) -> str | None:
    """Start time of a process from /proc (Linux), to tell a live writer from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return None


def _view_text(view: Any, where: str) -> tuple[str, tuple[Any, Any] | None]:
    """A record's view as the manifest's ``view`` JSON, and its ``(canvas_h, canvas_w)`` (None when it names none).

    A `ViewRecipe` is read, not parsed, and serialised here, once; a dict is serialised; JSON
    text (from callers without the typed recipe) is parsed once to check that it is an object.
    """
    if isinstance(view, ViewRecipe):
        return json.dumps(view.to_dict(), sort_keys=True), (view.canvas_h, view.canvas_w)
    if isinstance(view, Mapping):
        fields, text = dict(view), json.dumps(dict(view), sort_keys=True)
    else:
        text = view
        try:
            fields = json.loads(view) if isinstance(view, str) else None
        except json.JSONDecodeError:
            fields = None
    if not isinstance(fields, dict):
        raise ValueError(
            f"PartWriter.append(record=) expects view as a view recipe (detcore.views.View), a dict or a JSON object string. "
            f"Got {view!r} {where}."
        )
    return text, ((fields["canvas_h"], fields["canvas_w"]) if "canvas_h" in fields and "canvas_w" in fields else None)


def _check_targets_match(fingerprint: TeacherFingerprint, targets: Sequence[TargetSpec]) -> None:
    """Shapes must follow from the fingerprint: K, 4 * (R + 1), ceil(canvas / stride)."""
    if not targets:
        raise ValueError("create_store(targets=) expects at least one TargetSpec. Got none.")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"create_store(targets=) expects distinct target names. Got {names}.")
    strides = {level_name(s): s for s in fingerprint.strides}
    for spec in targets:
        if not isinstance(spec, TargetSpec):
            raise ValueError(f"create_store(targets=) expects TargetSpec items. Got {type(spec).__name__}.")
        stride = BACKBONE_STRIDES.get(spec.level) if spec.group == "backbone" else strides.get(spec.level)
        if stride is None:
            raise ValueError(
                f"create_store(targets=) expects levels of the fingerprint's strides {tuple(strides)} (or c3..c5 for backbone). "
                f"Got {spec.name!r}."
            )
        height, width = (-(-fingerprint.canvas_hw[0] // stride), -(-fingerprint.canvas_hw[1] // stride))
        channels = {"cls": fingerprint.num_classes, "box": 4 * (fingerprint.reg_max + 1)}.get(spec.group, spec.shape[0])
        if spec.shape != (channels, height, width):
            raise ValueError(
                f"create_store(targets=) expects {spec.name} of shape {(channels, height, width)} for canvas "
                f"{fingerprint.canvas_hw}, {fingerprint.num_classes} classes and reg_max {fingerprint.reg_max}. Got {spec.shape}."
            )


def _check_transforms(targets: Sequence[TargetSpec], region: StoreRegion | None) -> None:
    """A new store's transform codecs (``pca-std<k>``) need their fitted basis, and store dense."""
    unfitted = [t.name for t in targets if t.target_codec.needs_basis and t.transform is None]
    if unfitted:
        raise ValueError(
            f"create_store(targets=) expects a fitted channel basis for transform codecs. Got none for {unfitted}: "
            "fit them on the first views with label_store.fit_target_bases."
        )
    regional = [t.name for t in targets if region is not None and t.group in region.groups and t.target_codec.needs_basis]
    if regional:
        raise ValueError(
            f"create_store(region=) expects int or float codecs for the region's targets. Got transform codecs for "
            f"{regional}, which store every point."
        )


def _target_set_diff(stored: Sequence[TargetSpec], given: Sequence[TargetSpec]) -> list[str]:
    mine = {t.name: t for t in stored}
    theirs = {t.name: t for t in given}
    out = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None:
            out.append(f"target {name}: store does not have it, caller adds {b.shape} {b.codec}")
        elif b is None:
            out.append(f"target {name}: store has {a.shape} {a.codec}, caller omits it")
        elif a != b:
            out.append(f"target {name}: store has shape {a.shape} codec {a.codec}, caller expects shape {b.shape} codec {b.codec}")
    return out


def create_store(
    url: str,
    fingerprint: TeacherFingerprint | Mapping[str, Any],
    targets: Sequence[TargetSpec],
    *,
    views_per_shard: int | None = None,
    exist_ok: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    canvases: Sequence[Sequence[int]] | None = None,
    region: StoreRegion | None = None,
) -> "Store":
    """Create a label store at ``url`` (local path or fsspec URL), or open it for writing.

    Args:
        url: store root, e.g. ``"/data/coco_gfl.zarr"`` or ``"s3://bucket/coco_gfl.zarr"``.
        fingerprint: the teacher (a `TeacherFingerprint` or its ``to_dict()``).
        targets: what to store; shapes must follow from the fingerprint.
        views_per_shard: S, views per shard file for parts written through this handle
            (default: the store's, 16 for a new store).
        exist_ok: open an existing store with the same fingerprint and targets (otherwise
            an existing store raises ``FileExistsError``).
        storage_options: fsspec options (credentials, ``client_kwargs``...).
        canvases: ``(H, W)`` of every canvas, the fingerprint's first (default: it and its
            transpose, one when square). An existing store keeps its own unless this is given.
        region: store the region groups only inside each view's region (`StoreRegion`;
            the store is written as schema `REGION_SCHEMA_VERSION`); None: every target dense.
    Raises:
        StoreMismatchError: the existing store has another fingerprint, target set, canvases or region.
    """
    if not isinstance(fingerprint, TeacherFingerprint):
        fingerprint = TeacherFingerprint.from_dict(fingerprint)
    targets = list(targets)
    _check_targets_match(fingerprint, targets)
    if views_per_shard is not None and (not isinstance(views_per_shard, int) or views_per_shard <= 0):
        raise ValueError(f"create_store(views_per_shard=) expects a positive int. Got {views_per_shard!r}.")
    wanted = None
    if canvases is not None:
        wanted = tuple((int(c[0]), int(c[1])) for c in canvases)
        if not wanted or wanted[0] != fingerprint.canvas_hw or len(set(wanted)) != len(wanted) or min(min(c) for c in wanted) <= 0:
            raise ValueError(
                f"create_store(canvases=) expects distinct positive (H, W), the fingerprint's canvas {fingerprint.canvas_hw} first. Got {canvases!r}."
            )
    if region is not None and not isinstance(region, StoreRegion):
        region = StoreRegion.from_dict(region)
    if region is not None and not any(t.group in region.groups for t in targets):
        raise ValueError(
            f"create_store(region=) expects targets of its groups {list(region.groups)}. Got {sorted({t.group for t in targets})}."
        )
    location = Location(url, dict(storage_options or {}))
    try:
        existing = read_store_meta(location)
    except StoreNotFoundError:
        existing = None
    if existing is None:
        import zarr

        _check_transforms(targets, region)
        meta = StoreMeta(
            schema_version=SCHEMA_VERSION if region is None else REGION_SCHEMA_VERSION,
            fingerprint=fingerprint,
            targets=tuple(targets),
            views_per_shard=views_per_shard or DEFAULT_VIEWS_PER_SHARD,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            canvases=store_canvases(targets, wanted or default_canvases(fingerprint.canvas_hw)),
            region=region,
        )
        store = location.zarr_store()
        try:
            zarr.create_group(store, attributes=meta.to_attributes(), overwrite=False)
        except Exception:  # a concurrent creator won the race: fall through to the comparison
            pass
        try:
            zarr.create_group(store, path=LAYOUT["parts"], overwrite=False)
        except Exception:
            pass
        existing = read_store_meta(location)
    elif not exist_ok:
        raise FileExistsError(f"create_store(exist_ok=False) expects no store at {url!r}. Got one; choose a new path.")
    problems = existing.fingerprint.diff(fingerprint) + _target_set_diff(existing.targets, targets)
    stored_canvases = tuple(c.canvas_hw for c in existing.canvases)
    if wanted is not None and wanted != stored_canvases:
        problems.append(f"canvases: store has {list(stored_canvases)}, caller expects {list(wanted)}")
    if existing.region != region:
        def told(value):
            return "dense targets" if value is None else value.describe()

        problems.append(f"region: store has {told(existing.region)}, caller expects {told(region)}")
    if problems:
        raise StoreMismatchError(
            f"create_store(url={url!r}) found a store for another teacher or target set:\n  - "
            + "\n  - ".join(problems)
            + "\nWrite these targets to a new store path (--store), or delete the old store."
        )
    return Store(location, existing, views_per_shard or existing.views_per_shard)


class Store:
    """A store opened for writing. Picklable (to Ray tasks): it carries no open handles."""

    def __init__(self, location: Location, meta: StoreMeta, views_per_shard: int) -> None:
        self._location = location
        self._meta = meta
        self.views_per_shard = views_per_shard

    def __repr__(self) -> str:
        return f"Store(url={self.url!r}, targets={len(self.targets)}, views_per_shard={self.views_per_shard})"

    @property
    def url(self) -> str:
        return self._location.url

    @property
    def fingerprint(self) -> TeacherFingerprint:
        return self._meta.fingerprint

    @property
    def targets(self) -> tuple[TargetSpec, ...]:
        """Targets in the store's order (the order of the checksum and of `encode_targets`), with the first canvas's shapes."""
        return self._meta.targets

    @property
    def canvases(self) -> tuple[StoreCanvas, ...]:
        """The store's canvases (`label_store.schema.StoreCanvas`), in index order."""
        return self._meta.canvases

    @property
    def schema_version(self) -> int:
        return self._meta.schema_version

    @property
    def region(self) -> StoreRegion | None:
        """Region storage (`StoreRegion`), or None for a dense store."""
        return self._meta.region

    def open_part(self, part_id: str, *, fidelity_views: int = DEFAULT_FIDELITY_VIEWS, origin: str = "precompute") -> "PartWriter":
        """Start writing part ``part_id`` (letters, digits, ``_`` and ``-``; one per writer task).

        ``origin`` is recorded in the part's manifest entry: ``precompute`` or ``endpoint``
        (targets a read-through trainer fetched from the teacher endpoint).

        Raises:
            PartExistsError: the part is already committed.
        """
        if not isinstance(part_id, str) or not 0 < len(part_id) <= 128 or not set(part_id) <= _PART_ID_CHARS:
            raise ValueError(f"Store.open_part(part_id=) expects 1-128 letters, digits, '_' or '-'. Got {part_id!r}.")
        if self.is_committed(part_id):
            raise PartExistsError(f"Store.open_part(part_id={part_id!r}) expects a new part. Got one already committed in {self.url}; skip it.")
        return PartWriter(self, part_id, fidelity_views=fidelity_views, origin=origin)

    def is_committed(self, part_id: str) -> bool:
        path = self._location.path(LAYOUT["manifest_parts"], f"{part_id}.parquet")
        self._location.refresh(path.rsplit("/", 1)[0])
        return self._location.fs.exists(path)

    def committed_parts(self) -> list[str]:
        return [entry.part_id for entry in load_parts(self._location)]

    def committed_keys(self) -> set[tuple[int, int]]:
        """``(image_id, view_id)`` of every committed view."""
        keys: set[tuple[int, int]] = set()
        for entry in load_parts(self._location):
            keys.update(zip(entry.table.column("image_id").to_pylist(), entry.table.column("view_id").to_pylist()))
        return keys

    def record_failures(self, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """Append views that could not be produced: dicts with image_id, view_id (-1: the whole image), reason.

        Written as one new Parquet file, published atomically. Returns its path (None for no rows).
        """
        rows = list(rows)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping) or not {"image_id", "view_id", "reason"} <= set(row):
                raise ValueError(f"Store.record_failures(rows[{index}]=) expects a dict with image_id, view_id, reason. Got {row!r}.")
            if not isinstance(row["reason"], str) or not row["reason"]:
                raise ValueError(f"Store.record_failures(rows[{index}]=) expects a non-empty reason. Got {row['reason']!r}.")
            if int(row["image_id"]) < 0 or int(row["view_id"]) < -1:
                raise ValueError(f"Store.record_failures(rows[{index}]=) expects image_id >= 0 and view_id >= -1. Got {row!r}.")
        if not rows:
            return None
        now = time.time_ns()
        path = self._location.path(LAYOUT["manifest_failures"], f"{now:020d}-{uuid.uuid4().hex[:12]}.parquet")
        self._location.publish(path, failures_bytes(rows, now), exclusive=True)
        return path

    def failures(self, *, include_resolved: bool = False) -> list[dict]:
        """Recorded failures, latest reason per view; without ``include_resolved`` views since committed are left out."""
        table = load_failures(self._location)
        latest: dict[tuple[int, int], dict] = {}
        for row in sorted(table.to_pylist(), key=lambda r: r["recorded_at_ns"]):
            latest[(row["image_id"], row["view_id"])] = {"image_id": row["image_id"], "view_id": row["view_id"], "reason": row["reason"]}
        if not include_resolved:
            committed = self.committed_keys()
            committed_images = {image for image, _ in committed}
            latest = {
                key: row
                for key, row in latest.items()
                if key not in committed and not (key[1] == -1 and key[0] in committed_images)
            }
        return [latest[key] for key in sorted(latest)]

    def reader(self):
        """A `StoreReader` of what is committed now."""
        from label_store.reader import open_store

        return open_store(self.url, expected_fingerprint=self.fingerprint, storage_options=self._location.storage_options)


class _CanvasRows:
    """A part's views on one canvas: its arrays' pending and written rows."""

    def __init__(self, canvas: StoreCanvas, meta: StoreMeta) -> None:
        self.canvas = canvas
        self.specs = canvas.targets
        self.quantized = [spec for spec in self.specs if spec.target_codec.quantized]
        self.pending: list[dict[str, EncodedTarget]] = []
        self.pending_regions: list[np.ndarray] = []
        self.flushed = 0
        self.rows = 0
        self.num_params = 0
        # Region storage: where each region target's points sit in a view's mask over all levels.
        self.num_points = region_num_points(canvas, meta.fingerprint.strides) if meta.region is not None else 0
        self.region_slices: dict[str, tuple[int, int, int]] = {}
        if meta.region is not None:
            starts, start = {}, 0
            for stride in meta.fingerprint.strides:
                starts[stride] = start
                start += -(-canvas.canvas_hw[0] // stride) * -(-canvas.canvas_hw[1] // stride)
            for spec in self.specs:
                if spec.name in meta.region_targets():
                    self.region_slices[spec.name] = (starts[target_stride(spec)], spec.shape[1], spec.shape[2])

    def keep(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """A view's mask over all levels -> name -> bool array[H, W] of each region target."""
        return {name: mask[start : start + h * w].reshape(h, w) for name, (start, h, w) in self.region_slices.items()}


class PartWriter:
    """Writes one part: append views, then `commit` (or `abort`). Not thread-safe.

    Leaving a ``with`` block without `commit` aborts the part.
    """

    def __init__(self, store: Store, part_id: str, *, fidelity_views: int = DEFAULT_FIDELITY_VIEWS, origin: str = "precompute") -> None:
        if not isinstance(fidelity_views, int) or fidelity_views < 0:
            raise ValueError(f"PartWriter(fidelity_views=) expects an int >= 0. Got {fidelity_views!r}.")
        if origin not in PART_ORIGINS:
            raise ValueError(f"PartWriter(origin=) expects one of {PART_ORIGINS}. Got {origin!r}.")
        self.origin = origin
        self.store = store
        self.part_id = part_id
        self.part_dir = f"{part_id}.{uuid.uuid4().hex[:12]}"
        self.fidelity_views = fidelity_views
        self._location = store._location
        self._specs = store.targets
        self._canvas_rows = [_CanvasRows(canvas, store._meta) for canvas in store.canvases]
        self._region_points = [0, 0]  # points stored in the region, points in all
        self._views_per_shard = store.views_per_shard
        self._state = "open"
        self._records: list[dict] = []
        self._keys: set[int] = set()
        self._compressors = {spec.name: spec.target_codec.numcodecs_compressor() for spec in self._specs}
        self._compressors[QUANT_ARRAY] = parse_codec(PARAMS_CODEC).numcodecs_compressor()
        self._fidelity = FidelityAccumulator()
        self._fidelity_sampled = 0

    def __repr__(self) -> str:
        return f"PartWriter(part_id={self.part_id!r}, views={len(self._records)}, state={self._state!r})"

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._state == "open":
            self.abort()

    @property
    def num_views(self) -> int:
        return len(self._records)

    @property
    def part_path(self) -> str:
        return self._location.path(LAYOUT["parts"], self.part_dir)

    def _check_open(self, method: str) -> None:
        if self._state != "open":
            raise PartStateError(f"PartWriter.{method}() expects an open part. Got part {self.part_id!r} already {self._state}.")

    def _check_record(self, record: Mapping[str, Any]) -> dict:
        required = {"image_id", "view_id", "view", "content_hash", "valid_region"}
        if not isinstance(record, Mapping) or set(record) != required:
            got = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"PartWriter.append(record=) expects exactly the keys {sorted(required)}. Got {got}.")
        image_id, view_id = record["image_id"], record["view_id"]
        if not isinstance(image_id, (int, np.integer)) or isinstance(image_id, bool) or not 0 <= int(image_id) < MAX_IMAGE_ID:
            raise ValueError(f"PartWriter.append(record=) expects image_id an int in [0, 2**43). Got {image_id!r}.")
        if not isinstance(view_id, (int, np.integer)) or isinstance(view_id, bool) or not 0 <= int(view_id) < MAX_VIEW_ID:
            raise ValueError(f"PartWriter.append(record=) expects view_id an int in [0, 2**20). Got {view_id!r} (image_id={image_id}).")
        where = f"(image_id={int(image_id)}, view_id={int(view_id)})"
        view, view_canvas = _view_text(record["view"], where)
        if not isinstance(record["content_hash"], str) or not record["content_hash"]:
            raise ValueError(f"PartWriter.append(record=) expects content_hash a non-empty string. Got {record['content_hash']!r} {where}.")
        region = tuple(record["valid_region"]) if isinstance(record["valid_region"], (tuple, list, np.ndarray)) else ()
        canvas = 0
        if view_canvas is not None:
            try:
                canvas = self.store._meta.canvas_index((int(view_canvas[0]), int(view_canvas[1])))
            except (TypeError, ValueError):
                canvas = -1
            if canvas < 0:
                raise ValueError(
                    f"PartWriter.append(record=) expects a view on one of the store's canvases "
                    f"{[c.canvas_hw for c in self.store.canvases]}. Got canvas {view_canvas[0]}x{view_canvas[1]} {where}."
                )
        canvas_h, canvas_w = self.store.canvases[canvas].canvas_hw
        if (
            len(region) != 4
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in region)
            or not (0 <= region[0] < region[2] <= canvas_w and 0 <= region[1] < region[3] <= canvas_h)
        ):
            raise ValueError(
                f"PartWriter.append(record=) expects valid_region (x1, y1, x2, y2) ints inside the {canvas_h}x{canvas_w} canvas. "
                f"Got {record['valid_region']!r} {where}."
            )
        return {
            "image_id": int(image_id),
            "view_id": int(view_id),
            "view": view,
            "content_hash": record["content_hash"],
            "valid_region": [int(v) for v in region],
            "canvas": canvas,
        }

    def append(
        self,
        record: Mapping[str, Any],
        targets: Mapping[str, np.ndarray | QuantizedTarget],
        *,
        originals: Mapping[str, np.ndarray] | None = None,
        region: np.ndarray | None = None,
    ) -> None:
        """Add one view.

        Args:
            record: ``image_id`` (int), ``view_id`` (int), ``view`` (the view recipe: a
                `label_store.schema.ViewRecipe` such as `detcore.views.View`, a dict, or a
                JSON object string; its ``canvas_h``/``canvas_w`` choose the store canvas,
                the first when absent), ``content_hash`` (str), ``valid_region``
                ``(x1, y1, x2, y2)`` in canvas pixels.
            targets: name -> float32 array[C, H, W] (that canvas's shapes) for every target of the store; a target
                with an int codec may come already quantized, as a `QuantizedTarget` (the
                same bytes are stored).
            originals: name -> float32 array[C, H, W] of the targets given quantized, for the
                codec-fidelity sample: a view is sampled (among the part's first
                ``fidelity_views``) only when every target's float values are known.
            region: for a store with a `StoreRegion`: bool array[A], the view's points over
                all levels (level-major, row-major) where the region groups are stored
                (`detcore.assign.stored_region` computes it from the view's GT); None stores
                every point (e.g. dense targets fetched from the endpoint). A dense store
                takes None only.
        Raises:
            ValueError: bad record, missing/extra target, wrong shape, NaN/inf, or a view
                already appended to this part (the part stays usable).
            OSError and other storage errors while writing a full shard: the part is failed;
                only `abort` remains.
        """
        self._check_open("append")
        row = self._check_record(record)
        key = int(view_key(row["image_id"], row["view_id"]))
        if key in self._keys:
            raise ValueError(
                f"PartWriter.append(record=) expects each view once per part. Got image_id={row['image_id']} "
                f"view_id={row['view_id']} twice in part {self.part_id!r}."
            )
        where = f"(image_id={row['image_id']}, view_id={row['view_id']})"
        state = self._canvas_rows[row["canvas"]]
        specs = state.specs
        mask = self._check_region(region, state, where)
        keep = state.keep(mask) if mask is not None else {}
        layout = self.store._meta.region_layout
        encoded, arrays = encode_inputs(
            targets, specs, f"PartWriter.append(targets=) {where} on canvas {state.canvas.canvas_hw}", keep, layout
        )
        if self._fidelity_sampled < self.fidelity_views:
            given = [spec for spec in specs if spec.name not in arrays]
            if given and originals is not None:
                known = {spec.name: originals[spec.name] for spec in given if spec.name in originals}
                arrays = {**arrays, **check_targets(known, given, f"PartWriter.append(originals=) {where}")}
            if len(arrays) == len(specs):
                for spec in specs:
                    original, decoded = arrays[spec.name], decode_encoded(spec, encoded[spec.name], keep.get(spec.name), layout)
                    if spec.name in keep:  # fidelity of the stored points only: [C, 1, points]
                        if not keep[spec.name].any():
                            continue
                        original, decoded = original[:, keep[spec.name]][:, None], decoded[:, keep[spec.name]][:, None]
                    self._fidelity.add(spec, original, decoded)
                self._fidelity_sampled += 1
        row["row"] = state.rows
        row["checksum"] = view_checksum(specs, encoded)
        if not self._records:
            self._write_lease()
        self._records.append(row)
        self._keys.add(key)
        state.rows += 1
        state.pending.append(encoded)
        if mask is not None:
            state.pending_regions.append(np.packbits(mask))
            self._region_points[0] += int(mask.sum())
            self._region_points[1] += int(mask.size)
        if len(state.pending) == self._views_per_shard:
            try:
                self._flush(state)
            except BaseException:
                self._state = "failed"  # storage error mid-shard: only abort() is left
                raise

    def _check_region(self, region: np.ndarray | None, state: _CanvasRows, where: str) -> np.ndarray | None:
        """The view's bool mask[A] (all points when ``region`` is None) for a region store; None for a dense one."""
        if self.store.region is None:
            if region is not None:
                raise ValueError(
                    f"PartWriter.append(region=) expects None for a store without region storage ({self.store.url}). Got a mask {where}."
                )
            return None
        if region is None:
            return np.ones(state.num_points, dtype=bool)
        mask = np.asarray(region)
        if mask.dtype != np.bool_ or mask.shape != (state.num_points,):
            raise ValueError(
                f"PartWriter.append(region=) expects a bool array[{state.num_points}] (points of all levels on canvas "
                f"{state.canvas.canvas_hw}) {where}. Got {mask.dtype} {mask.shape}."
            )
        return mask

    def _write_lease(self) -> None:
        lease = {
            "part_id": self.part_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()),
            "started_at_ns": time.time_ns(),
        }
        self._location.write_file(f"{self.part_path}/{WRITER_LEASE}", json.dumps(lease).encode())

    def _write_shard(self, path: str, start: int, rows: np.ndarray, compressor) -> None:
        """Rows ``start..start+len(rows)`` (one shard, ``start`` a multiple of S) of the array at ``path``."""
        key = shard_key(start, self._views_per_shard, rows.ndim)
        self._location.write_file(
            self._location.path(LAYOUT["parts"], self.part_dir, path, key), encode_shard(rows, self._views_per_shard, compressor)
        )

    def _flush(self, state: _CanvasRows | None = None) -> None:
        """Write one canvas's pending views (one whole shard, or the last partial one); None: every canvas's."""
        if state is None:
            for each in self._canvas_rows:
                self._flush(each)
            return
        if not state.pending:
            return
        start, canvas = state.flushed, state.canvas
        for spec in state.specs:
            block = np.stack([view[spec.name].codes for view in state.pending]).astype(spec.target_codec.dtype, copy=False)
            self._write_shard(canvas.array_path(spec.name), start, block, self._compressors[spec.name])
        if state.quantized:
            params = np.stack(
                [np.concatenate([np.concatenate([view[s.name].scale, view[s.name].offset]) for s in state.quantized]) for view in state.pending]
            ).astype(np.float32)
            self._write_shard(canvas.array_path(QUANT_ARRAY), start, params, self._compressors[QUANT_ARRAY])
            state.num_params = params.shape[1]
        if state.pending_regions:
            self._write_shard(canvas.array_path(REGION_ARRAY), start, np.stack(state.pending_regions), self._compressors[QUANT_ARRAY])
        state.flushed = start + len(state.pending)
        state.pending = []
        state.pending_regions = []

    def _write_metadata(self) -> None:
        """zarr.json of the part's groups and arrays, for the rows written (zarr-python's documents)."""
        if not self._records:
            return
        part = (LAYOUT["parts"], self.part_dir)
        arrays = []  # (path, rows, view shape, dtype, codec)
        for state in self._canvas_rows:
            if not state.rows:
                continue
            canvas = state.canvas
            arrays += [
                (canvas.array_path(spec.name), state.rows, spec.shape, str(spec.target_codec.dtype), spec.target_codec.name)
                for spec in state.specs
            ]
            if state.quantized:
                arrays.append((canvas.array_path(QUANT_ARRAY), state.rows, (state.num_params,), "float32", PARAMS_CODEC))
            if state.num_points:
                arrays.append((canvas.array_path(REGION_ARRAY), state.rows, (-(-state.num_points // 8),), "uint8", PARAMS_CODEC))
        groups = {"/".join(path.split("/")[:depth]) for path, *_ in arrays for depth in range(1, path.count("/") + 1)}
        for group in sorted(groups) + [""]:
            self._location.write_file(self._location.path(*part, group, "zarr.json"), _GROUP_METADATA)
        for path, rows, view_shape, dtype, codec_name in arrays:
            document = dict(_array_metadata(tuple(view_shape), dtype, codec_name, self._views_per_shard))
            document["shape"] = [rows, *view_shape]
            self._location.write_file(self._location.path(*part, path, "zarr.json"), json.dumps(document, indent=2).encode())

    def commit(self) -> dict:
        """Write the remaining arrays, then publish the part's manifest entry atomically.

        Returns:
            ``{"part_id", "part_dir", "num_views", "committed_at_ns"}``.
        Raises:
            PartExistsError: another attempt of this part id committed first (this attempt's
                arrays are removed).
        """
        self._check_open("commit")
        try:
            self._flush()
            self._write_metadata()
        except BaseException:
            self.abort()
            raise
        committed_at = time.time_ns()
        rows = {name: [r[name] for r in self._records] for name in ("image_id", "view_id", "view", "content_hash", "valid_region", "row", "checksum", "canvas")}
        data = part_entry_bytes(
            part_id=self.part_id,
            part_dir=self.part_dir,
            committed_at_ns=committed_at,
            targets=[spec.name for spec in self._specs],
            fidelity=self._fidelity.stats,
            writer={"host": socket.gethostname(), "pid": os.getpid()},
            rows=rows,
            origin=self.origin,
            region=None if self.store.region is None else {"stored_points": self._region_points[0], "points": self._region_points[1]},
        )
        path = self._location.path(LAYOUT["manifest_parts"], f"{self.part_id}.parquet")
        try:
            self._location.publish(path, data, exclusive=True)
        except FileExistsError:
            self.abort()
            raise PartExistsError(
                f"PartWriter.commit() expects part {self.part_id!r} to be committed once. Got an earlier commit in {self.store.url}; this attempt was discarded."
            ) from None
        self._state = "committed"
        return {"part_id": self.part_id, "part_dir": self.part_dir, "num_views": len(self._records), "committed_at_ns": committed_at}

    def abort(self) -> None:
        """Discard the part: remove what it wrote. Safe to call more than once."""
        if self._state == "committed":
            raise PartStateError(f"PartWriter.abort() expects an uncommitted part. Got part {self.part_id!r} already committed.")
        self._state = "aborted"
        for state in self._canvas_rows:
            state.pending = []
            state.pending_regions = []
        self._location.remove_tree(self.part_path)
