"""Training data over the views of a label store: same pixels the teacher saw, same GT, its targets.

Legend: B views in a batch, M GT boxes of one view, C/H/W the shape of one stored target.

Each epoch samples ONE of the K stored views of every image (seeded by ``(seed, epoch)``)
in batches of one canvas each (`detcore.datasets.CanvasBatchSampler`), renders it with exactly the recipe stored for it
(`StoreSource.stored_views` parses the store's record once), checks the decoded image's content
hash against the hash recorded at precompute time, transforms the GT boxes the same way
and, for the offline sources, reads the view's targets inside the DataLoader worker (the
store reader is opened lazily once per worker process).

An image that changed on disk since precompute, or that no longer decodes, never stops a
run: its item is a `detcore.datasets.DecodeFailure` naming the image id and the reason
(``image 17 changed on disk since precompute (hash ab.. != cd..)``), the batch goes on
without it and the trainer prints a summary at the end. ``strict_hash=True`` raises
`ImageChangedError` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detcore.datasets import DecodeFailure, ViewDataset, collate_views
from detcore.views import PIXEL_MEAN, PIXEL_STD, View

if TYPE_CHECKING:
    from detcore.coco import CocoDataset

CHANGED_PREFIX = "changed on disk since precompute"


class ImageChangedError(ValueError):
    """An image whose pixels differ from those the teacher saw (strict mode)."""


class StoreFitError(ValueError):
    """A label store whose teacher fingerprint or targets do not fit the student or the dataset."""


def check_store_region(region: Any, losses: Any, *, store: str, point_offset: float, needed: Sequence[str]) -> None:
    """Refuse a run whose losses would read a region store (`label_store.StoreRegion`) outside its region.

    LD (any of its terms: `student_trainer.losses.recipes.ld_recipe` computes them together)
    reads ``box`` at the ATSS positives of its ``topk`` (the student's own assignment when its
    ``atss_topk`` is the same number) and in the VLR of its ``alpha`` and DIoU flavour, and
    ``cls`` at the positives (``ld_kd``), on the student's points; the store holds its region
    groups for one topk, every alpha from its ``vlr_alpha`` up, one DIoU flavour and one point
    convention. BCD reads the teacher's class logits and boxes at every point, so it needs
    ``cls`` dense and the boxes from a dense group (``edges``).

    Raises:
        StoreFitError: naming each setting of the run and the store's.
    """
    if region is None:
        return
    read = {name.split("/", 1)[0] for name in needed}
    problems = _ld_region_problems(region, losses, point_offset, read) + _bcd_region_problems(region, losses, read)
    if problems:
        raise StoreFitError(
            f"The label store {store} holds {region.describe()}; this run would read outside it:\n  - "
            + "\n  - ".join(problems)
            + "\nRun with the store's settings (--set losses.ld....), or precompute a store for yours."
        )


def _ld_region_problems(region: Any, losses: Any, point_offset: float, read: set[str]) -> list[str]:
    """LD's settings that would read the store's region groups (``cls`` at the positives, ``box`` there and in the VLR) outside it."""
    held = read & set(region.groups) & {"cls", "box"}
    if not held or not losses.uses("ld_main", "ld_vlr", "ld_kd"):
        return []
    problems = []
    if losses.ld.topk != region.topk:
        problems.append(f"LD topk: the run has losses.ld.topk={losses.ld.topk}, the store's region serves topk {region.topk}")
    if "box" in held:
        if losses.ld.alpha < region.vlr_alpha:
            problems.append(
                f"LD VLR alpha: the run has losses.ld.alpha={losses.ld.alpha:g}, the store's region serves alpha >= {region.vlr_alpha:g}"
            )
        if losses.ld.vlr_diou != region.vlr_diou:
            problems.append(f"LD VLR DIoU: the run has losses.ld.vlr_diou={losses.ld.vlr_diou!r}, the store's region serves {region.vlr_diou!r}")
    if float(point_offset) != region.point_offset:
        problems.append(f"point offset: the student's points sit at {point_offset:g}, the store's region used {region.point_offset:g}")
    return problems


def _bcd_region_problems(region: Any, losses: Any, read: set[str]) -> list[str]:
    """BCD's reads at every point of a group the store holds only in its region."""
    if not losses.uses("bcd"):
        return []
    problems = []
    if "cls" in region.groups:
        problems.append(
            "BCD reads the teacher's class logits at every point; the store holds cls only in its region "
            "(precompute with --cls-region dense, or run without bcd)"
        )
    # ``needed`` holds edges only when BCD reads them (`LossConfig.bcd_box_group`).
    if ("edges" if "edges" in read else "box") in region.groups:
        problems.append(
            f"BCD reads the teacher's boxes at every point; the store holds {'/'.join(region.groups)} only in its region and no dense "
            "edges (precompute with --targets ...,edges, or with --box-region dense)"
        )
    return problems


