"""Ray pieces of the precompute job: the label-store Datasink and a progress counter.

Imported only inside `teacher_service.precompute.run_precompute` (it imports Ray).

Exactly-once writes. Each `Datasink.write` call (one Ray write task) writes its good rows
into one part and commits it last; the store writes every *attempt* of a part into a
directory of its own (``<part_id>.<attempt>``), and a part that was never committed is
invisible to readers. The part id is derived from the views the task holds
(`part_id_for`), not drawn at random, so that every retry of a task uses the same id:

- an attempt killed before its commit leaves an unreferenced directory; the retry writes
  a fresh one and commits it;
- an attempt killed *after* its commit, before Ray saw it return, is retried: the retry
  finds its part id committed (`Store.is_committed`, one existence check) and skips, or
  loses the race at commit (`PartExistsError`) and discards its copy;
- a stale task of an interrupted earlier run holding the same views does the same.

Views never reach two write tasks of one run (each view is one row of the input), and a
resumed run plans only uncommitted views, so no view is committed twice.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable, Mapping

import numpy as np
import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from label_store.encoding import QuantizedTarget
from teacher_service.pipeline_stages import (
    ORIGINALS_COLUMN,
    REGION_COLUMN,
    maybe_inject_fault,
    quantized_from_columns,
    run_at_lower_priority,
)

# One opened store per worker process and store URL: opening reads the manifest.
_STORES: dict[tuple[str, str], Any] = {}


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Views stored and failed so far, reported by write tasks and polled by the driver."""

    def __init__(self) -> None:
        self.stored = 0
        self.failed = 0
        self.parts = 0

    def add(self, stored: int, failed: int, parts: int) -> None:
        self.stored += int(stored)
        self.failed += int(failed)
        self.parts += int(parts)

    def get(self) -> tuple[int, int, int]:
        return (self.stored, self.failed, self.parts)


def part_id_for(keys: Iterable[tuple[int, int]]) -> str:
    """A part id determined by the set of ``(image_id, view_id)`` it holds (any order)."""
    array = np.asarray(sorted(keys), dtype=np.int64).reshape(-1, 2)
    digest = hashlib.blake2b(array.tobytes(), digest_size=12).hexdigest()
    first = array[0] if len(array) else (0, 0)
    return f"i{int(first[0])}-v{int(first[1])}-n{len(array)}-{digest}"


def _tree_bytes(url: str, storage_options: Mapping[str, Any], path: str) -> int:
    """Bytes under ``path`` (a part directory) on the store's filesystem; 0 if it cannot be listed."""
    import fsspec

    try:
        fs, _ = fsspec.core.url_to_fs(url, **dict(storage_options))
        return int(fs.du(path, total=True))
    except Exception:  # the size is for the summary only
        return 0


