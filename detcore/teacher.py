"""The one teacher API: load any distillery checkpoint and run it as a teacher.

Legend: B images, K classes, C channels, canvas H x W.

`load_teacher(path)` loads a native or imported checkpoint (`detcore.checkpoint.load_detector`)
and returns a `Teacher`: what a label store records about it (`fingerprint`), which target
groups it can give (`available_groups`), the store's target specs for a canvas
(`target_specs`), and a forward that returns `DenseOutputs`. The precompute job, the online
endpoint (`distill serve`), the Ray Data predictor and the in-process target source all go
through it, so a teacher is loaded one way.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from detcore.outputs import DEFAULT_REG_MAX, DenseOutputs

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TeacherGroupError(ValueError):
    """A target group this teacher cannot give (names the group, the teacher and why)."""


def resolve_device(device: str | torch.device) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; others unchanged."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def autocast_dtype(device: str, precision: str):
    """The autocast dtype for a device and precision name, or None for float32.

    ``auto`` is bfloat16 on a GPU that supports it (float16 on older ones) and float32 on
    the CPU, where autocast is slower than float32 for these convolutions.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"autocast_dtype(precision=) expects one of {list(PRECISIONS)}. Got {precision!r}.")
    if precision == "fp32" or (precision == "auto" and not device.startswith("cuda")):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Teacher:
    """A loaded teacher: its description and a forward that returns `DenseOutputs`.

    Build with `load_teacher`. Attributes: ``classes`` (of its ``cls_logits``: the dataset's
    under a class mapping), ``teacher_classes`` (the checkpoint's), ``class_mapping``
    (`detcore.classes.ClassMapping` or None), ``canvas_hw`` (the checkpoint's),
    ``preprocessing``, ``strides``, ``reg_max`` (None without edge distributions),
    ``point_offset``, ``available_groups``, ``architecture`` (the checkpoint's family dict),
    ``device``, ``amp_dtype``, ``model`` and ``path``.
    """

    def __init__(self, model: torch.nn.Module, meta: Mapping[str, Any], *, device: str, amp_dtype=None) -> None:
        self.model = model
        self.path = str(meta["path"])
        self.device = device
        self.amp_dtype = amp_dtype
        self.teacher_classes = tuple(meta["classes"])
        self.classes = self.teacher_classes
        self.class_mapping = None
        self.canvas_hw = tuple(int(v) for v in meta["canvas_hw"])
        self.preprocessing = dict(meta["preprocessing"])
        self.architecture = dict(meta["architecture"])
        self._fingerprint = dict(meta["fingerprint"])
        self._takes_backbone = "with_backbone" in inspect.signature(model.forward).parameters
        probe = self._probe()
        self.strides = tuple(int(s) for s in probe.strides)
        self.reg_max = probe.reg_max
        self.point_offset = float(probe.point_offset)
        self.available_groups = probe.available_groups
        self._channels = {
            "cls": None if probe.cls_logits is None else int(probe.cls_logits[0].shape[1]),
            "fpn": int(probe.fpn_features[0].shape[1]),
            "backbone": None if probe.backbone_features is None else tuple(int(t.shape[1]) for t in probe.backbone_features),
        }

    def use_class_mapping(self, mapping) -> None:
        """Give class logits, ``classes``, the fingerprint and the target specs in a dataset's
        categories from now on (`detcore.classes.map_classes` of ``teacher_classes``); None undoes it.

        The fingerprint records the mapping (``class_mapping``) unless the names are the
        checkpoint's own, in order, so a store of such a teacher keeps its fingerprint.
        """
        if mapping is not None and tuple(mapping.teacher_classes) != self.teacher_classes:
            raise ValueError(
                f"Teacher.use_class_mapping(mapping=) expects a mapping from this teacher's classes {list(self.teacher_classes)}. "
                f"Got one from {list(mapping.teacher_classes)}."
            )
        if mapping is not None and tuple(mapping.dataset_classes) == self.teacher_classes:
            mapping = None
        self.class_mapping = mapping
        self.classes = self.teacher_classes if mapping is None else tuple(mapping.dataset_classes)

    def _run(self, images: Tensor, backbone: bool) -> DenseOutputs:
        if self._takes_backbone:
            return self.model(images, with_backbone=backbone)
        return self.model(images)

    def _probe(self) -> DenseOutputs:
        # Channel counts and groups do not depend on the canvas: a small one where every level,
        # P7 included, is 2x2 (GroupNorm with one channel per group needs more than one value),
        # on one thread (a tiny forward; intra-op threads only cost time on a busy machine).
        side = 256
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return self._run(torch.zeros(1, 3, side, side, device=self.device), True)
        finally:
            torch.set_num_threads(threads)

    def fingerprint(self) -> dict[str, Any]:
        """What a label store records about this teacher (`label_store.TeacherFingerprint` fields)."""
        fingerprint = dict(self._fingerprint)
        if self.class_mapping is not None:
            fingerprint["classes"] = list(self.classes)
            fingerprint["class_mapping"] = self.class_mapping.to_dict()
        return fingerprint

    def check_groups(self, groups: Sequence[str]) -> None:
        """Raise `TeacherGroupError` for every group this teacher cannot give, and say why."""
        missing = [g for g in groups if g not in self.available_groups]
        if missing:
            why = {
                "cls": "it has no per-point class logits",
                "box": "it has no edge distributions (its box regression is not a distribution over bins)",
                "edges": "it has no per-point box regression",
                "backbone": "its backbone exposes no C3..C5 stages",
            }
            family = self.architecture.get("family", "gfl")
            raise TeacherGroupError(
                f"The teacher {self.path!r} ({family}) cannot give the target group(s) {missing}: "
                + "; ".join(f"{g}: {why.get(g, 'not produced')}" for g in missing)
                + f". It gives {list(self.available_groups)}."
            )

    def target_specs(
        self, groups: Sequence[str], canvas_hw: tuple[int, int] | None = None, codecs: Mapping[str, str] | None = None
    ) -> list:
        """The `label_store.TargetSpec` list a store of ``groups`` at ``canvas_hw`` (default: the
        checkpoint's) holds, with the default codecs overridden per group by ``codecs``."""
        from label_store.schema import default_target_specs

        self.check_groups(groups)
        canvas = tuple(int(v) for v in (canvas_hw or self.canvas_hw))
        return default_target_specs(
            num_classes=len(self.classes) if self.class_mapping is not None else self._channels["cls"] or len(self.classes),
            reg_max=int(self.reg_max or DEFAULT_REG_MAX),
            canvas_hw=canvas,
            strides=self.strides,
            fpn_channels=self._channels["fpn"],
            backbone_channels=self._channels["backbone"] if "backbone" in groups else None,
            groups=tuple(groups),
            codecs=dict(codecs) if codecs else None,
        )

    def forward(self, images: Tensor, *, backbone: bool = False) -> DenseOutputs:
        """Tensor[B, 3, H, W] rendered views (`detcore.views.render`) -> the teacher's `DenseOutputs`,
        without gradients, under autocast when the teacher runs in reduced precision; class
        logits in ``classes`` order (`use_class_mapping`)."""
        images = images.to(self.device, non_blocking=True)
        with torch.no_grad():
            if self.amp_dtype is None:
                outputs = self._run(images, backbone)
            else:
                with torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp_dtype):
                    outputs = self._run(images, backbone)
            if self.class_mapping is not None and outputs.cls_logits is not None:
                outputs = dataclasses.replace(outputs, cls_logits=self.class_mapping.apply(outputs.cls_logits))
        return outputs

    __call__ = forward


def load_teacher(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    torch_threads: int | None = None,
    class_mapping=None,
) -> Teacher:
    """Load a native or imported checkpoint as a `Teacher` in eval mode, parameters frozen.

    Args:
        path: a distillery checkpoint (`distill detector train` or `distill teacher import`).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        precision: ``auto`` (bf16/fp16 on a GPU, fp32 on the CPU), ``fp32``, ``bf16``, ``fp16``.
        torch_threads: intra-op threads on the CPU (None leaves torch's default).
        class_mapping: a `detcore.classes.ClassMapping` from the checkpoint's classes to a
            dataset's categories (`Teacher.use_class_mapping`), or None.
    """
    from detcore.checkpoint import load_detector_with_meta, teacher_fingerprint

    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    device = resolve_device(device)
    amp = autocast_dtype(device, precision)
    model, meta = load_detector_with_meta(path, map_location=device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    meta = {**meta, "fingerprint": teacher_fingerprint(path)}
    teacher = Teacher(model, meta, device=device, amp_dtype=amp)
    teacher.use_class_mapping(class_mapping)
    return teacher


__all__ = ["Teacher", "TeacherGroupError", "autocast_dtype", "load_teacher", "resolve_device"]
