"""Teacher classes to dataset categories, by name.

Legend: B images, K_t teacher classes, K dataset categories, H x W one level's map.

A teacher trained elsewhere (COCO's 80 or torchvision's 91 labels, another order, other
spellings) is mapped onto the dataset's categories once, at the door: `map_classes` matches
names case-insensitively with ``_`` and space alike (``traffic_light`` = ``Traffic Light``),
``class_map`` renames teacher classes (teacher name -> dataset name), teacher classes the
dataset lacks are dropped, and dataset categories the teacher lacks are an error unless
``allow_missing``. `ClassMapping.apply` turns the teacher's class logits into the dataset's K
channels in the dataset's order; a missing category's channel holds filler (see
`MISSING_CLASS_LOGIT`) and `ClassMapping.class_mask` is False there, so class distillation
leaves it out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from torch import Tensor

MISSING_CLASS_LOGIT = -10.0
"""Logit of a dataset category the teacher does not know when it knows none of them
(sigmoid(-10) ~ 4.5e-5). Otherwise such a channel holds the lowest logit of the known
categories at the same point: never a higher score than a real class, and inside the range
the store's codecs quantize already. Class distillation masks it out (`class_mask`)."""


class ClassMappingError(ValueError):
    """Teacher and dataset classes that cannot be mapped (names the classes and how to fix it)."""


