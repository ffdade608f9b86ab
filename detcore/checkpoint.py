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

Imported teachers (`detcore.importers`, ``distill teacher import``) are format_version 2
and carry, instead of ``detector_config``:

    architecture      plain dict; "family" is "mmdet-gfl", "torchvision-fcos" or "torchvision-retinanet"
    point_offset      0.0: cell (x, y) of stride s sits at (x * s, y * s)
    source_format     the ``--format`` it was imported from
    source_sha256     hex SHA-256 of the imported file

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
IMPORTED_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)


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
    version = payload.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"load_checkpoint(path=) expects format_version in {list(SUPPORTED_FORMAT_VERSIONS)}. Got {version!r} in "
            f"{str(path)!r}; it was written by another version of distillery."
        )
    config_key = "architecture" if version >= IMPORTED_FORMAT_VERSION else "detector_config"
    for key in (config_key, "classes", "canvas_hw", "preprocessing", "model_state"):
        if key not in payload:
            raise CheckpointError(f"load_checkpoint(path=) expects key {key!r}. Missing in {str(path)!r}.")
    return payload


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild the detector of a checkpoint, in eval mode.

    Returns:
        ``(GFLDetector, meta)`` where ``meta`` holds ``detector_config`` (a `DetectorConfig`),
        ``classes``, ``canvas_hw`` (tuple), ``preprocessing``, ``metadata``, ``format_version``
        and ``path``.
    """
    from detcore.models.gfl import DetectorConfig, build_detector_from_config

    payload = load_checkpoint(path, map_location=map_location)
    family = (payload.get("architecture") or {}).get("family", "gfl")
    if family != "gfl":
        return _load_imported(path, payload, family, map_location)
    try:
        config = DetectorConfig.from_dict(payload["detector_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"load_detector(path=) expects a valid detector_config. Got an invalid one in {str(path)!r}: {error}") from error
    model = build_detector_from_config(config, load_backbone_weights=False)
    missing, unexpected = model.load_state_dict(payload["model_state"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"load_detector(path=) expects weights matching {config.arch}. In {str(path)!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.to(map_location)
    model.eval()
    meta = {
        "detector_config": config,
        "classes": tuple(payload["classes"]),
        "canvas_hw": (int(payload["canvas_hw"][0]), int(payload["canvas_hw"][1])),
        "preprocessing": payload["preprocessing"],
        "metadata": payload.get("metadata") or {},
        "format_version": payload["format_version"],
        "path": str(path),
    }
    return model, meta


def _load_imported(path, payload: dict[str, Any], family: str, map_location):
    """The module of an imported teacher (`load_detector` for a non-native ``architecture``)."""
    architecture = payload["architecture"]
    if family == "mmdet-gfl":
        from detcore.importers.mmdet_gfl import build_mmdet_gfl

        model = build_mmdet_gfl(architecture)
    elif family in ("torchvision-fcos", "torchvision-retinanet"):
        from detcore.importers.torchvision_models import build_torchvision_detector

        model = build_torchvision_detector(architecture)
    else:
        raise CheckpointError(
            f"load_detector(path=) expects architecture family 'gfl', 'mmdet-gfl', 'torchvision-fcos' or "
            f"'torchvision-retinanet'. Got {family!r} in {str(path)!r}."
        )
    missing, unexpected = model.load_state_dict(payload["model_state"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"load_detector(path=) expects weights matching its {family} architecture. In {str(path)!r}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.to(map_location)
    model.eval()
    meta = {
        "detector_config": None,
        "architecture": architecture,
        "classes": tuple(payload["classes"]),
        "canvas_hw": (int(payload["canvas_hw"][0]), int(payload["canvas_hw"][1])),
        "preprocessing": payload["preprocessing"],
        "point_offset": float(payload["point_offset"]),
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
    ``strides`` (list), ``reg_max``, ``preprocessing`` (dict).
    """
    payload = load_checkpoint(path)
    if "architecture" in payload:
        architecture = payload["architecture"]
        return {
            "architecture": str(architecture.get("name", architecture["family"])),
            "checkpoint_sha256": checkpoint_sha256(path),
            "classes": [str(c) for c in payload["classes"]],
            "canvas_hw": [int(v) for v in payload["canvas_hw"]],
            "strides": [int(s) for s in architecture["strides"]],
            "reg_max": architecture.get("reg_max"),
            "preprocessing": dict(payload["preprocessing"]),
            "point_offset": float(payload["point_offset"]),
        }
    config = payload["detector_config"]
    return {
        "architecture": str(config["arch"]),
        "checkpoint_sha256": checkpoint_sha256(path),
        "classes": [str(c) for c in payload["classes"]],
        "canvas_hw": [int(v) for v in payload["canvas_hw"]],
        "strides": [int(s) for s in config["strides"]],
        "reg_max": int(config["reg_max"]),
        "preprocessing": dict(payload["preprocessing"]),
    }
