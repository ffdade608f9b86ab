"""Import foreign detector checkpoints as native, self-describing distillery teachers.

`import_teacher` reads a source file (mmdetection GFL, torchvision FCOS / RetinaNet
state dict), converts it with the format's module and writes a format-version-2
checkpoint (`detcore.checkpoint`) that `detcore.checkpoint.load_detector` loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

IMPORT_FORMATS = ("mmdet-gfl", "torchvision-fcos", "torchvision-retinanet")
# Canvas (H, W) recorded with an imported teacher: mmdetection's and torchvision's test scale (1333, 800).
DEFAULT_IMPORT_CANVAS_HW = (800, 1333)


class TeacherImportError(ValueError):
    """A source file or option that cannot be imported (names the flag, the count or the keys)."""


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line, surrounding spaces stripped; blank lines ignored.

    Names may repeat (torchvision's COCO list has several ``N/A`` channels); mapping to a
    dataset's categories happens at precompute.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherImportError(f"--class-names expects a text file with one class name per line. Got {str(path)!r}, which does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TeacherImportError(f"--class-names expects a UTF-8 text file. Could not decode {str(path)!r}: {error}.") from error
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise TeacherImportError(f"--class-names expects at least one class name. {str(path)!r} holds none.")
    return names


def _read_source(path: Path, allow_pickle: bool) -> Any:
    import pickle

    import torch

    with path.open("rb") as stream:
        head = stream.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise TeacherImportError(
            f"--checkpoint expects a file written by torch.save. {str(path)!r} is neither a zip archive nor a pickle."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherImportError(
            f"--checkpoint {str(path)!r} holds objects other than tensors and plain values ({first}). If you trust the "
            "file, re-run with --allow-pickle (it runs code from the file)."
        ) from error
    except Exception as error:  # zip, EOF and runtime errors all mean "not a torch.save file"
        raise TeacherImportError(
            f"--checkpoint expects a file written by torch.save. Could not read {str(path)!r}: {type(error).__name__}."
        ) from error


def convert_source(
    source_format: str, source: Any, class_names: Sequence[str] | None
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``(architecture, model_state, classes)`` of a loaded source file; one branch per format."""
    if isinstance(source, dict) and source.get("format") == "distillery.detector":
        raise TeacherImportError(
            f"--checkpoint is already a distillery checkpoint (format_version {source.get('format_version')}); use it as "
            "a teacher directly, without importing."
        )
    if source_format == "mmdet-gfl":
        from detcore.importers.mmdet_gfl import MMDetImportError, convert_mmdet_gfl

        try:
            return convert_mmdet_gfl(source, class_names)
        except MMDetImportError as error:
            raise TeacherImportError(f"--checkpoint (--format mmdet-gfl): {error}") from error
    if source_format in ("torchvision-fcos", "torchvision-retinanet"):
        if class_names is None:
            raise TeacherImportError(
                f"--format {source_format} needs --class-names FILE: torchvision state dicts carry no class names."
            )
        if not isinstance(source, dict) or "state_dict" in source or "model" in source:
            keys = sorted(source)[:8] if isinstance(source, dict) else type(source).__name__
            raise TeacherImportError(
                f"--checkpoint (--format {source_format}) expects a torchvision model's state_dict (tensors by name). "
                f"Got top-level {keys}."
            )
        from detcore.importers.torchvision_models import convert_torchvision_state

        try:
            return convert_torchvision_state(source_format.split("-", 1)[1], source, class_names)
        except (KeyError, ValueError) as error:
            raise TeacherImportError(f"--checkpoint (--format {source_format}): {error}") from error
    raise TeacherImportError(f"--format expects one of {list(IMPORT_FORMATS)}. Got {source_format!r}.")


def import_teacher(
    source_format: str,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    class_names: str | os.PathLike | None = None,
    canvas_hw: tuple[int, int] = DEFAULT_IMPORT_CANVAS_HW,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Convert ``checkpoint`` and write the native teacher ``out`` atomically.

    Returns:
        A summary: ``out``, ``family``, ``classes`` (count), ``strides``, ``reg_max``, ``source_sha256``.

    Raises:
        TeacherImportError: unknown format, unreadable or foreign file, missing / unknown keys,
            class names missing or of another count than the classifier's outputs.
    """
    from detcore.checkpoint import (
        CHECKPOINT_FORMAT,
        IMPORTED_FORMAT_VERSIONS,
        checkpoint_sha256,
        preprocessing_spec,
        write_checkpoint_payload,
    )

    if source_format not in IMPORT_FORMATS:
        raise TeacherImportError(f"--format expects one of {list(IMPORT_FORMATS)}. Got {source_format!r}.")
    source_path = Path(checkpoint)
    if not source_path.is_file():
        raise TeacherImportError(f"--checkpoint expects an existing file. Got {str(source_path)!r}, which does not exist.")
    names = read_class_names(class_names) if class_names is not None else None
    source = _read_source(source_path, allow_pickle)
    architecture, model_state, classes = convert_source(source_format, source, names)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": IMPORTED_FORMAT_VERSIONS[-1],
        "architecture": architecture,
        "classes": list(classes),
        "canvas_hw": [int(canvas_hw[0]), int(canvas_hw[1])],
        "preprocessing": preprocessing_spec(),
        "point_offset": 0.0,
        "source_format": source_format,
        "source_sha256": checkpoint_sha256(source_path),
        "model_state": {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
        "training": None,
        "metadata": {"source_file": source_path.name},
    }
    write_checkpoint_payload(out, payload)
    return {
        "out": str(out),
        "family": architecture["family"],
        "classes": len(classes),
        "strides": list(architecture.get("strides", [])),
        "reg_max": architecture.get("reg_max"),
        "source_sha256": payload["source_sha256"],
    }
