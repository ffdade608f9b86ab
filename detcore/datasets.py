"""Torch datasets over views: one item is one rendered view of one COCO image.

Legend: B views in a batch, M GT boxes of one view, H x W the canvas.

An image that fails to decode never stops a run: its item is a `DecodeFailure` (not an
exception), `collate_views` drops it from the batch and lists it under ``failures``,
and the caller reports every failed image id at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from detcore.views import View, content_hash, render

if TYPE_CHECKING:
    from detcore.coco import CocoDataset


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """The item of a view whose image could not be decoded or rendered."""

    image_id: int
    """COCO image id."""
    view_id: int
    """View index of the failed item."""
    path: str
    """Image file that failed."""
    reason: str
    """What went wrong, in words."""


class ViewDataset(Dataset):
    """Rendered views of a COCO dataset.

    Args:
        dataset: the annotations and images (`detcore.coco.CocoDataset`).
        views: the views to render (e.g. `detcore.views.plan_views`); item i is views[i].

    Item: a dict with
        ``image`` Tensor[3, H, W] float32 normalised (`detcore.views.render`),
        ``gt_boxes`` Tensor[M, 4] canvas px, ``gt_labels`` LongTensor[M] in [0, K),
        ``ignore_boxes`` Tensor[I, 4] canvas px (crowd regions, unused by GFL training),
        ``view`` (`View`), ``image_id`` (int), ``valid_region`` ``(x1, y1, x2, y2)``,
        ``content_hash`` (`detcore.views.content_hash` of the decoded pixels);
    or a `DecodeFailure` when the image cannot be decoded or does not match its view.
    """

    def __init__(self, dataset: "CocoDataset", views: Sequence[View]) -> None:
        self.dataset = dataset
        self.views = list(views)
        known = set(dataset.image_ids)
        for view in self.views:
            if view.image_id not in known:
                raise ValueError(
                    f"ViewDataset(views=) expects views of images in the dataset. Got image_id={view.image_id} "
                    f"(view_id={view.view_id}), which {dataset.annotations_path} does not list."
                )

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict[str, Any] | DecodeFailure:
        from detcore.images import ImageDecodeError
        from detcore.views import ViewError, image_to_view_boxes

        view = self.views[index]
        try:
            pixels = self.dataset.load(view.image_id)
            targets = self.dataset.targets(view.image_id)
            rendered = render(pixels, view, targets.gt_boxes)
        except ImageDecodeError as error:
            return DecodeFailure(view.image_id, view.view_id, error.path, error.reason)
        except ViewError as error:
            return DecodeFailure(view.image_id, view.view_id, str(self.dataset.image_path(view.image_id)), str(error))
        ignore = image_to_view_boxes(targets.ignore_boxes, view)
        return {
            "image": rendered.image,
            "gt_boxes": rendered.gt_boxes,
            "gt_labels": torch.from_numpy(np.ascontiguousarray(targets.gt_labels, dtype=np.int64)),
            "ignore_boxes": torch.from_numpy(np.ascontiguousarray(ignore)),
            "view": view,
            "image_id": view.image_id,
            "valid_region": rendered.valid_region,
            "content_hash": content_hash(pixels),
        }


def collate_views(batch: Sequence[dict[str, Any] | DecodeFailure | None]) -> dict[str, Any]:
    """Stack the items that rendered; list the failures.

    Returns a dict with ``images`` Tensor[B, 3, H, W] (None when no item rendered),
    ``gt_boxes`` / ``gt_labels`` / ``ignore_boxes`` lists of B tensors, ``views``,
    ``image_ids``, ``valid_regions``, ``content_hashes`` lists of B, and ``failures``: the
    `DecodeFailure` of every dropped item (a bare None counts as a failure without id).
    """
    items = [item for item in batch if isinstance(item, dict)]
    failures = [item for item in batch if isinstance(item, DecodeFailure)]
    failures += [DecodeFailure(-1, -1, "", "item was None") for item in batch if item is None]
    return {
        "images": torch.stack([item["image"] for item in items]) if items else None,
        "gt_boxes": [item["gt_boxes"] for item in items],
        "gt_labels": [item["gt_labels"] for item in items],
        "ignore_boxes": [item["ignore_boxes"] for item in items],
        "views": [item["view"] for item in items],
        "image_ids": [item["image_id"] for item in items],
        "valid_regions": [item["valid_region"] for item in items],
        "content_hashes": [item["content_hash"] for item in items],
        "failures": failures,
    }


class EpochViewSampler(Sampler[int]):
    """One view per image per epoch, images in a shuffled order; reproducible from (seed, epoch).

    Args:
        views: the views of a `ViewDataset` (several per image).
        seed: base seed; epoch e draws from ``numpy.random.default_rng([seed, e])``.
        shuffle: shuffle the image order (False keeps the order of first appearance).

    ``set_epoch(epoch, start=n)`` makes the next iteration begin at position n of that
    epoch's order, so a resumed run sees exactly the views an uninterrupted one would.
    """

    def __init__(self, views: Sequence[View], seed: int = 0, shuffle: bool = True) -> None:
        groups: dict[int, list[int]] = {}
        for index, view in enumerate(views):
            groups.setdefault(view.image_id, []).append(index)
        self._groups = list(groups.values())
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)

    def order(self, epoch: int) -> list[int]:
        """Dataset indices of one epoch, one per image."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        choices = [group[int(rng.integers(len(group)))] for group in self._groups]
        if self.shuffle:
            choices = [choices[i] for i in rng.permutation(len(choices))]
        return choices

    def __len__(self) -> int:
        return max(0, len(self._groups) - self.start)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])


