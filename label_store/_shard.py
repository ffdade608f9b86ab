"""Direct reading and writing of the sharded zarr v3 arrays this package stores.

The store is plain zarr v3 that any zarr reader opens, but going through zarr-python costs
about 1.5 ms of event-loop overhead per array and view to read (~25 ms for the 16 arrays of
a view) and ~0.5 ms per array and view to write (more than the compression itself). This
module reads the bytes with one batched range read per step and decodes them with the same
numcodecs codecs, and builds shard files in memory with those codecs for the writer (array
metadata still comes from zarr-python, see `label_store.writer`), following the zarr v3
``sharding_indexed`` specification:

    shard file  = inner chunks ..., then the index (``index_location: end``)
    index       = S x (offset uint64, nbytes uint64) little-endian, then crc32c (4 bytes);
                  an empty inner chunk is (2**64 - 1, 2**64 - 1)
    inner chunk = codec output: ``bytes`` -> optional ``zstd`` | ``blosc`` -> ``crc32c``

Only the layouts `label_store.writer` creates are accepted (one view per inner chunk,
views along axis 0, default chunk keys); anything else raises `StoreFormatError`.
tests/label_store check this reader against zarr-python on the same arrays, and that the
shard files `encode_shard` builds are byte for byte those zarr-python writes.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numcodecs import Blosc, Zstd
from numcodecs.checksum32 import crc32c_checksum

from label_store.errors import CorruptDataError, StoreFormatError

_EMPTY = np.uint64(2**64 - 1)
_ZSTD = Zstd()
_BLOSC = Blosc()


@dataclass(frozen=True, slots=True)
class ShardedArray:
    """What the reader needs to know about one stored array (parsed from its zarr.json)."""

    path: str
    """Array directory inside the filesystem (no trailing slash)."""
    shape: tuple[int, ...]
    """Full array shape; axis 0 is the view row."""
    dtype: np.dtype
    """Stored dtype (little-endian)."""
    views_per_shard: int
    """S: rows per shard file."""
    compressor: str
    """``"none"``, ``"zstd"`` or ``"blosc"``."""
    fill_value: float
    """Value of an inner chunk that the index marks empty."""

    @classmethod
    def from_metadata(cls, path: str, metadata: bytes | str) -> "ShardedArray":
        where = f"{path}/zarr.json"
        try:
            meta = json.loads(metadata)
            shape = tuple(int(v) for v in meta["shape"])
            outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            (sharding,) = meta["codecs"]
            config = sharding["configuration"]
            inner = tuple(config["chunk_shape"])
            codecs = [c["name"] for c in config["codecs"]]
            index_codecs = [c["name"] for c in config["index_codecs"]]
            separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
            key_encoding = meta["chunk_key_encoding"]["name"]
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            endian = config["codecs"][0].get("configuration", {}).get("endian", "little")
        except (KeyError, ValueError, TypeError) as error:
            raise StoreFormatError(f"ShardedArray expects zarr v3 sharded array metadata at {where}. Got an unreadable file: {error!r}.") from None
        if (
            sharding["name"] != "sharding_indexed"
            or config.get("index_location", "end") != "end"
            or index_codecs != ["bytes", "crc32c"]
            or codecs[0] != "bytes"
            or codecs[-1] != "crc32c"
            or len(codecs) > 3
            or (len(codecs) == 3 and codecs[1] not in ("zstd", "blosc"))
            or inner != (1, *shape[1:])
            or outer[1:] != shape[1:]
            or key_encoding != "default"
            or separator != "/"
            or (dtype.itemsize > 1 and endian != "little")
        ):
            raise StoreFormatError(
                f"ShardedArray expects the layout label_store writes (one view per inner chunk, bytes[+zstd|blosc]+crc32c, "
                f"index at the end). Got codecs {codecs}, index {index_codecs}, chunks {inner} in shards {outer} at {where}."
            )
        return cls(
            path=path,
            shape=shape,
            dtype=dtype,
            views_per_shard=int(outer[0]),
            compressor=codecs[1] if len(codecs) == 3 else "none",
            fill_value=float(meta.get("fill_value") or 0),
        )

    @property
    def view_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def index_nbytes(self) -> int:
        return 16 * self.views_per_shard + 4

    def shard_path(self, row: int) -> str:
        return f"{self.path}/{shard_key(row, self.views_per_shard, len(self.shape))}"

    def decode_chunk(self, raw: bytes | memoryview, where: str) -> np.ndarray:
        """Check the crc32c, decompress, and shape one inner chunk: array[view_shape]."""
        buffer = memoryview(raw)
        if len(buffer) < 4:
            raise CorruptDataError(f"chunk of {len(buffer)} bytes is shorter than its crc32c in {where}")
        body = buffer[:-4]
        (stored,) = struct.unpack("<I", buffer[-4:])
        if crc32c_checksum(np.frombuffer(body, np.uint8)) != stored:
            raise CorruptDataError(f"chunk crc32c mismatch in {where}")
        try:
            if self.compressor == "zstd":
                body = _ZSTD.decode(body)
            elif self.compressor == "blosc":
                body = _BLOSC.decode(body)
        except Exception as error:  # numcodecs raises RuntimeError / ValueError variants
            raise CorruptDataError(f"chunk decompression failed in {where}: {error}") from None
        count = int(np.prod(self.view_shape))
        if len(body) != count * self.dtype.itemsize:
            raise CorruptDataError(f"chunk holds {len(body)} bytes, expected {count * self.dtype.itemsize} in {where}")
        return np.frombuffer(body, self.dtype, count).reshape(self.view_shape)

    def parse_index(self, raw: bytes, where: str) -> np.ndarray:
        """array[S, 2] uint64 of (offset, nbytes) from a shard's trailing index."""
        if len(raw) != self.index_nbytes:
            raise CorruptDataError(f"shard index of {len(raw)} bytes, expected {self.index_nbytes} (truncated shard?) in {where}")
        body, (stored,) = raw[:-4], struct.unpack("<I", raw[-4:])
        if crc32c_checksum(np.frombuffer(body, np.uint8)) != stored:
            raise CorruptDataError(f"shard index crc32c mismatch (truncated or overwritten shard) in {where}")
        return np.frombuffer(body, "<u8").reshape(self.views_per_shard, 2)


