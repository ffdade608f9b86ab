"""One view's targets as one binary blob: the online endpoint's body and the store's checksum.

`encode_targets` quantizes exactly as the store does (same codec, same scale and offset),
without the compressor, so a view fetched over HTTP decodes to the very same float32
values as the view read from a store with the same specs. The store's per-view checksum
is the BLAKE2b-128 of this blob.

Byte layout (all integers and floats little-endian; every section starts on an 8-byte
boundary):

    offset  size    field
    0       4       magic ``b"LSV1"``
    4       4       uint32 Hn: length of the header, a multiple of 8
    8       Hn      header: UTF-8 JSON, sorted keys, no spaces, right-padded with spaces:
                    ``{"format":1,"targets":[{"codec":..,"dtype":"uint8","name":"cls/p3",
                    "params":Pc,"shape":[C,H,W]}, ...]}``
    then for each target, in header order:
                    4*Pc    scale, float32[Pc]
                    4*Pc    offset, float32[Pc]
                    n       values, C*H*W of ``dtype`` in C order, zero-padded to a multiple of 8

Decoding: ``x = offset[c] + scale[c] * code`` for int codecs (Pc = 1 broadcasts over
channels), ``x = float32(value)`` for fp16 / fp32 (Pc = 0). For a predicted int codec
(``-d<axes>``, see `label_store.codecs`) the values are zigzag-mapped residuals: undo the
zigzag, then take cumulative sums mod 256 along the axes to get the codes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from label_store.errors import CorruptDataError
from label_store.schema import TargetSpec

MAGIC = b"LSV1"
BLOB_FORMAT = 1
CHECKSUM_ALGORITHM = "blake2b-128 of encode_targets(view)"


@dataclass(frozen=True, slots=True)
class EncodedTarget:
    """One target of one view after the storage half of its codec (before compression)."""

    codes: np.ndarray
    """array[C, H, W] of the codec's dtype (uint8, float16 or float32)."""
    scale: np.ndarray
    """float32 array[Pc]; empty for float storage."""
    offset: np.ndarray
    """float32 array[Pc]; empty for float storage."""


@dataclass(frozen=True, slots=True)
class QuantizedTarget:
    """A target already quantized by its int codec, e.g. on the teacher's GPU: one view's, or a batch's.

    The fields are what the codec's own quantization computes (`TargetCodec.encode`, before
    any prediction): ``codes = clip(rint((x - offset) * (1 / scale)), 0, 2**bits - 1)`` with
    ``offset`` the minimum and ``scale`` the range over ``2**bits - 1`` (per view, or per
    channel), so a writer given these stores the same bytes as one given ``x``.

    One view's value is what `label_store.writer.PartWriter.append` takes. A batch's has a
    leading view axis B on every field (numpy arrays, or tensors on the device that
    quantized them); `row` picks one view's. It unpacks as ``(codes, scale, offset)``, the
    order of `TargetCodec.encode`.
    """

    codes: np.ndarray
    """uint8 array[C, H, W] (one view) or [B, C, H, W] (a batch), each at most 2**bits - 1."""
    scale: np.ndarray
    """float32 array[Pc] or [B, Pc], >= 0."""
    offset: np.ndarray
    """float32 array[Pc] or [B, Pc]."""

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.codes, self.scale, self.offset))

    def row(self, index: int) -> "QuantizedTarget":
        """View ``index`` of a batch's value."""
        return QuantizedTarget(self.codes[index], self.scale[index], self.offset[index])


def encode_inputs(
    targets: Mapping[str, object],
    specs: Sequence[TargetSpec],
    where: str,
    keep: Mapping[str, np.ndarray] | None = None,
    layout: str = "points",
) -> tuple[dict[str, EncodedTarget], dict[str, np.ndarray]]:
    """Validate and encode one view's targets, each a float array or (int codecs) a `QuantizedTarget`.

    ``keep``: name -> bool array[H, W] of the points to store, for targets held only in a
    region (`TargetCodec.encode`), in ``layout``'s order; the others are stored whole.

    Returns:
        ``(encoded, floats)``: every target encoded by its spec's storage codec, and the
        float32 arrays of the targets that were given as floats.
    """
    if not isinstance(targets, Mapping):
        raise ValueError(f"{where} expects targets as a dict of name -> array[C, H, W]. Got {type(targets).__name__}.")
    _check_names(targets, specs, where)
    keep = dict(keep or {})
    given = [spec for spec in specs if not isinstance(targets[spec.name], QuantizedTarget)]
    floats = check_targets({spec.name: targets[spec.name] for spec in given}, given, where)
    encoded = encode_view(floats, given, keep, layout)
    for spec in specs:
        if spec.name in encoded:
            continue
        encoded[spec.name] = _check_quantized(spec, targets[spec.name], where, keep.get(spec.name), layout)
    return {spec.name: encoded[spec.name] for spec in specs}, floats