def check_store_fits(
    fingerprint: Any,
    specs: Sequence[Any],
    *,
    store: str,
    classes: Sequence[str],
    strides: Sequence[int],
    reg_max: int,
    canvas_hw: tuple[int, int] | None,
    needed: Sequence[str],
) -> None:
    """Refuse a store (or endpoint) whose teacher does not fit the student run.

    Args:
        fingerprint: the store's `label_store.TeacherFingerprint`.
        specs: its `label_store.TargetSpec` list.
        store: URL, for the message.
        classes: the training annotations' class names (label order).
        strides, reg_max: the student's.
        canvas_hw: the canvas the run config asks for, or None to accept the store's.
        needed: target names the enabled losses read.

    Raises:
        StoreFitError: listing every difference, one per line.
    """
    problems = []
    if tuple(fingerprint.classes) != tuple(classes):
        problems.append(
            f"classes: store has {len(fingerprint.classes)} {_short(fingerprint.classes)}, "
            f"the annotations have {len(classes)} {_short(classes)}"
        )
    if tuple(fingerprint.strides) != tuple(strides):
        problems.append(f"strides: store has {tuple(fingerprint.strides)}, the student has {tuple(strides)}")
    if int(fingerprint.reg_max) != int(reg_max):
        problems.append(
            f"reg_max: store has {fingerprint.reg_max}, the student has {reg_max} (--set student.reg_max={fingerprint.reg_max})"
        )
    if canvas_hw is not None and tuple(fingerprint.canvas_hw) != tuple(canvas_hw):
        problems.append(f"canvas: store has {tuple(fingerprint.canvas_hw)}, the run config asks for {tuple(canvas_hw)}")
    available = {spec.name for spec in specs}
    missing = [name for name in needed if name not in available]
    if missing:
        groups = sorted({name.split("/", 1)[0] for name in missing})
        problems.append(
            f"targets: the enabled losses need {missing}, which the store does not hold (it has {sorted(available)}); "
            f"missing target group(s) {groups} of the teacher {fingerprint.architecture!r}; "
            "precompute with the missing --targets groups or disable the losses that need them"
        )
    if problems:
        raise StoreFitError(
            f"The label store {store} does not fit this run:\n  - " + "\n  - ".join(problems)
        )


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return repr(names) if len(names) <= 6 else repr(names[:6])[:-1] + ", ...]"