def encode_shard(rows: np.ndarray, views_per_shard: int, compressor) -> bytes:
    """One shard file: rows ``[n, ...]`` (n <= S) as inner chunks 0..n-1, the rest empty.

    Each inner chunk is the row's little-endian bytes, compressed by ``compressor`` (a
    numcodecs codec, or None for none), then its crc32c; the index follows, as zarr-python
    writes it for an array whose last shard is partial.

    Args:
        rows: array[n, ...] of one shard's views, 1 <= n <= ``views_per_shard``.
        views_per_shard: S, the shard's rows (the array's outer chunk along axis 0).
        compressor: what `TargetCodec.numcodecs_compressor` returns.
    """
    count = len(rows)
    if not 1 <= count <= views_per_shard:
        raise ValueError(f"encode_shard(rows=) expects 1 to {views_per_shard} rows. Got {count}.")
    little = rows.astype(rows.dtype.newbyteorder("<"), copy=False)
    chunks, index, offset = [], np.full((views_per_shard, 2), _EMPTY, dtype="<u8"), 0
    for row in range(count):
        body = np.ascontiguousarray(little[row]).tobytes()
        if compressor is not None:
            body = bytes(compressor.encode(body))
        chunk = body + struct.pack("<I", crc32c_checksum(np.frombuffer(body, np.uint8)))
        index[row] = (offset, len(chunk))
        offset += len(chunk)
        chunks.append(chunk)
    index_bytes = index.tobytes()
    chunks += [index_bytes, struct.pack("<I", crc32c_checksum(np.frombuffer(index_bytes, np.uint8)))]
    return b"".join(chunks)


def shard_key(row: int, views_per_shard: int, ndim: int) -> str:
    """Path of the shard holding ``row`` inside its array directory (default chunk keys, ``/``)."""
    return f"c/{row // views_per_shard}" + "/0" * (ndim - 1)


class RangeSource:
    """Byte-range reads: positional reads for local files, fsspec ``cat_ranges`` otherwise."""

    def __init__(self, fs, is_local: bool) -> None:
        self.fs = fs
        self.is_local = is_local

    def read(self, paths: Sequence[str], starts: Sequence[int], ends: Sequence[int | None]) -> list[bytes | Exception]:
        """``end=None`` with a negative ``start`` reads the last ``-start`` bytes (a suffix)."""
        if not paths:
            return []
        if self.is_local:
            out: list[bytes | Exception] = []
            for path, start, end in zip(paths, starts, ends):
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        if end is None:
                            size = os.fstat(fd).st_size
                            begin = max(0, size + start) if start < 0 else start
                            out.append(os.pread(fd, size - begin, begin))
                        else:
                            out.append(os.pread(fd, end - start, start))
                    finally:
                        os.close(fd)
                except OSError as error:
                    out.append(error)
            return out
        return self.fs.cat_ranges(list(paths), list(starts), list(ends), on_error="return")