def _check_names(targets: Mapping[str, object], specs: Sequence[TargetSpec], where: str) -> None:
    wanted = [spec.name for spec in specs]
    missing = sorted(set(wanted) - set(targets))
    extra = sorted(set(targets) - set(wanted))
    if missing or extra:
        raise ValueError(f"{where} expects exactly the targets {wanted}. Missing {missing}, unexpected {extra}.")


def _check_quantized(
    spec: TargetSpec, value: QuantizedTarget, where: str, keep: np.ndarray | None = None, layout: str = "points"
) -> EncodedTarget:
    codec = spec.target_codec
    if codec.needs_basis:
        raise ValueError(f"{where} expects {spec.name} as a float array: its codec {spec.codec} projects the values itself. Got a QuantizedTarget.")
    if not codec.quantized:
        raise ValueError(
            f"{where} expects {spec.name} as a float array: its codec {spec.codec} does not quantize. Got a QuantizedTarget."
        )
    codes = np.asarray(value.codes)
    if codes.dtype != np.uint8 or codes.shape != spec.shape:
        raise ValueError(
            f"{where} expects {spec.name} codes as uint8 of shape {spec.shape} (C, H, W). Got {codes.dtype} {codes.shape}."
        )
    levels = (1 << codec.bits) - 1
    if codes.size and int(codes.max()) > levels:
        raise ValueError(f"{where} expects {spec.name} codes in [0, {levels}] ({codec.bits} bits). Got {int(codes.max())}.")
    count = codec.num_params(spec.shape[0])
    params = []
    for field in ("scale", "offset"):
        array = np.asarray(getattr(value, field))
        if array.shape != (count,) or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{where} expects {spec.name} {field} as a float array of shape ({count},). Got {array.dtype} {array.shape}."
            )
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all() or (field == "scale" and (array < 0).any()):
            raise ValueError(f"{where} expects a finite{' non-negative' if field == 'scale' else ''} {spec.name} {field}. Got {array}.")
        params.append(array)
    return EncodedTarget(codec.stored_codes(np.ascontiguousarray(codes), keep, layout), params[0], params[1])


def check_targets(targets: Mapping[str, object], specs: Sequence[TargetSpec], where: str) -> dict[str, np.ndarray]:
    """Validate names, shapes and finiteness; return float32 arrays by name.

    ``where`` names the caller and the view for the error message, e.g.
    ``"PartWriter.append (image_id=3, view_id=1)"``.
    """
    if not isinstance(targets, Mapping):
        raise ValueError(f"{where} expects targets as a dict of name -> array[C, H, W]. Got {type(targets).__name__}.")
    _check_names(targets, specs, where)
    out = {}
    for spec in specs:
        value = targets[spec.name]
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if array.shape != spec.shape:
            raise ValueError(f"{where} expects {spec.name} of shape {spec.shape} (C, H, W). Got {array.shape}.")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{where} expects a real-valued {spec.name}. Got dtype {array.dtype}.")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ValueError(f"{where} expects finite values in {spec.name}. Got {bad} NaN/inf values.")
        out[spec.name] = array
    return out


def encode_view(
    targets: Mapping[str, np.ndarray],
    specs: Sequence[TargetSpec],
    keep: Mapping[str, np.ndarray] | None = None,
    layout: str = "points",
) -> dict[str, EncodedTarget]:
    """Apply each spec's storage codec to already validated float32 targets (``keep``, ``layout``: see `encode_inputs`)."""
    encoded = {}
    keep = keep or {}
    for spec in specs:
        codes, scale, offset = spec.target_codec.encode(targets[spec.name], keep.get(spec.name), layout)
        encoded[spec.name] = EncodedTarget(codes, scale, offset)
    return encoded


def decode_encoded(spec: TargetSpec, encoded: EncodedTarget, keep: np.ndarray | None = None, layout: str = "points") -> np.ndarray:
    """float32 array[C, H, W] of one encoded target (``keep``, ``layout``: its region, `TargetCodec.decode`)."""
    return spec.target_codec.decode(encoded.codes, encoded.scale, encoded.offset, keep, layout)


