"""The manifest: store metadata in the root group, committed parts and failures in Parquet.

Readers and writers meet only here: a part's arrays are invisible until its entry file
``manifest/parts/<part_id>.parquet`` exists, and that file appears atomically.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from label_store._fs import LAYOUT, Location
from label_store.errors import SchemaVersionError, StoreFormatError, StoreNotFoundError
from label_store.schema import (
    FIRST_REGION_SCHEMA_VERSION,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    StoreCanvas,
    StoreRegion,
    TargetSpec,
    TeacherFingerprint,
    region_layout,
    store_canvases,
)

ROOT_KEY = "label_store"
"""Key of the store metadata in the root group's zarr attributes."""
META_KEY = b"label_store"
"""Key of a part entry's metadata in its Parquet schema metadata."""

MAX_IMAGE_ID = 1 << 43
MAX_VIEW_ID = 1 << 20

PART_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("view_id", pa.int64(), nullable=False),
        pa.field("view", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("valid_region", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("checksum", pa.string(), nullable=False),
        pa.field("canvas", pa.int32(), nullable=False),
    ]
)
"""One row per view of a part: the per-view record (see `label_store.writer`). ``view`` is the
recipe as JSON (image_id, view_id, image_h, image_w, scale, flip, canvas_h, canvas_w,
offset_x, offset_y); ``canvas`` indexes the store's canvases and ``row`` is the view's row in
that canvas's arrays of the part (schema 1 parts have no ``canvas``: 0)."""

FAILURE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("view_id", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("recorded_at_ns", pa.int64(), nullable=False),
    ]
)


def view_key(image_id: np.ndarray | int, view_id: np.ndarray | int):
    """One int64 per view, ordered by (image_id, view_id)."""
    return (np.asarray(image_id, np.int64) << 20) | np.asarray(view_id, np.int64)


