"""Reading a store: float32 targets per view, checked against the teacher the caller expects.

Legend: C channels, H x W one level's map; every target of a view is float32 array[C, H, W].

A `StoreReader` is a snapshot of the committed parts at `open_store` time (`refresh()`
takes a new one). It holds no open files or sockets when pickled: a torch DataLoader
worker (fork or spawn) re-opens its filesystem, shard-index cache and decode threads on
first use. Reads go straight to the shard files (`label_store._shard`): one batched
range read for the shard indexes not yet cached, one for the chunks (contiguous chunks
of a shard merged), then decompression and dequantization on a thread pool.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from label_store._fs import LAYOUT, QUANT_ARRAY, Location
from label_store._manifest import PartEntry, StoreMeta, load_parts, read_store_meta, view_key
from label_store._shard import ChunkReader, RangeSource, ShardedArray
from label_store.encoding import EncodedTarget, iter_blob
from label_store.errors import CorruptDataError, FingerprintMismatchError, StoreFormatError, ViewNotFoundError
from label_store.fidelity import FidelityAccumulator, group_summary
from label_store.schema import REGION_ARRAY, StoreCanvas, StoreRegion, TargetSpec, TeacherFingerprint, region_num_points, target_stride


def read_store_targets(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[TargetSpec, ...]:
    """The target specs a store was created with (no parts needed). Raises `StoreNotFoundError`."""
    return tuple(read_store_meta(Location(url, dict(storage_options or {}))).targets)


def check_fingerprint(
    stored: TeacherFingerprint,
    expected: TeacherFingerprint | Mapping[str, Any] | None,
    heading: str,
    fix: str = "",
) -> None:
    """Raise `FingerprintMismatchError` (``heading``, one line per difference, ``fix``) when
    ``expected`` is given and differs from the store's ``stored`` fingerprint."""
    if expected is None:
        return
    if not isinstance(expected, TeacherFingerprint):
        expected = TeacherFingerprint.from_dict(expected)
    differences = stored.diff(expected)
    if differences:
        raise FingerprintMismatchError(heading + "\n  - " + "\n  - ".join(differences) + fix)


def open_store(
    url: str,
    *,
    expected_fingerprint: TeacherFingerprint | Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> "StoreReader":
    """Open a label store for reading.

    Args:
        url: store root (local path or fsspec URL).
        expected_fingerprint: the teacher the caller trains against; any difference raises.
        storage_options: fsspec options.
        threads: decode threads for `StoreReader.read_many` (default ``min(4, cpu_count)``;
            1 decodes in the calling thread).
    Raises:
        StoreNotFoundError: no store at ``url``.
        SchemaVersionError: a schema version this package does not read.
        FingerprintMismatchError: the store's teacher differs from ``expected_fingerprint``.
    """
    location = Location(url, dict(storage_options or {}))
    meta = read_store_meta(location)
    check_fingerprint(
        meta.fingerprint,
        expected_fingerprint,
        f"open_store(expected_fingerprint=) expects the teacher of the store at {url!r}. Got differences:",
        "\nTrain against the teacher that wrote this store, or point --store at one written by yours.",
    )
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"open_store(threads=) expects a positive int. Got {threads!r}.")
    return StoreReader(location, meta, load_parts(location), threads or min(4, os.cpu_count() or 1))


class _ProcessState:
    """Per-process handles: never pickled, rebuilt after fork/spawn."""

    def __init__(self, location: Location, threads: int) -> None:
        self.pid = os.getpid()
        self.chunks = ChunkReader(RangeSource(location.fs, location.is_local))
        self.arrays: dict[tuple[int, str], ShardedArray] = {}
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="label-store-decode") if threads > 1 else None