def _row_targets(
    batch: Mapping[str, np.ndarray], quantized: Mapping[str, QuantizedTarget], i: int, specs
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Row ``i``'s targets for `PartWriter.append`: float32 arrays, or `QuantizedTarget` where
    the teacher stage quantized (``quantized``: the batch's, `quantized_from_columns`), and
    the float32 originals of those when the row carries them (``None`` otherwise)."""
    targets: dict[str, Any] = {}
    for spec in specs:
        if spec.name in quantized:
            targets[spec.name] = quantized[spec.name].row(i)
        else:
            targets[spec.name] = np.asarray(batch[spec.name][i], dtype=np.float32)
    raw = batch[ORIGINALS_COLUMN][i] if ORIGINALS_COLUMN in batch else b""
    if not quantized or not raw:
        return targets, None
    values = np.frombuffer(raw, dtype=np.float32)
    originals, start = {}, 0
    for spec in [spec for spec in specs if spec.name in quantized]:
        shape = targets[spec.name].codes.shape  # the view's canvas shape
        size = int(np.prod(shape))
        originals[spec.name] = values[start : start + size].reshape(shape)
        start += size
    if start != values.size:
        raise ValueError(
            f"LabelStoreDatasink expects {start * 4} bytes of float32 originals for image_id={int(batch['image_id'][i])} "
            f"view_id={int(batch['view_id'][i])}. Got {len(raw)}."
        )
    return targets, originals


def _row_region(batch: Mapping[str, np.ndarray], i: int, store) -> np.ndarray | None:
    """Row ``i``'s stored-point mask (bool[A]) for a region store, from the packed ``region`` column; None without one."""
    if store.region is None:
        return None
    if REGION_COLUMN not in batch:
        raise ValueError(
            f"LabelStoreDatasink expects a '{REGION_COLUMN}' column for the region store {store.url} "
            f"(image_id={int(batch['image_id'][i])} view_id={int(batch['view_id'][i])})."
        )
    from label_store.schema import StoreCanvas, region_num_points

    view = batch["view"][i]
    count = region_num_points(StoreCanvas((view.canvas_h, view.canvas_w), "", ()), store.fingerprint.strides)
    return np.unpackbits(np.frombuffer(batch[REGION_COLUMN][i], dtype=np.uint8), count=count).astype(bool)


def _row_failure(batch: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    return {"image_id": int(batch["image_id"][i]), "view_id": int(batch["view_id"][i]), "reason": str(batch["error"][i])}


class LabelStoreDatasink(Datasink):
    """Writes teacher outputs into a label store, one committed part per write task.

    Args:
        store_url: the store's path or fsspec URL (the store exists already).
        fingerprint: the teacher fingerprint the store was created with (a dict).
        target_specs: the store's `label_store.TargetSpec` list, in store order.
        storage_options: fsspec options for remote stores.
        views_per_part: rows Ray Data gathers for one write task, hence one part.
        progress: a `ProgressCounter` handle, or None.
        niceness: run the encoding and writing at this lower CPU priority.
        cpus: and on these cores (None: wherever the worker runs).
        fault: testing hook, see `teacher_service.pipeline_stages.FAULT_ENV`.
        region: the store's `label_store.StoreRegion` as a dict (None: a dense store).

    After `Dataset.write_datasink` returns, ``result`` holds the aggregated
    `WriteTotals` of all tasks (set by `on_write_complete` on the driver).
    """

    def __init__(
        self,
        store_url: str,
        fingerprint: Mapping[str, Any],
        target_specs: Iterable[Any],
        storage_options: Mapping[str, Any] | None = None,
        views_per_part: int | None = None,
        progress: Any = None,
        niceness: int = 0,
        cpus: Iterable[int] | None = None,
        fault: tuple[str, str] | None = None,
        region: Mapping[str, Any] | None = None,
    ) -> None:
        self.region = None if region is None else dict(region)
        self.store_url = store_url
        self.fingerprint = dict(fingerprint)
        self.target_specs = tuple(target_specs)
        self.storage_options = dict(storage_options or {})
        self.views_per_part = views_per_part
        self.progress = progress
        self.niceness = niceness
        self.cpus = tuple(int(c) for c in cpus) if cpus else None
        self.fault = fault
        self.result: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int | None:
        return self.views_per_part

    def _store(self):
        from label_store.writer import create_store

        key = (self.store_url, repr(sorted(self.storage_options.items())))
        if key not in _STORES:
            # exist_ok: opens the store and checks it still has this fingerprint and targets.
            _STORES[key] = create_store(
                self.store_url,
                self.fingerprint,
                list(self.target_specs),
                exist_ok=True,
                storage_options=self.storage_options or None,
                region=self.region,
            )
        return _STORES[key]

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, Any]:
        # The part id comes from the rows (see the module docstring), not from ``ctx``.
        start = time.perf_counter()
        batches = [BlockAccessor.for_block(block).to_batch_format("numpy") for block in blocks]
        return run_at_lower_priority(self.niceness, self._write, batches, start, cpus=self.cpus)

    def _write(self, batches: list[dict[str, np.ndarray]], start: float) -> dict[str, Any]:
        from label_store.errors import PartExistsError

        store = self._store()
        stage = {name: float(sum(np.sum(b[name]) for b in batches)) for name in ("decode_s", "forward_s", "encode_s")}
        failures = [_row_failure(b, i) for b in batches for i in range(len(b["error"])) if b["error"][i] != ""]
        good = [(k, i) for k, b in enumerate(batches) for i in range(len(b["error"])) if b["error"][i] == ""]
        quantized = [quantized_from_columns(b) for b in batches]
        part_id = part_id_for([(int(batches[k]["image_id"][i]), int(batches[k]["view_id"][i])) for k, i in good]) if good else None
        recovered = False
        nbytes = 0
        if part_id is not None and store.is_committed(part_id):
            recovered = True  # an earlier attempt of this task committed, then died
        elif part_id is not None:
            part = store.open_part(part_id)
            try:
                for k, i in good:
                    batch = batches[k]
                    record = {
                        "image_id": int(batch["image_id"][i]),
                        "view_id": int(batch["view_id"][i]),
                        "view": batch["view"][i],
                        "content_hash": str(batch["content_hash"][i]),
                        "valid_region": tuple(int(v) for v in batch["valid_region"][i]),
                    }
                    targets, originals = _row_targets(batch, quantized[k], i, self.target_specs)
                    part.append(record, targets, originals=originals, region=_row_region(batch, i, store))
                maybe_inject_fault(self.fault, "write-before-commit")
                part.commit()
            except PartExistsError:
                recovered = True  # a concurrent attempt committed first; commit() discarded ours
            except BaseException:
                part.abort()
                raise
            else:
                nbytes = _tree_bytes(self.store_url, self.storage_options, part.part_path)
                maybe_inject_fault(self.fault, "write-after-commit")
                maybe_inject_fault(self.fault, "stall-after-commit")
        if self.progress is not None:
            self.progress.add.remote(len(good), len(failures), int(part_id is not None))
        num_quantized = sum(1 for k, _ in good if quantized[k])
        return {
            "part_id": part_id,
            "recovered": recovered,
            "stored": len(good),
            "quantized": num_quantized if not recovered else 0,
            "failures": failures,
            "bytes": nbytes,
            "write_s": time.perf_counter() - start,
            **stage,
        }

    def on_write_complete(self, write_result: WriteResult) -> None:
        totals: dict[str, Any] = {
            "parts": 0,
            "recovered_parts": 0,
            "stored": 0,
            "quantized": 0,
            "bytes": 0,
            "write_s": 0.0,
            "decode_s": 0.0,
            "forward_s": 0.0,
            "encode_s": 0.0,
            "failures": [],
        }
        for ret in write_result.write_returns:
            totals["parts"] += int(ret["part_id"] is not None)
            totals["recovered_parts"] += int(ret["recovered"])
            for name in ("stored", "quantized", "bytes", "write_s", "decode_s", "forward_s", "encode_s"):
                totals[name] += ret[name]
            totals["failures"].extend(ret["failures"])
        unique = {(f["image_id"], f["view_id"]): f for f in totals["failures"]}
        totals["failures"] = [unique[key] for key in sorted(unique)]
        self.result = totals
