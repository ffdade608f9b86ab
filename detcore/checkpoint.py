"""Self-describing detector checkpoints: a teacher loads from its file alone.

A checkpoint is a ``torch.save`` dict of plain types and tensors (it loads with
``weights_only=True``, so a file never executes code):

    format            "distillery.detector"
    format_version    1
    detector_config   `DetectorConfig.to_dict()`
    classes           category names by contiguous label
    canvas_hw         [H, W] the canvas the detector was trained and is served at
    preprocessing     what `detcore.views.render` does (`preprocessing_spec`)
    model_state       the state_dict
    training          None, or the resume state: step, optimizer, scheduler, rng, train config ...
    metadata          free-form plain values (metrics, timings, library versions)
    architecture      optional: {"family": "gfl" | "mmdet-gfl" | "torchvision-fcos" |
                      "torchvision-retinanet", ...}; absent means "gfl" (a native detector)

Imported checkpoints (format_version 2, `distill teacher import`) also carry
``source_format``, ``source_sha256`` and ``point_offset``; their ``detector_config`` may be
absent (the architecture dict describes the model). `load_detector` dispatches on the family.

Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from detcore.views import PIXEL_MEAN, PIXEL_STD

CHECKPOINT_FORMAT = "distillery.detector"
CHECKPOINT_FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
IMPORTED_FORMAT_VERSIONS = (2,)
"""format_version of checkpoints written by `distill teacher import` (those with an imported family)."""
NATIVE_FAMILY = "gfl"
IMPORTED_FAMILIES = ("mmdet-gfl", "torchvision-fcos", "torchvision-retinanet")


class CheckpointError(ValueError):
    """A file that is not a usable distillery detector checkpoint (names the path and what was expected)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


