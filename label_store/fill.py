"""Filling a store with views fetched after precompute (read-through training), exactly once.

A `StoreFiller` buffers views (record + float32 targets) and commits them as parts of
``part_views`` views with ``origin="endpoint"``. Several fillers may fill one store at the
same time (two trainers, or the ranks of one data-parallel run): every commit happens
under the store's fill lock, ``manifest/fill.lock``, published atomically with the same
exclusive create as a part's manifest entry. Holding it, a filler re-reads the committed
views, drops those another writer committed meanwhile, then writes and commits its part;
so a view is committed once however many trainers fetched it.

A filler that dies leaves what the writer rules leave (`label_store.writer`): an
uncommitted part directory, invisible to readers and removed by `gc_store`; its views
stay missing and are fetched again. A lock left by a dead process on this host, or older
than ``lock_stale_s``, is broken by the next filler.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Mapping

import numpy as np

from label_store._fs import LAYOUT, Location
from label_store._manifest import read_store_meta
from label_store.reader import check_fingerprint
from label_store.schema import TeacherFingerprint
from label_store.writer import Store, _process_start_time

FILL_LOCK = "fill.lock"
"""Name of the fill lock file in ``manifest/``."""
DEFAULT_PART_VIEWS = 64
"""Views per part written by a filler."""


class FillLockTimeout(TimeoutError):
    """The store's fill lock stayed held by a live writer past the wait limit."""