def _header(specs: Sequence[TargetSpec]) -> bytes:
    entries = []
    for spec in specs:
        codec = spec.target_codec
        entries.append(
            {
                "codec": spec.codec,
                "dtype": codec.dtype.name,
                "name": spec.name,
                "params": codec.num_params(spec.shape[0]),
                "shape": list(spec.shape),
            }
        )
    text = json.dumps({"format": BLOB_FORMAT, "targets": entries}, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _pad(nbytes: int) -> bytes:
    return b"\0" * (-nbytes % 8)


def iter_blob(specs: Sequence[TargetSpec], encoded: Mapping[str, EncodedTarget]) -> Iterator[bytes | memoryview]:
    """The pieces of the blob in order (hash them, or join them)."""
    header = _header(specs)
    yield MAGIC + struct.pack("<I", len(header))
    yield header
    for spec in specs:
        item = encoded[spec.name]
        codec = spec.target_codec
        params = codec.num_params(spec.shape[0])
        if item.scale.size != params or item.offset.size != params:
            raise ValueError(f"encode_targets expects {params} scale/offset values for {spec.name}. Got {item.scale.size}.")
        if params:
            yield np.ascontiguousarray(item.scale, dtype="<f4").tobytes()
            yield np.ascontiguousarray(item.offset, dtype="<f4").tobytes()
        codes = np.ascontiguousarray(item.codes, dtype=codec.dtype.newbyteorder("<"))
        yield memoryview(codes).cast("B")
        yield _pad(codes.nbytes)


def view_checksum(specs: Sequence[TargetSpec], encoded: Mapping[str, EncodedTarget]) -> str:
    """BLAKE2b-128 hex digest of the blob `encode_targets` would return for this view."""
    digest = hashlib.blake2b(digest_size=16)
    for piece in iter_blob(specs, encoded):
        digest.update(piece)
    return digest.hexdigest()


def encode_targets(targets: Mapping[str, np.ndarray], specs: Sequence[TargetSpec]) -> bytes:
    """One view's targets, quantized as in the store, as one blob (layout in the module docstring).

    Args:
        targets: name -> float32 array[C, H, W] for exactly the names of ``specs``.
        specs: the targets and codecs, in blob order (use the store's ``targets``).
    """
    arrays = check_targets(targets, specs, "encode_targets(targets=)")
    return b"".join(bytes(piece) for piece in iter_blob(specs, encode_view(arrays, specs)))


def parse_blob(blob: bytes, specs: Sequence[TargetSpec]) -> dict[str, EncodedTarget]:
    """Split a blob into its encoded targets, checking it matches ``specs``."""
    view = memoryview(blob)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise CorruptDataError(f"decode_targets(blob=) expects a blob starting with {MAGIC!r}. Got {bytes(view[:4])!r}.")
    (header_len,) = struct.unpack("<I", view[4:8])
    if 8 + header_len > len(view):
        raise CorruptDataError(f"decode_targets(blob=) expects a header of {header_len} bytes. Got a blob of {len(view)} bytes.")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptDataError(f"decode_targets(blob=) expects a JSON header. Got an unreadable one: {error}.") from None
    if header.get("format") != BLOB_FORMAT:
        raise CorruptDataError(f"decode_targets(blob=) expects blob format {BLOB_FORMAT}. Got {header.get('format')!r}.")
    got = [(t["name"], tuple(t["shape"]), t["codec"]) for t in header["targets"]]
    wanted = [(s.name, s.shape, s.codec) for s in specs]
    if got != wanted:
        raise ValueError(f"decode_targets(specs=) expects the blob's targets {got}. Got specs {wanted}.")
    position = 8 + header_len
    out = {}
    for spec in specs:
        codec = spec.target_codec
        params = codec.num_params(spec.shape[0])
        nbytes = spec.num_elements * codec.dtype.itemsize
        end = position + 8 * params + nbytes + (-nbytes % 8)
        if end > len(view):
            raise CorruptDataError(f"decode_targets(blob=) expects at least {end} bytes for {spec.name}. Got {len(view)} (truncated).")
        scale = np.frombuffer(view, "<f4", params, position).astype(np.float32)
        offset = np.frombuffer(view, "<f4", params, position + 4 * params).astype(np.float32)
        codes = np.frombuffer(view, codec.dtype.newbyteorder("<"), spec.num_elements, position + 8 * params)
        out[spec.name] = EncodedTarget(codes.reshape(spec.shape), scale, offset)
        position = end
    if position != len(view):
        raise CorruptDataError(f"decode_targets(blob=) expects {position} bytes. Got {len(view)}.")
    return out


def decode_targets(blob: bytes, specs: Sequence[TargetSpec]) -> dict[str, np.ndarray]:
    """Inverse of `encode_targets`: name -> float32 array[C, H, W]."""
    return {spec.name: decode_encoded(spec, item) for spec, item in zip(specs, parse_blob(blob, specs).values())}