@dataclass(frozen=True, slots=True)
class StoreMeta:
    """The store-level metadata kept in the root group's attributes."""

    schema_version: int
    """On-disk layout version (`label_store.schema.SCHEMA_VERSION`)."""
    fingerprint: TeacherFingerprint
    """The one teacher whose outputs the store holds."""
    targets: tuple[TargetSpec, ...]
    """Stored targets in checksum / blob order."""
    views_per_shard: int
    """Default number of views per shard file for new parts."""
    created_at: str
    """ISO-8601 creation time (UTC)."""
    canvases: tuple[StoreCanvas, ...] = ()
    """The store's canvases in index order; empty means the fingerprint's canvas alone."""
    region: StoreRegion | None = None
    """Region storage of some groups (`StoreRegion`); None: every target dense (stores before schema 3)."""

    def __post_init__(self) -> None:
        if not self.canvases:
            object.__setattr__(self, "canvases", store_canvases(self.targets, [self.fingerprint.canvas_hw]))
        if self.region is not None:
            groups = {t.group for t in self.targets}
            missing = [g for g in self.region.groups if g not in groups]
            if missing:
                raise ValueError(f"StoreMeta(region=) expects region groups the store holds {sorted(groups)}. Got {list(self.region.groups)}.")
            if self.schema_version < FIRST_REGION_SCHEMA_VERSION:
                raise ValueError(f"StoreMeta(region=) expects schema version {FIRST_REGION_SCHEMA_VERSION} or later. Got {self.schema_version}.")

    @property
    def region_layout(self) -> str:
        """The order of the region targets' stored values (`label_store.schema.region_layout`)."""
        return region_layout(self.schema_version)

    def region_targets(self) -> tuple[str, ...]:
        """Names of the targets held only inside the region (none without one)."""
        if self.region is None:
            return ()
        return tuple(t.name for t in self.targets if t.group in self.region.groups)

    def canvas_index(self, canvas_hw: Sequence[int]) -> int:
        """Index of a canvas ``(H, W)`` among the store's, or -1."""
        canvas = (int(canvas_hw[0]), int(canvas_hw[1]))
        for index, item in enumerate(self.canvases):
            if item.canvas_hw == canvas:
                return index
        return -1

    def to_attributes(self) -> dict[str, Any]:
        from label_store.encoding import CHECKSUM_ALGORITHM

        return {
            ROOT_KEY: {
                "schema_version": self.schema_version,
                "fingerprint": self.fingerprint.to_dict(),
                "targets": [t.to_dict() for t in self.targets],
                "views_per_shard": self.views_per_shard,
                "created_at": self.created_at,
                "checksum": CHECKSUM_ALGORITHM,
                "canvases": [c.to_dict() for c in self.canvases],
                **({} if self.region is None else {"region": self.region.to_dict()}),
                "layout": {
                    "parts/<part_dir>/<group>/<level>": "codes[N, C, H, W] of the first canvas's views, one view per inner chunk, views_per_shard per shard",
                    "parts/<part_dir>/quant": "float32[N, P]: per view, for each int-coded target in order, scale[Pc] then offset[Pc]",
                    **({} if self.region is None else {
                        "parts/<part_dir>/region": "uint8[N, ceil(A / 8)]: per view, the points (all levels, level-major, row-major; "
                        "numpy packbits, big bit order) where the region groups are stored, in the region layout of "
                        "label_store.codecs.TargetCodec.stored_codes (kept points first, then zeros)",
                    }),
                    "parts/<part_dir>/<canvas path>/...": "the same arrays for the views of each other canvas (canvases[i].path)",
                    "manifest/parts/<part_id>.parquet": "committed part: one row per view; its existence commits the part",
                    "manifest/failures/*.parquet": "views that could not be produced, with the reason",
                },
            }
        }

    @classmethod
    def from_attributes(cls, attributes: dict[str, Any], url: str) -> "StoreMeta":
        meta = attributes.get(ROOT_KEY)
        if not isinstance(meta, dict):
            raise StoreNotFoundError(
                f"open_store(url=) expects a label store at {url!r}. Got a zarr group without '{ROOT_KEY}' attributes."
            )
        version = meta.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise SchemaVersionError(
                f"open_store(url=) expects schema version {' or '.join(map(str, READABLE_SCHEMA_VERSIONS))} at {url!r}. Got {version!r}; "
                f"{'upgrade label_store to read it' if isinstance(version, int) and version > max(READABLE_SCHEMA_VERSIONS) else 'the store was not written by this package'}."
            )
        try:
            return cls(
                schema_version=version,
                fingerprint=TeacherFingerprint.from_dict(meta["fingerprint"]),
                targets=tuple(TargetSpec.from_dict(t) for t in meta["targets"]),
                views_per_shard=int(meta["views_per_shard"]),
                created_at=str(meta.get("created_at", "")),
                canvases=tuple(StoreCanvas.from_dict(c) for c in meta.get("canvases", ())),
                region=None if meta.get("region") is None else StoreRegion.from_dict(meta["region"]),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise StoreFormatError(f"open_store(url=) expects valid label_store attributes at {url!r}. Got: {error}") from None


def read_store_meta(location: Location) -> StoreMeta:
    """Parse the root group's zarr.json. Raises `StoreNotFoundError` if there is none."""
    path = location.path("zarr.json")
    location.refresh(location.root)
    try:
        raw = location.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFoundError(f"open_store(url=) expects a label store at {location.url!r}. Got no zarr.json there; create it with create_store().") from None
    try:
        group = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StoreFormatError(f"open_store(url=) expects JSON in {path}. Got an unreadable file: {error}.") from None
    if group.get("node_type") != "group" or group.get("zarr_format") != 3:
        raise StoreNotFoundError(f"open_store(url=) expects a zarr v3 group at {location.url!r}. Got {group.get('node_type')!r} (zarr_format {group.get('zarr_format')!r}).")
    return StoreMeta.from_attributes(group.get("attributes", {}), location.url)


@dataclass(frozen=True, slots=True)
class PartEntry:
    """One committed part, as read back from its manifest file."""

    part_id: str
    """Caller-chosen id (one writer task)."""
    part_dir: str
    """Directory name under ``parts/`` holding its arrays (id plus an attempt suffix)."""
    committed_at_ns: int
    """Commit time; the earlier commit wins when two parts hold the same view."""
    num_views: int
    """Rows in the part's arrays."""
    targets: tuple[str, ...]
    """Target names the part stores, in array order."""
    fidelity: dict
    """Fidelity sums of the views this part sampled (`label_store.fidelity.FidelityAccumulator`)."""
    table: pa.Table
    """`PART_SCHEMA` rows."""
    origin: str = "precompute"
    """Where the part's targets came from: ``precompute`` (a precompute job; parts written
    before the field existed read as this) or ``endpoint`` (fetched by a read-through trainer)."""
    region: dict | None = None
    """Region storage counts of the part, ``{"stored_points", "points"}`` summed over its views
    (None in a dense store)."""


PART_ORIGINS = ("precompute", "endpoint")
"""The values of `PartEntry.origin`."""


def part_entry_bytes(
    *, part_id: str, part_dir: str, committed_at_ns: int, targets: Sequence[str], fidelity: dict, writer: dict, rows: dict[str, list],
    origin: str = "precompute",
    region: dict | None = None,
) -> bytes:
    table = pa.Table.from_pydict(rows, schema=PART_SCHEMA)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "part_id": part_id,
        "part_dir": part_dir,
        "committed_at_ns": committed_at_ns,
        "num_views": table.num_rows,
        "targets": list(targets),
        "fidelity": fidelity,
        "writer": writer,
        "origin": origin,
        **({} if region is None else {"region": region}),
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parse_part_entry(raw: bytes, path: str) -> PartEntry:
    try:
        table = pq.read_table(pa.BufferReader(raw))
        meta = json.loads(table.schema.metadata[META_KEY])
        table = table.replace_schema_metadata(None)
        if "canvas" not in table.column_names:  # schema 1: one canvas
            table = table.append_column("canvas", pa.array(np.zeros(table.num_rows, np.int32)))
        table = table.cast(PART_SCHEMA)
        return PartEntry(
            part_id=meta["part_id"],
            part_dir=meta["part_dir"],
            committed_at_ns=int(meta["committed_at_ns"]),
            num_views=int(meta["num_views"]),
            targets=tuple(meta["targets"]),
            fidelity=meta["fidelity"],
            table=table,
            origin=str(meta.get("origin", "precompute")),
            region=meta.get("region"),
        )
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise StoreFormatError(f"manifest entry {path} is unreadable: {error!r}") from None


def load_parts(location: Location) -> list[PartEntry]:
    """Every committed part, ordered by (commit time, part id): the first holder of a view wins."""
    directory = location.path(LAYOUT["manifest_parts"])
    names = location.list_names(directory, ".parquet")
    paths = [f"{directory}/{name}" for name in names]
    entries = [parse_part_entry(raw, path) for raw, path in zip(location.read_many(paths), paths)]
    return sorted(entries, key=lambda e: (e.committed_at_ns, e.part_id))


def load_failures(location: Location) -> pa.Table:
    directory = location.path(LAYOUT["manifest_failures"])
    names = location.list_names(directory, ".parquet")
    paths = [f"{directory}/{name}" for name in names]
    tables = []
    for raw, path in zip(location.read_many(paths), paths):
        try:
            tables.append(pq.read_table(pa.BufferReader(raw)).cast(FAILURE_SCHEMA))
        except Exception as error:
            raise StoreFormatError(f"failures file {path} is unreadable: {error!r}") from None
    return pa.concat_tables(tables) if tables else FAILURE_SCHEMA.empty_table()


def failures_bytes(rows: Sequence[dict], recorded_at_ns: int) -> bytes:
    table = pa.Table.from_pydict(
        {
            "image_id": [int(r["image_id"]) for r in rows],
            "view_id": [int(r["view_id"]) for r in rows],
            "reason": [str(r["reason"]) for r in rows],
            "recorded_at_ns": [recorded_at_ns] * len(rows),
        },
        schema=FAILURE_SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