class StoreReader:
    """Committed views of a store, decoded to float32. Safe to pickle into worker processes."""

    def __init__(self, location: Location, meta: StoreMeta, parts: Sequence[PartEntry], threads: int) -> None:
        self._location = location
        self._meta = meta
        self._threads = threads
        self._parts = list(parts)
        stored = [spec.name for spec in meta.targets]
        for entry in self._parts:
            if list(entry.targets) != stored:
                raise StoreFormatError(
                    f"open_store expects every part to store the targets {stored}. Got {list(entry.targets)} in part {entry.part_id!r} of {location.url}."
                )
        tables = [
            entry.table.append_column("part_index", pa.array(np.full(entry.table.num_rows, index, np.int32)))
            for index, entry in enumerate(self._parts)
        ]
        self._table = pa.concat_tables(tables) if tables else None
        if self._table is not None and self._table.num_rows:
            keys = view_key(self._table.column("image_id").to_numpy(), self._table.column("view_id").to_numpy())
            # np.unique keeps the first occurrence: parts are in commit order, so the first commit wins.
            self._keys, self._winners = np.unique(keys, return_index=True)
            self._part_index = self._table.column("part_index").to_numpy()
            self._rows = self._table.column("row").to_numpy()
            self._canvas = self._table.column("canvas").to_numpy()
            if self._canvas.size and (self._canvas.min() < 0 or self._canvas.max() >= len(meta.canvases)):
                raise StoreFormatError(
                    f"open_store expects manifest canvas indexes below {len(meta.canvases)} in {location.url}. Got {int(self._canvas.max())}."
                )
        else:
            self._keys = np.zeros(0, np.int64)
            self._winners = np.zeros(0, np.int64)
            self._part_index = np.zeros(0, np.int32)
            self._rows = np.zeros(0, np.int32)
            self._canvas = np.zeros(0, np.int32)
        self._specs = {spec.name: spec for spec in meta.targets}
        self._region_targets = set(meta.region_targets())
        self._param_slices: dict[str, tuple[int, int]] = {}
        start = 0
        for spec in meta.targets:
            count = spec.target_codec.num_params(spec.shape[0])
            if count:
                self._param_slices[spec.name] = (start, count)
                start += 2 * count
        self._state: _ProcessState | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_state"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"StoreReader(url={self.url!r}, views={len(self)}, parts={len(self._parts)})"

    def __len__(self) -> int:
        return int(self._keys.size)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return self._find(key) >= 0

    # ---- metadata ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._location.url

    @property
    def fingerprint(self) -> TeacherFingerprint:
        return self._meta.fingerprint

    @property
    def targets(self) -> tuple[TargetSpec, ...]:
        """Target specs in the store's order, with the first canvas's shapes."""
        return self._meta.targets

    @property
    def canvases(self) -> tuple[StoreCanvas, ...]:
        """The store's canvases (`label_store.schema.StoreCanvas`: canvas, array group, target shapes)."""
        return self._meta.canvases

    def canvas_of(self, image_id: int, view_id: int) -> StoreCanvas:
        """The canvas a committed view was stored on."""
        return self._meta.canvases[int(self._canvas[self._locate((image_id, view_id))])]

    @property
    def schema_version(self) -> int:
        return self._meta.schema_version

    @property
    def region(self) -> StoreRegion | None:
        """Region storage of the store (`label_store.schema.StoreRegion`), or None when every target is dense."""
        return self._meta.region

    def region_share(self) -> float | None:
        """Share of the points whose region groups are stored, over every committed part (None for a dense store)."""
        if self._meta.region is None:
            return None
        stored = sum(int((entry.region or {}).get("stored_points", 0)) for entry in self._parts)
        points = sum(int((entry.region or {}).get("points", 0)) for entry in self._parts)
        return stored / points if points else 0.0

    @property
    def parts(self) -> list[str]:
        """Committed part ids in commit order."""
        return [entry.part_id for entry in self._parts]

    @property
    def fidelity(self) -> dict[str, dict]:
        """Codec fidelity measured at write time, merged over parts.

        ``{"targets": {name: {codec, loss, views, max_abs_error, mean_abs_error,
        loss_rel_error, worst_view_loss_rel_error, grad_rel_error, ...}},
        "groups": {group: {loss_rel_error, worst_level_loss_rel_error, grad_rel_error, ...}}}``
        """
        accumulator = FidelityAccumulator()
        for entry in self._parts:
            accumulator.merge(entry.fidelity)
        report = accumulator.report()
        return {"targets": report, "groups": group_summary(report)}

    def keys(self) -> list[tuple[int, int]]:
        """``(image_id, view_id)`` of every visible view, sorted."""
        return [(int(k >> 20), int(k & ((1 << 20) - 1))) for k in self._keys]

    def views(self) -> pa.Table:
        """Visible per-view records, sorted by (image_id, view_id): image_id, view_id, view,
        content_hash, valid_region, row, checksum, canvas (index into `canvases`), part."""
        if self._table is None:
            from label_store._manifest import PART_SCHEMA

            return PART_SCHEMA.empty_table().append_column("part", pa.array([], pa.string()))
        table = self._table.take(pa.array(self._winners))
        part_ids = np.array([entry.part_id for entry in self._parts], dtype=object)
        parts = pa.array(part_ids[table.column("part_index").to_numpy()].tolist(), pa.string())
        return table.drop_columns(["part_index"]).append_column("part", parts)

    def _find(self, key: tuple[int, int]) -> int:
        """Row of the winning record in the concatenated table, or -1."""
        try:
            image_id, view_id = int(key[0]), int(key[1])
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"StoreReader expects a key (image_id, view_id). Got {key!r}.") from None
        if image_id < 0 or view_id < 0 or view_id >= 1 << 20:
            return -1
        packed = int(view_key(image_id, view_id))
        position = int(np.searchsorted(self._keys, packed))
        if position < self._keys.size and self._keys[position] == packed:
            return int(self._winners[position])
        return -1

    def _locate(self, key: tuple[int, int]) -> int:
        index = self._find(key)
        if index < 0:
            raise ViewNotFoundError(
                f"StoreReader expects a committed view. Got image_id={key[0]} view_id={key[1]}, not in {self.url} "
                f"({len(self)} views); it may have failed (see failures) or not be committed yet (refresh())."
            )
        return index

    def record(self, image_id: int, view_id: int) -> dict:
        """The view's record: image_id, view_id, view (JSON), content_hash, valid_region, part, row, checksum."""
        index = self._locate((image_id, view_id))
        row = self._table.slice(index, 1).to_pylist()[0]
        row["valid_region"] = tuple(row["valid_region"])
        row["part"] = self._parts[row.pop("part_index")].part_id
        return row

    def refresh(self) -> "StoreReader":
        """A new reader that also sees the parts committed since this one was opened."""
        return StoreReader(self._location, self._meta, load_parts(self._location), self._threads)

    def refresh_if_changed(self) -> "StoreReader":
        """`refresh` when the manifest lists parts this reader lacks (one directory listing), else self."""
        directory = self._location.path(LAYOUT["manifest_parts"])
        self._location.refresh(directory)
        listed = {name[: -len(".parquet")] for name in self._location.list_names(directory, ".parquet")}
        return self.refresh() if listed - set(self.parts) else self

    # ---- data ---------------------------------------------------------------------

    def _process(self) -> _ProcessState:
        if self._state is None or self._state.pid != os.getpid():
            self._state = _ProcessState(self._location, self._threads)
        return self._state

    def _arrays_for(self, part_canvases: Iterable[tuple[int, int]], names: Sequence[str]) -> dict[tuple[int, int, str], ShardedArray]:
        state = self._process()
        missing = [(p, c, n) for p, c in sorted(set(part_canvases)) for n in names if (p, c, n) not in state.arrays]
        if missing:
            prefix = self._location.path(LAYOUT["parts"])
            canvases = self._meta.canvases
            paths = [f"{prefix}/{self._parts[p].part_dir}/{canvases[c].array_path(n)}" for p, c, n in missing]
            try:
                raws = self._location.read_many([f"{path}/zarr.json" for path in paths])
            except FileNotFoundError as error:
                raise CorruptDataError(f"array metadata missing in {self.url}: {error}") from None
            for key, path, raw in zip(missing, paths, raws):
                state.arrays[key] = ShardedArray.from_metadata(path, raw)
        return state.arrays

    def _check_names(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self._specs)
        names = list(names)
        unknown = [n for n in names if n not in self._specs]
        if unknown or not names:
            raise ValueError(f"StoreReader.read(names=) expects names from {list(self._specs)}. Got {names}.")
        return names

    def _read_encoded(self, indexes: Sequence[int], names: Sequence[str]) -> list[dict[str, EncodedTarget] | CorruptDataError]:
        """Stored codes and parameters of the table rows ``indexes`` (errors returned per view)."""
        with_params = any(name in self._param_slices for name in names)
        with_region = any(name in self._region_targets for name in names) or REGION_ARRAY in names
        names = [name for name in names if name != REGION_ARRAY]
        array_names = list(names) + ([QUANT_ARRAY] if with_params else []) + ([REGION_ARRAY] if with_region else [])
        parts = [(int(self._part_index[i]), int(self._canvas[i])) for i in indexes]
        arrays = self._arrays_for(parts, array_names)
        items, valid = [], []
        for index, (part, canvas) in zip(indexes, parts):
            row = int(self._rows[index])
            for name in array_names:
                array = arrays[(part, canvas, name)]
                items.append((array, row))
                valid.append(row < array.shape[0])
        fetched = iter(self._process().chunks.fetch([item for item, ok in zip(items, valid) if ok]))
        raws = [
            next(fetched) if ok else CorruptDataError(f"row {row} is beyond the {array.shape[0]} rows of {array.path}")
            for (array, row), ok in zip(items, valid)
        ]
        width = len(array_names)

        def decode(position: int) -> dict[str, EncodedTarget] | CorruptDataError:
            chunk = {}
            problems = []
            for offset, name in enumerate(array_names):
                array, row = items[position * width + offset]
                raw = raws[position * width + offset]
                if isinstance(raw, Exception):
                    problems.append(str(raw))
                    continue
                try:
                    chunk[name] = raw if isinstance(raw, np.ndarray) else array.decode_chunk(raw, f"{array.shard_path(row)} (row {row})")
                except CorruptDataError as error:
                    problems.append(str(error))
            if problems:
                return CorruptDataError("; ".join(dict.fromkeys(problems)))
            out = {}
            params = chunk.get(QUANT_ARRAY)
            for name in names:
                if name in self._param_slices:
                    start, count = self._param_slices[name]
                    out[name] = EncodedTarget(chunk[name], params[start : start + count], params[start + count : start + 2 * count])
                else:
                    empty = np.zeros(0, np.float32)
                    out[name] = EncodedTarget(chunk[name], empty, empty)
            if with_region:  # the packed mask, carried beside the targets
                empty = np.zeros(0, np.float32)
                out[REGION_ARRAY] = EncodedTarget(chunk[REGION_ARRAY], empty, empty)
            return out

        executor = self._process().executor
        positions = range(len(indexes))
        if executor is None or len(indexes) < 2:
            return [decode(p) for p in positions]
        return list(executor.map(decode, positions))

    def _decode(self, encoded: Mapping[str, EncodedTarget], names: Sequence[str], canvas: int = 0) -> dict[str, np.ndarray]:
        """float32 targets of one view on canvas index ``canvas``; region targets NaN outside the view's mask
        (a store never holds NaN, so a read outside the region cannot pass for a target)."""
        out = {}
        mask = None
        for name in names:
            item = encoded[name]
            keep = None
            if name in self._region_targets:
                if mask is None:
                    mask = self._unpack_region(encoded[REGION_ARRAY].codes, canvas)
                keep = mask[name]
            out[name] = self._specs[name].target_codec.decode(item.codes, item.scale, item.offset, keep, self._meta.region_layout)
        return out

    def _level_slices(self, canvas_hw: tuple[int, int]) -> dict[int, tuple[int, int, int]]:
        """stride -> (start, H, W) of each level in a view's region mask on this canvas."""
        out, start = {}, 0
        for stride in self._meta.fingerprint.strides:
            h, w = -(-canvas_hw[0] // stride), -(-canvas_hw[1] // stride)
            out[stride] = (start, h, w)
            start += h * w
        return out

    def _unpack_region(self, packed: np.ndarray, canvas_index: int) -> dict[str, np.ndarray]:
        """Packed mask of one view on canvas ``canvas_index`` -> name -> bool array[H, W] of every region target."""
        canvas = self._meta.canvases[canvas_index]
        count = region_num_points(canvas, self._meta.fingerprint.strides)
        flat = np.unpackbits(np.asarray(packed, np.uint8).reshape(-1), count=count).astype(bool)
        slices = self._level_slices(canvas.canvas_hw)
        out = {}
        for target in self._region_targets:
            start, h, w = slices[target_stride(self._specs[target])]
            out[target] = flat[start : start + h * w].reshape(h, w)
        return out

    def read_regions(self, keys: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Each view's stored-point mask: bool array[A] over all levels (level-major, row-major).

        Every point for a dense store (all targets stored everywhere). See `label_store.schema.StoreRegion`.
        """
        keys = list(keys)
        indexes = [self._locate(key) for key in keys]
        if self._meta.region is None:
            return [np.ones(region_num_points(self._meta.canvases[int(self._canvas[i])], self._meta.fingerprint.strides), bool) for i in indexes]
        out = []
        for key, index, item in zip(keys, indexes, self._read_encoded(indexes, [REGION_ARRAY])):
            if isinstance(item, CorruptDataError):
                raise CorruptDataError(f"StoreReader.read_regions expects intact data for image_id={key[0]} view_id={key[1]} in {self.url}. Got: {item}.")
            count = region_num_points(self._meta.canvases[int(self._canvas[index])], self._meta.fingerprint.strides)
            out.append(np.unpackbits(np.asarray(item[REGION_ARRAY].codes, np.uint8).reshape(-1), count=count).astype(bool))
        return out

    def read_many(self, keys: Sequence[tuple[int, int]], names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        """Targets of several views (batched reads, parallel decode), in the order of ``keys``.

        Returns:
            One dict per key: name -> float32 array[C, H, W].
        Raises:
            ViewNotFoundError: a key is not a committed view.
            CorruptDataError: stored bytes failed a check (names the view and the file).
        """
        names = self._check_names(names)
        keys = list(keys)
        indexes = [self._locate(key) for key in keys]
        encoded = self._read_encoded(indexes, names)
        out = []
        for key, index, item in zip(keys, indexes, encoded):
            if isinstance(item, CorruptDataError):
                raise CorruptDataError(f"StoreReader.read expects intact data for image_id={key[0]} view_id={key[1]} in {self.url}. Got: {item}; run `distill store verify`.")
            out.append((item, int(self._canvas[index])))
        executor = self._process().executor
        if executor is None or len(out) < 2:
            return [self._decode(item, names, canvas) for item, canvas in out]
        return list(executor.map(lambda pair: self._decode(pair[0], names, pair[1]), out))

    def read(self, image_id: int, view_id: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Targets of one view: name -> float32 array[C, H, W] (all targets, or ``names``)."""
        return self.read_many([(image_id, view_id)], names)[0]

    def read_blob(self, image_id: int, view_id: int) -> bytes:
        """The view exactly as `label_store.encode_targets` lays it out (no re-quantization)."""
        index = self._locate((image_id, view_id))
        (item,) = self._read_encoded([index], list(self._specs))
        if isinstance(item, CorruptDataError):
            raise CorruptDataError(f"StoreReader.read_blob expects intact data for image_id={image_id} view_id={view_id}. Got: {item}.")
        return b"".join(bytes(piece) for piece in iter_blob(self._meta.canvases[int(self._canvas[index])].targets, item))