class StoreTargetReader:
    """Reads one view's targets from a label store; picklable, opens the store lazily per process.

    Args:
        url: store URL or path.
        names: target names to read.
        expected_fingerprint: checked by `label_store.open_store` on every open.
        storage_options: fsspec options of a remote store.
    """

    def __init__(
        self, url: str, names: Sequence[str], expected_fingerprint: Any = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = str(url)
        self.names = list(names)
        self.expected_fingerprint = expected_fingerprint
        self.storage_options = dict(storage_options or {})
        self._reader = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_pid"] = None
        return state

    @property
    def reader(self):
        if self._reader is None or self._pid != os.getpid():
            from label_store import open_store

            self._reader = open_store(self.url, expected_fingerprint=self.expected_fingerprint,
                                      storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._reader

    def refresh(self) -> None:
        """See the parts committed since the store was opened (one manifest listing when none were)."""
        self._reader = self.reader.refresh_if_changed()

    def read(self, image_id: int, view_id: int) -> dict[str, np.ndarray]:
        """name -> float32 array[C, H, W] of one view."""
        return self.reader.read(image_id, view_id, names=self.names)


class StoreViewDataset(Dataset):
    """Rendered stored views with hash check, GT and (optionally) their targets.

    Args:
        dataset: the training annotations and images.
        views: the views to render; several per image (the store's K views).
        expected_hashes: ``(image_id, view_id) -> content hash`` recorded at precompute
            time; views without an entry are not checked (views planned for a
            read-through or remote run).
        target_reader: reads targets in the worker (`StoreTargetReader`); None leaves
            ``targets`` None for the trainer's target source to fill.
        readable_keys: keys the reader can serve (the store's views); other items get
            ``targets`` None. None means every key.
        strict_hash: raise `ImageChangedError` instead of reporting a skip.
        photometric: jitter brightness and contrast of the rendered image (an
            approximation: the teacher saw the unjittered pixels).
        regions: computes the view's distillation regions from its GT and canvas
            (`student_trainer.distill.GTRegions`, from `DistillationModel.region_spec`), so
            that the workers do it and not the training step; None for none.

    Item: the dict of `detcore.datasets.ViewDataset` plus ``targets`` (name -> float32
    array[C, H, W], or None), ``regions`` (name -> Tensor[A], or None) and ``image_path``;
    or a `DecodeFailure`.
    """

    def __init__(
        self,
        dataset: "CocoDataset",
        views: Sequence[View],
        *,
        expected_hashes: Mapping[tuple[int, int], str] | None = None,
        target_reader: StoreTargetReader | None = None,
        readable_keys: set[tuple[int, int]] | None = None,
        strict_hash: bool = False,
        photometric: bool = False,
        regions: Callable[[torch.Tensor, tuple[int, int]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.base = ViewDataset(dataset, views)
        self.regions = regions
        self.views = self.base.views
        self.expected_hashes = dict(expected_hashes or {})
        self.target_reader = target_reader
        self.readable_keys = readable_keys
        self.strict_hash = bool(strict_hash)
        self.photometric = bool(photometric)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict[str, Any] | DecodeFailure:
        item = self.base[index]
        view = self.views[index]
        path = str(self.base.dataset.image_path(view.image_id))
        if isinstance(item, DecodeFailure):
            return item
        expected = self.expected_hashes.get(view.key)
        if expected is not None and item["content_hash"] != expected:
            reason = f"image {view.image_id} {CHANGED_PREFIX} (hash {item['content_hash']} != {expected})"
            if self.strict_hash:
                raise ImageChangedError(
                    f"StoreViewDataset expects the pixels the teacher saw. Got {reason} at {path}; "
                    "re-run precompute for it, or drop strict_hash to skip it with a report."
                )
            return DecodeFailure(view.image_id, view.view_id, path, reason)
        item["image_path"] = path
        item["targets"] = None
        if self.target_reader is not None and (self.readable_keys is None or view.key in self.readable_keys):
            item["targets"] = self.target_reader.read(view.image_id, view.view_id)
        item["regions"] = self.regions(item["gt_boxes"], (view.canvas_h, view.canvas_w)) if self.regions is not None else None
        if self.photometric:
            item["image"] = photometric_jitter(item["image"], item["valid_region"])
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | DecodeFailure]:
        """A batch of items (the DataLoader's batched fetch, in its worker).

        When the target reader fetches (`student_trainer.sources.ReadThroughReader`), the
        items the store could not serve get their targets here, in one request per batch;
        such an item carries ``fetched``, every target of the store, for the trainer to commit.
        """
        items = [self[index] for index in indices]
        fetch_many = getattr(self.target_reader, "fetch_many", None)
        wanting = [item for item in items if isinstance(item, dict) and item["targets"] is None]
        if fetch_many is not None and wanting:
            got = fetch_many([item["view"] for item in wanting], [item["image_path"] for item in wanting],
                             [item["content_hash"] for item in wanting])
            for item, (targets, fetched) in zip(wanting, got):
                item["targets"] = targets
                if fetched is not None:
                    item["fetched"] = fetched
        return items


def photometric_jitter(image: torch.Tensor, valid_region: tuple[int, int, int, int], strength: float = 0.2) -> torch.Tensor:
    """Brightness and contrast jitter of a normalised canvas Tensor[3, H, W], inside the valid region.

    Draws from torch's RNG (seeded per DataLoader worker); padding stays zero.
    """
    mean = torch.tensor(PIXEL_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=image.dtype).view(3, 1, 1)
    contrast = 1.0 + (torch.rand(()) * 2 - 1) * strength
    brightness = (torch.rand(()) * 2 - 1) * strength * 255.0
    x1, y1, x2, y2 = valid_region
    out = image.clone()
    pixels = out[:, y1:y2, x1:x2] * std + mean
    pixels = ((pixels - 127.5) * contrast + 127.5 + brightness).clamp(0, 255)
    out[:, y1:y2, x1:x2] = (pixels - mean) / std
    return out


def collate_train(batch: Sequence[dict[str, Any] | DecodeFailure | None]) -> dict[str, Any]:
    """`detcore.datasets.collate_views` plus targets and image paths.

    Adds ``image_paths`` (list of B); ``fetched``: ``(index, name -> array)`` of the items
    whose targets the worker fetched from the endpoint (every store target); ``regions``: name -> Tensor[B, A] when every item
    carries them, else None; and ``targets``: name -> Tensor[B, C, H, W] when every item
    carries its targets, else None with ``missing`` (indices of the items without) and
    ``partial_targets`` (per item dict or None) for the target source to complete.
    """
    out = collate_views(batch)
    items = [item for item in batch if isinstance(item, dict)]
    out["image_paths"] = [item["image_path"] for item in items]
    regions = [item.get("regions") for item in items]
    out["regions"] = (
        {name: torch.stack([r[name] for r in regions]) for name in regions[0]}
        if items and all(r is not None for r in regions) else None
    )
    out["fetched"] = [(i, item["fetched"]) for i, item in enumerate(items) if item.get("fetched") is not None]
    per_item = [item.get("targets") for item in items]
    out["missing"] = [i for i, t in enumerate(per_item) if t is None]
    if items and not out["missing"]:
        names = list(per_item[0])
        out["targets"] = {name: torch.from_numpy(np.stack([t[name] for t in per_item])) for name in names}
        out["partial_targets"] = None
    else:
        out["targets"] = None
        out["partial_targets"] = per_item
    return out


@dataclass
class FailureLog:
    """Images skipped during a run (changed on disk or undecodable), reported by id at the end."""

    changed: dict[int, str]
    """image id -> reason, for images whose content hash differs from the store's."""
    undecodable: dict[int, str]
    """image id -> reason, for images that failed to decode or render."""

    @classmethod
    def empty(cls) -> "FailureLog":
        return cls({}, {})

    def add(self, failures: Sequence[DecodeFailure]) -> list[DecodeFailure]:
        """Record failures; returns those not seen before (to log once)."""
        new = []
        for failure in failures:
            bucket = self.changed if CHANGED_PREFIX in failure.reason else self.undecodable
            if failure.image_id not in bucket:
                bucket[failure.image_id] = f"{failure.reason} ({failure.path})"
                new.append(failure)
        return new

    @property
    def count(self) -> int:
        return len(self.changed) + len(self.undecodable)

    def summary(self) -> str:
        lines = []
        if self.changed:
            lines.append(f"{len(self.changed)} image(s) changed on disk since precompute and were skipped:")
            lines += [f"  image {i}: {r}" for i, r in sorted(self.changed.items())]
        if self.undecodable:
            lines.append(f"{len(self.undecodable)} image(s) could not be decoded and were skipped:")
            lines += [f"  image {i}: {r}" for i, r in sorted(self.undecodable.items())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": {str(k): v for k, v in sorted(self.changed.items())},
            "undecodable": {str(k): v for k, v in sorted(self.undecodable.items())},
        }