class _FillLock:
    """``manifest/fill.lock``: created exclusively, names its holder, removed on release."""

    def __init__(self, location: Location, *, wait_s: float, stale_s: float) -> None:
        self._location = location
        self._path = location.path(LAYOUT["manifest_parts"].rsplit("/", 1)[0], FILL_LOCK)
        self._wait_s = wait_s
        self._stale_s = stale_s
        self._token = ""

    def _stale(self) -> bool:
        try:
            lease = json.loads(self._location.read_bytes(self._path))
        except FileNotFoundError:
            return False
        except ValueError:
            return True  # a torn lock file: its writer died while writing it
        if lease.get("host") == socket.gethostname():
            started = _process_start_time(int(lease.get("pid", -1)))
            if started is None or (lease.get("pid_start_time") is not None and started != lease["pid_start_time"]):
                return True
        return time.time_ns() - int(lease.get("acquired_at_ns", 0)) > self._stale_s * 1e9

    def acquire(self) -> None:
        self._token = uuid.uuid4().hex
        lease = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start_time": _process_start_time(os.getpid()),
            "token": self._token, "acquired_at_ns": time.time_ns(),
        }
        deadline = time.monotonic() + self._wait_s
        delay = 0.01
        while True:
            try:
                self._location.publish(self._path, json.dumps(lease).encode(), exclusive=True)
                return
            except FileExistsError:
                pass
            if self._stale():
                self._location.remove_tree(self._path)
                continue
            if time.monotonic() > deadline:
                raise FillLockTimeout(
                    f"StoreFiller expects the fill lock {self._path} within {self._wait_s:.0f} s. Got it held by another "
                    "writer; if no trainer fills this store, delete that file."
                )
            time.sleep(delay)  # another trainer is committing: poll with a bounded backoff
            delay = min(0.5, delay * 2)

    def release(self) -> None:
        try:
            lease = json.loads(self._location.read_bytes(self._path))
        except (FileNotFoundError, ValueError):
            return
        if lease.get("token") == self._token:
            self._location.remove_tree(self._path)

    def __enter__(self) -> "_FillLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StoreFiller:
    """Buffers fetched views and commits them to an existing store, each view once.

    Args:
        url: the store (local path or fsspec URL); it must exist.
        expected_fingerprint: the teacher the targets came from; another store teacher is
            refused (`FingerprintMismatchError`).
        part_views: N, views per committed part; `add` commits when N are buffered.
        storage_options: fsspec options.
        lock_wait_s: how long to wait for another writer's commit.
        lock_stale_s: a lock older than this is taken as left by a dead writer elsewhere.
        background: commit full parts in one background thread (`add` returns at once);
            `flush` and `close` wait for them and raise their errors.

    Attributes:
        committed_views: views this filler committed.
        skipped_views: views it dropped because another writer had committed them.
    """

    def __init__(
        self,
        url: str,
        *,
        expected_fingerprint: TeacherFingerprint | Mapping[str, Any] | None = None,
        part_views: int = DEFAULT_PART_VIEWS,
        storage_options: Mapping[str, Any] | None = None,
        lock_wait_s: float = 600.0,
        lock_stale_s: float = 600.0,
        background: bool = False,
    ) -> None:
        if not isinstance(part_views, int) or part_views < 1:
            raise ValueError(f"StoreFiller(part_views=) expects a positive int. Got {part_views!r}.")
        location = Location(str(url), dict(storage_options or {}))
        meta = read_store_meta(location)
        check_fingerprint(
            meta.fingerprint, expected_fingerprint, f"StoreFiller(url={url!r}) expects a store of the teacher that produced the targets:"
        )
        self._store = Store(location, meta, meta.views_per_shard)
        self._lock = _FillLock(location, wait_s=lock_wait_s, stale_s=lock_stale_s)
        self.part_views = part_views
        self._buffer: dict[tuple[int, int], tuple[dict, dict[str, np.ndarray]]] = {}
        self._known: set[tuple[int, int]] = set()
        self._mutex = threading.Lock()
        self.committed_views = 0
        self.skipped_views = 0
        self.parts: list[str] = []
        self._executor = None
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-filler")
        self._futures: list[Any] = []

    @property
    def url(self) -> str:
        return self._store.url

    @property
    def target_names(self) -> list[str]:
        """Every target of the store: what `add` needs per view."""
        return [spec.name for spec in self._store.targets]

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def add(self, record: Mapping[str, Any], targets: Mapping[str, np.ndarray]) -> bool:
        """Buffer one view (`PartWriter.append`'s record and targets); commit when N are buffered.

        Returns False when the view is already buffered or was committed through this filler.
        """
        key = (int(record["image_id"]), int(record["view_id"]))
        with self._mutex:
            if key in self._buffer or key in self._known:
                return False
            missing = [name for name in self.target_names if name not in targets]
            if missing:
                raise ValueError(
                    f"StoreFiller.add(targets=) expects every target of the store {self.url} ({self.target_names}). "
                    f"Got no {missing} for image_id={key[0]} view_id={key[1]}."
                )
            self._buffer[key] = (dict(record), {name: np.asarray(targets[name], dtype=np.float32) for name in self.target_names})
            full = len(self._buffer) >= self.part_views
        if full:
            self._submit(self.take())
        return True

    def _submit(self, batch: list[tuple[dict, dict[str, np.ndarray]]]) -> None:
        if self._executor is None:
            self.commit(batch)
        else:
            self._futures.append(self._executor.submit(self.commit, batch))

    def take(self) -> list[tuple[dict, dict[str, np.ndarray]]]:
        """Remove and return the buffered views (what `flush` commits)."""
        with self._mutex:
            batch = [self._buffer[key] for key in sorted(self._buffer)]
            self._known.update(self._buffer)
            self._buffer = {}
        return batch

    def flush(self) -> int:
        """Commit the buffered views that no writer has committed yet and wait for commits in flight.

        Returns how many views were committed by the commits it waited for.
        """
        if self._executor is None:
            return self.commit(self.take())
        self._submit(self.take())
        futures, self._futures = self._futures, []
        return sum(future.result() for future in futures)

    def close(self) -> None:
        """`flush`, then stop the background thread."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def commit(self, batch: list[tuple[dict, dict[str, np.ndarray]]]) -> int:
        """Commit ``batch`` (from `take`) as one part, under the fill lock, skipping views committed by anyone.

        Returns how many views it committed.
        """
        if not batch:
            return 0
        with self._lock:
            committed = self._store.committed_keys()
            fresh = [(record, targets) for record, targets in batch if (int(record["image_id"]), int(record["view_id"])) not in committed]
            self.skipped_views += len(batch) - len(fresh)
            if not fresh:
                return 0
            part_id = f"fill-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
            with self._store.open_part(part_id, origin="endpoint") as part:
                for record, targets in fresh:
                    part.append(record, targets)
                part.commit()
        self.committed_views += len(fresh)
        self.parts.append(part_id)
        return len(fresh)
