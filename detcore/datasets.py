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
