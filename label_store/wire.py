"""The binary body that carries the targets of several views over HTTP (or a Ray handle).

The online endpoint answers ``POST /v1/targets`` with this body and the trainer's remote
target source reads it; both sides need only numpy and the standard library (no torch).
Each view's targets are encoded with `label_store.encode_targets`, so the bytes of one
view are the same encoding and byte layout as one view of a store with the same specs.

Layout (all integers little-endian)::

    offset 0   4 bytes   magic b"DSTL"
    offset 4   uint32    wire version (1)
    offset 8   uint32    header length N in bytes
    offset 12  N bytes   UTF-8 JSON header:
                           {"fingerprint": {...teacher fingerprint...},
                            "targets": [TargetSpec.to_dict(), ...],
                            "views": [{"image_id", "view_id", "content_hash",
                                       "offset", "length"}, ...]}
    offset 12+N          payload: the concatenated per-view blobs; a view's blob is
                         payload[offset : offset + length]

Views appear in request order; blobs are contiguous and cover the payload exactly, so a
truncated or padded body is detected.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Mapping, Sequence

import numpy as np

MAGIC = b"DSTL"
WIRE_VERSION = 1
MEDIA_TYPE = "application/vnd.distillery.targets"
FINGERPRINT_HEADER = "X-Teacher-Fingerprint"
_PREAMBLE = struct.Struct("<4sII")
_VIEW_KEYS = ("image_id", "view_id", "content_hash")


class WireFormatError(ValueError):
    """A body that is not a well-formed targets message (bad magic, version, lengths, JSON)."""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that fingerprints are hashed in."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON of a teacher fingerprint dict.

    Sent as the ``X-Teacher-Fingerprint`` header; a client compares it with the digest of
    the fingerprint it expects (e.g. its store's) before using any target.
    """
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint_digest(fingerprint=) expects a dict. Got {type(fingerprint).__name__}.")
    return hashlib.sha256(canonical_json(dict(fingerprint)).encode("utf-8")).hexdigest()


def _spec_to_dict(spec: Any) -> dict[str, Any]:
    return spec.to_dict()


def pack_targets(entries: Sequence[Mapping[str, Any]], specs: Sequence[Any], fingerprint: Mapping[str, Any]) -> bytes:
    """Encode the targets of several views into one body.

    Args:
        entries: per view, a dict with ``image_id`` (int), ``view_id`` (int),
            ``content_hash`` (str) and ``targets`` (name -> ndarray, the arrays of one view
            in the shapes of ``specs``, without a batch dimension).
        specs: the `label_store.TargetSpec` of every target sent, in order; every entry
            carries exactly these names.
        fingerprint: the teacher fingerprint dict (JSON-serialisable).

    Returns:
        The body described in the module docstring.
    """
    from label_store import encode_targets

    names = [spec.name for spec in specs]
    blobs: list[bytes] = []
    views: list[dict[str, Any]] = []
    offset = 0
    for index, entry in enumerate(entries):
        missing = [key for key in (*_VIEW_KEYS, "targets") if key not in entry]
        if missing:
            raise ValueError(f"pack_targets(entries=) expects keys {[*_VIEW_KEYS, 'targets']}. Entry {index} lacks {missing}.")
        targets = entry["targets"]
        if sorted(targets) != sorted(names):
            raise ValueError(
                f"pack_targets(entries=) expects targets {names} for every view. Got {sorted(targets)} for "
                f"image_id={entry['image_id']} view_id={entry['view_id']}."
            )
        blob = encode_targets({name: np.asarray(targets[name]) for name in names}, list(specs))
        views.append(
            {
                "image_id": int(entry["image_id"]),
                "view_id": int(entry["view_id"]),
                "content_hash": str(entry["content_hash"]),
                "offset": offset,
                "length": len(blob),
            }
        )
        blobs.append(blob)
        offset += len(blob)
    header = {"fingerprint": dict(fingerprint), "targets": [_spec_to_dict(spec) for spec in specs], "views": views}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([_PREAMBLE.pack(MAGIC, WIRE_VERSION, len(header_bytes)), header_bytes, *blobs])


def read_header(body: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the payload's start offset; checks magic, version and lengths."""
    view = memoryview(body)
    if len(view) < _PREAMBLE.size:
        raise WireFormatError(f"unpack_targets(body=) expects at least {_PREAMBLE.size} bytes. Got {len(view)}.")
    magic, version, header_length = _PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireFormatError(
            f"unpack_targets(body=) expects the magic {MAGIC!r}. Got {bytes(magic)!r}; "
            "is this a problem document (JSON) or another content type?"
        )
    if version != WIRE_VERSION:
        raise WireFormatError(
            f"unpack_targets(body=) expects wire version {WIRE_VERSION}. Got {version}; upgrade the client or server."
        )
    start = _PREAMBLE.size + header_length
    if start > len(view):
        raise WireFormatError(f"unpack_targets(body=) expects a {header_length}-byte header. Got a {len(view)}-byte body.")
    try:
        header = json.loads(bytes(view[_PREAMBLE.size : start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireFormatError(f"unpack_targets(body=) expects a JSON header. Got {error}.") from error
    if not isinstance(header, dict) or not {"fingerprint", "targets", "views"} <= set(header):
        raise WireFormatError(
            f"unpack_targets(body=) expects a header with fingerprint, targets and views. Got keys "
            f"{sorted(header) if isinstance(header, dict) else type(header).__name__}."
        )
    payload_length = len(view) - start
    expected = 0
    for index, row in enumerate(header["views"]):
        if not isinstance(row, dict) or not {*_VIEW_KEYS, "offset", "length"} <= set(row):
            raise WireFormatError(f"unpack_targets(body=) expects view rows with {[*_VIEW_KEYS, 'offset', 'length']}. Row {index}: {row!r}.")
        if row["offset"] != expected or row["length"] < 0:
            raise WireFormatError(
                f"unpack_targets(body=) expects contiguous blobs. Row {index} has offset {row['offset']} "
                f"length {row['length']}; expected offset {expected}."
            )
        expected += int(row["length"])
    if expected != payload_length:
        raise WireFormatError(
            f"unpack_targets(body=) expects a payload of {expected} bytes. Got {payload_length} (truncated or padded body)."
        )
    return header, start


def unpack_targets(body: bytes | bytearray | memoryview) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]]]:
    """Decode a body made by `pack_targets`.

    Returns:
        ``(fingerprint, specs, entries)``: the fingerprint dict, the `TargetSpec` list, and
        per view (request order) a dict with ``image_id``, ``view_id``, ``content_hash`` and
        ``targets`` (name -> float32 ndarray as `label_store.decode_targets` returns).

    Raises:
        WireFormatError: the body is not a well-formed message.
    """
    from label_store import TargetSpec, decode_targets

    header, start = read_header(body)
    specs = [TargetSpec.from_dict(row) for row in header["targets"]]
    view = memoryview(body)
    entries = []
    for row in header["views"]:
        blob = bytes(view[start + row["offset"] : start + row["offset"] + row["length"]])
        entries.append(
            {
                "image_id": int(row["image_id"]),
                "view_id": int(row["view_id"]),
                "content_hash": str(row["content_hash"]),
                "targets": decode_targets(blob, specs),
            }
        )
    return dict(header["fingerprint"]), specs, entries
