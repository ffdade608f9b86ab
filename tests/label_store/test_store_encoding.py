"""The one-view blob: layout, round trip, and agreement with the codecs."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from label_store import decode_targets, encode_targets
from label_store.encoding import MAGIC, encode_view, view_checksum
from label_store.errors import CorruptDataError
from label_store.schema import TargetSpec
from label_store.testing import synthetic_targets


def test_round_trip_equals_codec_decode(specs, make_targets):
    targets = make_targets(specs, 5)
    blob = encode_targets(targets, specs)
    decoded = decode_targets(blob, specs)
    assert list(decoded) == [s.name for s in specs]
    for spec in specs:
        codec = spec.target_codec
        expected = codec.decode(*codec.encode(targets[spec.name]))
        assert decoded[spec.name].dtype == np.float32
        assert np.array_equal(decoded[spec.name], expected)
        assert np.all(np.abs(decoded[spec.name] - targets[spec.name]) <= codec.error_bound(targets[spec.name], codec.encode(targets[spec.name])[1]))


def test_layout_header_and_alignment(specs, make_targets):
    blob = encode_targets(make_targets(specs, 1), specs)
    assert blob[:4] == MAGIC
    (header_len,) = struct.unpack("<I", blob[4:8])
    assert header_len % 8 == 0
    header = json.loads(blob[8 : 8 + header_len])
    assert header["format"] == 1
    assert [t["name"] for t in header["targets"]] == [s.name for s in specs]
    expected = 8 + header_len
    for entry, spec in zip(header["targets"], specs):
        nbytes = int(np.prod(entry["shape"])) * np.dtype(entry["dtype"]).itemsize
        expected += 8 * entry["params"] + nbytes + (-nbytes % 8)
        assert entry["params"] == spec.target_codec.num_params(spec.shape[0])
    assert len(blob) == expected
    assert len(blob) % 8 == 0


def test_float_codecs_in_blob():
    specs = [TargetSpec("fpn/p3", (4, 3, 5), "fp16"), TargetSpec("cls/p3", (2, 3, 5), "fp32+zstd5")]
    targets = synthetic_targets(specs, seed=2)
    decoded = decode_targets(encode_targets(targets, specs), specs)
    assert np.array_equal(decoded["cls/p3"], targets["cls/p3"])
    assert np.array_equal(decoded["fpn/p3"], targets["fpn/p3"].astype(np.float16).astype(np.float32))


def test_checksum_is_blake2b_of_blob(specs, make_targets):
    targets = make_targets(specs, 2)
    blob = encode_targets(targets, specs)
    assert view_checksum(specs, encode_view(targets, specs)) == hashlib.blake2b(blob, digest_size=16).hexdigest()


def test_truncated_and_foreign_blobs_raise(specs, make_targets):
    blob = encode_targets(make_targets(specs, 3), specs)
    with pytest.raises(CorruptDataError, match="truncated"):
        decode_targets(blob[:-100], specs)
    with pytest.raises(CorruptDataError, match="LSV1"):
        decode_targets(b"PNG!" + blob[4:], specs)
    with pytest.raises(ValueError, match="blob's targets"):
        decode_targets(blob, specs[:-1])


def test_encode_validates_targets(specs, make_targets):
    targets = make_targets(specs, 4)
    bad = dict(targets)
    bad[specs[0].name] = bad[specs[0].name][:, :-1]
    with pytest.raises(ValueError, match=r"of shape"):
        encode_targets(bad, specs)
    bad = dict(targets)
    bad[specs[0].name] = bad[specs[0].name].copy()
    bad[specs[0].name][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        encode_targets(bad, specs)
    with pytest.raises(ValueError, match="Missing"):
        encode_targets({k: v for k, v in targets.items() if k != specs[1].name}, specs)