class MissingClassesError(ClassMappingError):
    """Dataset categories the teacher has no class for; ``missing`` lists them."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


def normalise_class_name(name: str) -> str:
    """The matching key of a class name: lower case, ``_`` as space, runs of spaces as one."""
    return " ".join(str(name).replace("_", " ").lower().split())


def _check_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ClassMappingError(f"map_classes({what}=) expects a sequence of non-empty names. Got {names!r}.")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class ClassMapping:
    """Which teacher class channel feeds each dataset category."""

    teacher_classes: tuple[str, ...]
    """The teacher's class names, by output channel (K_t)."""
    dataset_classes: tuple[str, ...]
    """The dataset's category names, by contiguous label (K)."""
    teacher_index: tuple[int, ...]
    """Per dataset category, the teacher channel that feeds it, or -1 when the teacher lacks it."""
    dropped_teacher_classes: tuple[str, ...]
    """Teacher classes that feed no dataset category."""
    missing_dataset_classes: tuple[str, ...]
    """Dataset categories without a teacher class (their channels are masked out)."""
    class_map: tuple[tuple[str, str], ...] = ()
    """The renames applied, (teacher name, dataset name) pairs as the user gave them."""

    @property
    def num_teacher_classes(self) -> int:
        return len(self.teacher_classes)

    @property
    def num_classes(self) -> int:
        """K, the dataset's category count (the channels `apply` returns)."""
        return len(self.dataset_classes)

    @property
    def class_mask(self) -> tuple[bool, ...]:
        """Per dataset category: True when the teacher has it (its channel takes part in class distillation)."""
        return tuple(index >= 0 for index in self.teacher_index)

    @property
    def is_identity(self) -> bool:
        """True when the teacher's channels already are the dataset's categories, in order."""
        return self.teacher_index == tuple(range(len(self.teacher_classes))) and len(self.teacher_classes) == len(self.dataset_classes)

    def apply(self, cls_logits: Sequence["Tensor"]) -> tuple["Tensor", ...]:
        """Teacher class logits per level Tensor[B, K_t, H, W] -> Tensor[B, K, H, W] in the dataset's order.

        A missing category holds the lowest known-category logit at its point (`MISSING_CLASS_LOGIT`
        when every category is missing). The identity mapping returns the tensors as given.
        """
        import torch

        levels = tuple(cls_logits)
        for level, logits in enumerate(levels):
            if logits.dim() != 4 or logits.shape[1] != self.num_teacher_classes:
                raise ClassMappingError(
                    f"ClassMapping.apply(cls_logits=) expects per level Tensor[B, {self.num_teacher_classes}, H, W] "
                    f"(the teacher's classes). Got shape {tuple(logits.shape)} at level {level}."
                )
        if self.is_identity:
            return levels
        out = []
        for logits in levels:
            index = torch.tensor([max(i, 0) for i in self.teacher_index], dtype=torch.long, device=logits.device)
            mapped = logits.index_select(1, index)
            if self.missing_dataset_classes:
                present = torch.tensor(self.class_mask, dtype=torch.bool, device=logits.device)
                if present.any():
                    lowest = mapped[:, present].amin(dim=1, keepdim=True)
                    mapped = torch.where(present.view(1, -1, 1, 1), mapped, lowest)
                else:
                    mapped = torch.full_like(mapped, MISSING_CLASS_LOGIT)
            out.append(mapped)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the store's manifest and `distill store inspect` show them)."""
        return {
            "teacher_classes": list(self.teacher_classes),
            "dataset_classes": list(self.dataset_classes),
            "teacher_index": list(self.teacher_index),
            "dropped_teacher_classes": list(self.dropped_teacher_classes),
            "missing_dataset_classes": list(self.missing_dataset_classes),
            "class_map": {teacher: dataset for teacher, dataset in self.class_map},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClassMapping":
        """Inverse of `to_dict`; the mapping is derived again from the names and must agree with the stored one."""
        required = ("teacher_classes", "dataset_classes", "teacher_index")
        missing = [k for k in required if k not in data]
        if missing:
            raise ClassMappingError(f"ClassMapping.from_dict(data=) expects the keys {list(required)}. Missing: {missing}.")
        mapping = map_classes(
            data["teacher_classes"], data["dataset_classes"], class_map=dict(data.get("class_map") or {}), allow_missing=True
        )
        if list(mapping.teacher_index) != list(data["teacher_index"]):
            raise ClassMappingError(
                f"ClassMapping.from_dict(data=) holds teacher_index {list(data['teacher_index'])}, but its names map to "
                f"{list(mapping.teacher_index)}. The record was edited or written by another matching rule."
            )
        return mapping

    def describe(self) -> str:
        """One line per fact, for the CLI."""
        lines = [f"{self.num_teacher_classes} teacher classes -> {self.num_classes} dataset categories"]
        renamed = [f"{self.teacher_classes[i]} -> {name}" for name, i in zip(self.dataset_classes, self.teacher_index) if i >= 0 and self.teacher_classes[i] != name]
        if renamed:
            lines.append("matched under another name: " + ", ".join(renamed))
        if self.dropped_teacher_classes:
            lines.append("dropped teacher classes: " + ", ".join(self.dropped_teacher_classes))
        if self.missing_dataset_classes:
            lines.append("missing dataset categories (left out of class distillation): " + ", ".join(self.missing_dataset_classes))
        return "\n".join(lines)


def read_class_map(path: str | os.PathLike, flag: str = "--class-map") -> dict[str, str]:
    """A class map file: a JSON object of teacher name -> dataset name.

    Raises:
        ClassMappingError: the file is missing, not JSON, or not an object of strings (names ``flag``).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ClassMappingError(f"{flag} expects a readable JSON file. Could not read {str(path)!r}: {error.strerror or error}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ClassMappingError(f"{flag} expects a JSON object (teacher name -> dataset name). {str(path)!r} is not JSON: {error}.") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ClassMappingError(
            f"{flag} expects a JSON object of teacher name -> dataset name strings, e.g. {{\"motorbike\": \"motorcycle\"}}. "
            f"Got {type(data).__name__} in {str(path)!r}."
        )
    return data


def map_classes(
    teacher_classes: Sequence[str],
    dataset_classes: Sequence[str],
    *,
    class_map: Mapping[str, str] | None = None,
    allow_missing: bool = False,
) -> ClassMapping:
    """Map teacher classes to dataset categories by name.

    Args:
        teacher_classes: the teacher's names by output channel.
        dataset_classes: the dataset's category names by contiguous label.
        class_map: renames, teacher name -> dataset name (both matched like any name).
        allow_missing: accept dataset categories the teacher lacks (recorded, masked out).

    Raises:
        MissingClassesError: dataset categories without a teacher class (unless allow_missing).
        ClassMappingError: duplicate names, a class_map entry naming an unknown class, or two
            teacher classes that land on one dataset category.
    """
    teacher = _check_names(teacher_classes, "teacher_classes")
    dataset = _check_names(dataset_classes, "dataset_classes")
    dataset_keys: dict[str, int] = {}
    for label, name in enumerate(dataset):
        key = normalise_class_name(name)
        if key in dataset_keys:
            raise ClassMappingError(
                f"map_classes(dataset_classes=) expects distinct names. Got {dataset[dataset_keys[key]]!r} and {name!r}, which match as one."
            )
        dataset_keys[key] = label
    teacher_keys = [normalise_class_name(name) for name in teacher]

    renames: dict[str, str] = {}
    for source, target in (class_map or {}).items():
        if not isinstance(source, str) or not isinstance(target, str):
            raise ClassMappingError(f"map_classes(class_map=) expects teacher name -> dataset name strings. Got {source!r}: {target!r}.")
        if normalise_class_name(source) not in teacher_keys:
            raise ClassMappingError(f"map_classes(class_map=) renames {source!r}, which is not a teacher class. Teacher classes: {list(teacher)}.")
        if normalise_class_name(target) not in dataset_keys:
            raise ClassMappingError(
                f"map_classes(class_map=) maps {source!r} to {target!r}, which is not a dataset category. Dataset categories: {list(dataset)}."
            )
        renames[normalise_class_name(source)] = normalise_class_name(target)

    teacher_index = [-1] * len(dataset)
    dropped = []
    for channel, (name, key) in enumerate(zip(teacher, teacher_keys)):
        label = dataset_keys.get(renames.get(key, key))
        if label is None:
            dropped.append(name)
            continue
        if teacher_index[label] >= 0:
            raise ClassMappingError(
                f"map_classes() maps teacher classes {teacher[teacher_index[label]]!r} and {name!r} both to dataset category "
                f"{dataset[label]!r}. Rename one with class_map or remove the duplicate."
            )
        teacher_index[label] = channel
    missing = tuple(dataset[label] for label, index in enumerate(teacher_index) if index < 0)
    if missing and not allow_missing:
        raise MissingClassesError(
            f"map_classes() finds no teacher class for the dataset categories {list(missing)}. Rename teacher classes with a "
            f"class map (teacher name -> dataset name), or allow missing classes to leave them out of class distillation. "
            f"Teacher classes: {list(teacher)}.",
            missing,
        )
    return ClassMapping(
        teacher_classes=teacher,
        dataset_classes=dataset,
        teacher_index=tuple(teacher_index),
        dropped_teacher_classes=tuple(dropped),
        missing_dataset_classes=missing,
        class_map=tuple((str(k), str(v)) for k, v in (class_map or {}).items()),
    )