class ChunkReader:
    """Reads inner chunks of `ShardedArray` rows, with an LRU cache of shard indexes."""

    def __init__(self, source: RangeSource, cache_size: int = 8192) -> None:
        self.source = source
        self.cache_size = cache_size
        self._indexes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # readers may share one process state across threads

    def _index(self, items: Sequence[tuple[ShardedArray, int]]) -> dict[str, np.ndarray | Exception]:
        wanted: dict[str, ShardedArray] = {}
        found: dict[str, np.ndarray | Exception] = {}
        with self._lock:
            for array, row in items:
                path = array.shard_path(row)
                cached = self._indexes.get(path)
                if cached is not None:
                    self._indexes.move_to_end(path)
                    found[path] = cached
                else:
                    wanted[path] = array
        paths = list(wanted)
        raws = self.source.read(paths, [-wanted[p].index_nbytes for p in paths], [None] * len(paths))
        for path, raw in zip(paths, raws):
            if isinstance(raw, FileNotFoundError):
                found[path] = CorruptDataError(f"shard file missing: {path}")
                continue
            if isinstance(raw, Exception):
                found[path] = CorruptDataError(f"shard index unreadable in {path}: {raw!r}")
                continue
            try:
                index = wanted[path].parse_index(raw, path)
            except CorruptDataError as error:
                found[path] = error
                continue
            found[path] = index
            with self._lock:
                self._indexes[path] = index
                if len(self._indexes) > self.cache_size:
                    self._indexes.popitem(last=False)
        return found

    def fetch(self, items: Sequence[tuple[ShardedArray, int]]) -> list[bytes | np.ndarray | Exception]:
        """Raw (still encoded) bytes of each requested chunk, or an Exception for that item.

        An inner chunk marked empty comes back as a filled array (zarr's semantics).
        Contiguous chunks of one shard file are fetched in one range.
        """
        indexes = self._index(items)
        out: list[bytes | np.ndarray | Exception | None] = [None] * len(items)
        spans: dict[str, list[tuple[int, int, int]]] = {}
        for position, (array, row) in enumerate(items):
            path = array.shard_path(row)
            index = indexes[path]
            if isinstance(index, Exception):
                out[position] = index
                continue
            offset, nbytes = index[row % array.views_per_shard]
            if offset == _EMPTY and nbytes == _EMPTY:
                out[position] = np.full(array.view_shape, array.fill_value, array.dtype)
                continue
            spans.setdefault(path, []).append((int(offset), int(offset + nbytes), position))
        paths, starts, ends, members = [], [], [], []
        for path, ranges in spans.items():
            ranges.sort()
            group = [ranges[0]]
            for item in ranges[1:]:
                if item[0] == group[-1][1]:
                    group.append(item)
                    continue
                paths.append(path), starts.append(group[0][0]), ends.append(group[-1][1]), members.append(group)
                group = [item]
            paths.append(path), starts.append(group[0][0]), ends.append(group[-1][1]), members.append(group)
        raws = self.source.read(paths, starts, ends)
        for path, start, end, group, raw in zip(paths, starts, ends, members, raws):
            for chunk_start, chunk_end, position in group:
                if isinstance(raw, Exception):
                    out[position] = CorruptDataError(f"chunk unreadable in {path}: {raw!r}")
                elif len(raw) < end - start:
                    out[position] = CorruptDataError(f"shard file truncated: chunk at bytes {chunk_start}..{chunk_end} is past the end of {path}")
                else:
                    out[position] = memoryview(raw)[chunk_start - start : chunk_end - start]
        return out  # type: ignore[return-value]

    def forget(self, paths: Sequence[str] | None = None) -> None:
        """Drop cached indexes (all, or those of the given shard paths)."""
        with self._lock:
            if paths is None:
                self._indexes.clear()
            for path in paths or ():
                self._indexes.pop(path, None)