class CanvasBatchSampler(Sampler[list[int]]):
    """Batches of views of one canvas at a time (mmdetection's aspect-ratio grouping).

    Each epoch takes `EpochViewSampler`'s order (one view per image, reproducible from
    ``(seed, epoch)``) and fills one bucket per canvas in that order; a bucket that reaches
    ``batch_size * num_replicas`` views becomes one batch per rank (rank r takes positions
    r, r + n, ...; for one canvas and one rank these are exactly the consecutive batches of
    ``DataLoader(batch_size, drop_last=True)``). What is left of a canvas is dropped, unless
    that canvas never filled a block: then it is one short batch per rank (cycled to at least
    two views per rank and to a multiple of the ranks). Every rank gets the same number of
    batches, the same in every epoch (it depends only on the number of images per canvas).

    Args:
        views: the views of the dataset (several per image; one image's views share a canvas).
        batch_size: views per batch and rank.
        seed, shuffle: as `EpochViewSampler`.
        num_replicas, rank: data-parallel ranks.

    ``set_epoch(epoch, start=k)`` makes the next iteration skip the epoch's first k batches
    (resume within an epoch).
    """

    def __init__(
        self, views: Sequence[View], batch_size: int, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"CanvasBatchSampler(batch_size=) expects a positive int. Got {batch_size}.")
        if num_replicas < 1 or not (0 <= rank < num_replicas):
            raise ValueError(f"CanvasBatchSampler(rank=, num_replicas=) expects 0 <= rank < num_replicas. Got {rank}, {num_replicas}.")
        self.inner = EpochViewSampler(views, seed=seed, shuffle=shuffle)
        self.canvas_of = [(int(view.canvas_h), int(view.canvas_w)) for view in views]
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start = 0
        self._num_batches = len(self.batches(0))

    @property
    def num_images(self) -> int:
        return len(self.inner._groups)

    @property
    def num_batches(self) -> int:
        """Batches per epoch and rank."""
        return self._num_batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch: lists of dataset indices, one canvas each."""
        block = self.batch_size * self.num_replicas
        buckets: dict[tuple[int, int], list[int]] = {}
        filled: set[tuple[int, int]] = set()
        out: list[list[int]] = []
        for index in self.inner.order(epoch):
            canvas = self.canvas_of[index]
            bucket = buckets.setdefault(canvas, [])
            bucket.append(index)
            if len(bucket) == block:
                out.append(bucket[self.rank :: self.num_replicas])
                buckets[canvas] = []
                filled.add(canvas)
        for canvas, bucket in buckets.items():
            if bucket and canvas not in filled:
                # BatchNorm needs more than one value per channel: at least two views per rank.
                per_rank = max(-(-len(bucket) // self.num_replicas), min(2, self.batch_size))
                cycled = [bucket[i % len(bucket)] for i in range(per_rank * self.num_replicas)]
                out.append(cycled[self.rank :: self.num_replicas])
        return out

    def __len__(self) -> int:
        return max(0, self._num_batches - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch)[self.start :])


def canvas_batches(views: Sequence[View], batch_size: int) -> list[list[int]]:
    """Every view exactly once, in batches of one canvas each (for evaluation): views keep
    their order within a canvas, canvases come in order of first appearance."""
    if batch_size < 1:
        raise ValueError(f"canvas_batches(batch_size=) expects a positive int. Got {batch_size}.")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, view in enumerate(views):
        groups.setdefault((int(view.canvas_h), int(view.canvas_w)), []).append(index)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]
