"""Thin torch adapter for the trainer: the only module of label_store that uses torch.

torch is imported inside the functions, so even importing this module works without it.

Legend: B views in a batch, C channels, H x W one level's map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


def to_torch(targets: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """name -> float32 array[C, H, W] as name -> Tensor[C, H, W] (shares memory when it can)."""
    import torch

    out = {}
    for name, array in targets.items():
        array = np.asarray(array)
        if array.dtype != np.float32:
            raise ValueError(f"to_torch(targets=) expects float32 arrays. Got {array.dtype} for {name!r}.")
        if not array.flags.writeable:
            array = array.copy()
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def collate_targets(batch: Sequence[Mapping[str, np.ndarray | Tensor]]) -> dict[str, Tensor]:
    """Stack the targets of B views: name -> Tensor[B, C, H, W] (a DataLoader ``collate_fn`` part)."""
    import torch

    if not batch:
        raise ValueError("collate_targets(batch=) expects at least one view. Got an empty batch.")
    names = list(batch[0])
    for index, item in enumerate(batch):
        if list(item) != names:
            raise ValueError(f"collate_targets(batch=) expects the same targets in every view. Got {list(item)} at {index}, {names} at 0.")
    out = {}
    for name in names:
        tensors = [item[name] if isinstance(item[name], torch.Tensor) else torch.from_numpy(np.ascontiguousarray(item[name])) for item in batch]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"collate_targets(batch=) expects one shape per target. Got {sorted(shapes)} for {name!r}.")
        out[name] = torch.stack(tensors).float()
    return out