def preprocessing_spec() -> dict[str, Any]:
    """The input convention of every detector here (`detcore.views.render`), as plain JSON."""
    return {
        "channel_order": "RGB",
        "pixel_mean": [float(v) for v in PIXEL_MEAN],
        "pixel_std": [float(v) for v in PIXEL_STD],
        "resize": "PIL bilinear on uint8, aspect ratio kept, scale relative to the canvas fit",
        "placement": "top-left (padding at the bottom and right)",
        "pad_value": 0.0,
        "pad_value_space": "normalised",
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    classes: Sequence[str],
    canvas_hw: tuple[int, int],
    training: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of a `GFLDetector` atomically.

    Args:
        path: destination file (its folder is created).
        model: the detector; its ``config`` (`DetectorConfig`) is stored.
        classes: category names by contiguous label; must have ``num_classes`` entries.
        canvas_hw: canvas (H, W).
        training: resume state (optimizer/scheduler state_dicts, step, rng states ...).
        metadata: free-form plain values.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise CheckpointError(f"save_checkpoint(model=) expects a GFLDetector with a DetectorConfig. Got {type(model).__name__}.")
    classes = [str(c) for c in classes]
    if len(classes) != config.num_classes:
        raise CheckpointError(
            f"save_checkpoint(classes=) expects {config.num_classes} names (the detector's classes). Got {len(classes)}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "detector_config": config.to_dict(),
        "classes": classes,
        "canvas_hw": [int(canvas_hw[0]), int(canvas_hw[1])],
        "preprocessing": preprocessing_spec(),
        "model_state": state,
        "training": training,
        "metadata": dict(metadata or {}),
    }
    return write_checkpoint_payload(path, payload)


def write_checkpoint_payload(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` a checkpoint dict atomically (a temporary in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; returns the dict described in the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"load_checkpoint(path=) expects an existing distillery checkpoint file. Got {str(path)!r}, which "
            f"{'is a directory' if path.is_dir() else 'does not exist'}."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for foreign files
        raise CheckpointError(
            f"load_checkpoint(path=) expects a distillery checkpoint written by torch.save. Could not read "
            f"{str(path)!r}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"load_checkpoint(path=) expects a dict with format={CHECKPOINT_FORMAT!r}. Got format={found!r} in "
            f"{str(path)!r}; it is not a distillery detector checkpoint (train one with `distill detector train`)."
        )
    family = architecture_of(payload, path)["family"]
    version = payload.get("format_version")
    supported = SUPPORTED_FORMAT_VERSIONS if family == NATIVE_FAMILY else IMPORTED_FORMAT_VERSIONS
    if version not in supported:
        raise CheckpointError(
            f"load_checkpoint(path=) expects format_version in {list(supported)}. Got {version!r} in "
            f"{str(path)!r}; it was written by another version of distillery."
        )
    required = ("classes", "canvas_hw", "preprocessing", "model_state")
    for key in (("detector_config",) if family == NATIVE_FAMILY else ()) + required:
        if key not in payload:
            raise CheckpointError(f"load_checkpoint(path=) expects key {key!r}. Missing in {str(path)!r}.")
    return payload


def architecture_of(payload: dict[str, Any], path: str | os.PathLike = "") -> dict[str, Any]:
    """The checkpoint's architecture dict; ``{"family": "gfl"}`` for native checkpoints without one."""
    architecture = payload.get("architecture")
    if architecture is None:
        return {"family": NATIVE_FAMILY}
    families = (NATIVE_FAMILY, *IMPORTED_FAMILIES)
    if not isinstance(architecture, dict) or architecture.get("family") not in families:
        found = architecture.get("family") if isinstance(architecture, dict) else type(architecture).__name__
        raise CheckpointError(
            f"load_checkpoint(path=) expects architecture['family'] in {list(families)}. Got {found!r} in {str(path)!r}."
        )
    return dict(architecture)


def _build_model(payload: dict[str, Any], path: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """The untrained module of a checkpoint's architecture, and its `DetectorConfig` (None when imported)."""
    architecture = architecture_of(payload, path)
    family = architecture["family"]
    if family == "mmdet-gfl":
        from detcore.importers.mmdet_gfl import build_mmdet_gfl

        return build_mmdet_gfl(architecture), None
    if family in ("torchvision-fcos", "torchvision-retinanet"):
        from detcore.importers.torchvision_models import build_torchvision_detector

        return build_torchvision_detector(architecture), None
    from detcore.models.gfl import DetectorConfig, build_detector_from_config

    try:
        config = DetectorConfig.from_dict(payload["detector_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"load_detector(path=) expects a valid detector_config. Got an invalid one in {str(path)!r}: {error}") from error
    return build_detector_from_config(config, load_backbone_weights=False), config


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the detector of any distillery checkpoint (native or imported), in eval mode.

    Its ``forward(images)`` takes Tensor[B, 3, H, W] rendered by `detcore.views.render` and
    returns `detcore.outputs.DenseOutputs`.
    """
    return load_detector_with_meta(path, map_location)[0]


def load_detector_with_meta(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """`load_detector` plus the checkpoint's description.

    Returns:
        ``(model, meta)`` where ``meta`` holds ``detector_config`` (a `DetectorConfig`, None
        for imported checkpoints), ``architecture`` (dict with ``family``), ``classes``,
        ``canvas_hw`` (tuple), ``preprocessing``, ``metadata``, ``format_version`` and ``path``.
    """
    payload = load_checkpoint(path, map_location=map_location)
    model, config = _build_model(payload, path)
    missing, unexpected = model.load_state_dict(payload["model_state"], strict=False)
    if missing or unexpected:
        what = config.arch if config is not None else architecture_of(payload, path)["family"]
        raise CheckpointError(
            f"load_detector(path=) expects weights matching {what}. In {str(path)!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.to(map_location)
    model.eval()
    meta = {
        "detector_config": config,
        "architecture": architecture_of(payload, path),
        "classes": tuple(payload["classes"]),
        "canvas_hw": (int(payload["canvas_hw"][0]), int(payload["canvas_hw"][1])),
        "preprocessing": payload["preprocessing"],
        "metadata": payload.get("metadata") or {},
        "format_version": payload["format_version"],
        "path": str(path),
    }
    return model, meta


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the checkpoint file's bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint_sha256(path=) expects an existing file. Got {str(path)!r}.")
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What a label store records about its teacher, in plain JSON types.

    Keys: ``architecture``, ``checkpoint_sha256``, ``classes`` (list), ``canvas_hw`` (list),
    ``strides`` (list), ``reg_max``, ``preprocessing`` (dict). An imported teacher's
    architecture names its family; its ``preprocessing`` records ``point_offset`` when it is
    not this project's 0.5 (`detcore.outputs.fingerprint_point_offset`), so native
    fingerprints stay as they were.
    """
    from detcore.outputs import DEFAULT_REG_MAX, DEFAULT_STRIDES

    payload = load_checkpoint(path)
    config = payload.get("detector_config") or {}
    architecture = architecture_of(payload, path)
    preprocessing = dict(payload["preprocessing"])
    point_offset = float(payload.get("point_offset", 0.5))
    if point_offset != 0.5:
        preprocessing["point_offset"] = point_offset
    name = config.get("arch") if architecture["family"] == NATIVE_FAMILY else architecture.get("name", architecture["family"])
    reg_max = config.get("reg_max", architecture.get("reg_max")) or DEFAULT_REG_MAX
    return {
        "architecture": str(name),
        "checkpoint_sha256": checkpoint_sha256(path),
        "classes": [str(c) for c in payload["classes"]],
        "canvas_hw": [int(v) for v in payload["canvas_hw"]],
        "strides": [int(s) for s in config.get("strides", architecture.get("strides", DEFAULT_STRIDES))],
        "reg_max": int(reg_max),
        "preprocessing": preprocessing,
    }
