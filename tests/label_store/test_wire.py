"""label_store.wire: the multi-view targets body of the online endpoint."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from label_store import TargetSpec, decode_targets, default_target_specs, encode_targets
from label_store.wire import (
    MAGIC,
    WIRE_VERSION,
    WireFormatError,
    fingerprint_digest,
    pack_targets,
    read_header,
    unpack_targets,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

FINGERPRINT = {
    "architecture": "gfl_tiny",
    "checkpoint_sha256": "ab" * 32,
    "classes": ["a", "b"],
    "canvas_hw": [32, 32],
    "strides": [8, 16],
    "reg_max": 4,
    "preprocessing": {"mean": [1.0, 2.0, 3.0]},
}


def _specs(codecs=None):
    return default_target_specs(
        num_classes=2, reg_max=4, canvas_hw=(32, 32), strides=(8, 16), fpn_channels=4, codecs=codecs
    )


def _entries(specs, num_views=3, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image_id": 10 + i,
            "view_id": i % 2,
            "content_hash": f"{i:032x}",
            "targets": {s.name: rng.normal(size=s.shape).astype(np.float32) * 3 for s in specs},
        }
        for i in range(num_views)
    ]


def test_round_trip_equals_the_store_encoding_of_each_view():
    specs = _specs()
    entries = _entries(specs)
    body = pack_targets(entries, specs, FINGERPRINT)
    fingerprint, got_specs, got = unpack_targets(body)
    assert fingerprint == FINGERPRINT
    assert [s.to_dict() for s in got_specs] == [s.to_dict() for s in specs]
    assert [(e["image_id"], e["view_id"], e["content_hash"]) for e in got] == [
        (e["image_id"], e["view_id"], e["content_hash"]) for e in entries
    ]
    header, start = read_header(body)
    for row, entry, decoded in zip(header["views"], entries, got):
        blob = body[start + row["offset"] : start + row["offset"] + row["length"]]
        # Each view's bytes are exactly the label store's per-view encoding.
        assert blob == encode_targets(entry["targets"], specs)
        expected = decode_targets(blob, specs)
        for name in expected:
            assert decoded["targets"][name].dtype == np.float32
            np.testing.assert_array_equal(decoded["targets"][name], expected[name])
            # Lossy codecs stay close to the float32 input.
            scale = float(np.abs(entry["targets"][name]).max())
            assert np.abs(decoded["targets"][name] - entry["targets"][name]).max() <= 0.2 * scale


def test_fp32_codec_is_exact():
    specs = _specs(codecs={"cls": "fp32", "box": "fp32", "fpn": "fp32"})
    entries = _entries(specs, num_views=2, seed=1)
    _, _, got = unpack_targets(pack_targets(entries, specs, FINGERPRINT))
    for entry, decoded in zip(entries, got):
        for name, array in entry["targets"].items():
            np.testing.assert_array_equal(decoded["targets"][name], array)


def test_layout_preamble_and_contiguous_offsets():
    specs = _specs()
    body = pack_targets(_entries(specs), specs, FINGERPRINT)
    magic, version, header_length = struct.unpack_from("<4sII", body, 0)
    assert (magic, version) == (MAGIC, WIRE_VERSION)
    header = json.loads(body[12 : 12 + header_length])
    assert set(header) == {"fingerprint", "targets", "views"}
    offsets = [(v["offset"], v["length"]) for v in header["views"]]
    assert offsets[0][0] == 0
    for (o1, l1), (o2, _) in zip(offsets, offsets[1:]):
        assert o2 == o1 + l1
    assert 12 + header_length + offsets[-1][0] + offsets[-1][1] == len(body)


def test_empty_batch():
    specs = _specs()
    fingerprint, got_specs, entries = unpack_targets(pack_targets([], specs, FINGERPRINT))
    assert entries == [] and len(got_specs) == len(specs) and fingerprint == FINGERPRINT


def test_fingerprint_digest_is_sha256_of_canonical_json():
    expected = hashlib.sha256(json.dumps(FINGERPRINT, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert fingerprint_digest(FINGERPRINT) == expected
    reordered = dict(reversed(list(FINGERPRINT.items())))
    assert fingerprint_digest(reordered) == expected
    assert fingerprint_digest({**FINGERPRINT, "reg_max": 5}) != expected
    assert len(expected) == 64


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"JSON" + b[4:], "magic"),
        (lambda b: b[:4] + struct.pack("<I", 99) + b[8:], "version"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"\0" * 3, "padded"),
        (lambda b: b[:8] + struct.pack("<I", 10**9) + b[12:], "header"),
        (lambda b: b[:6], "at least"),
    ],
    ids=["magic", "version", "truncated", "padded", "header-length", "short"],
)
def test_malformed_bodies_raise_wire_format_error(mutate, match):
    specs = _specs()
    body = pack_targets(_entries(specs, num_views=2), specs, FINGERPRINT)
    with pytest.raises(WireFormatError, match=match):
        unpack_targets(mutate(body))


def test_non_json_header_and_bad_offsets():
    specs = _specs()
    body = pack_targets(_entries(specs, num_views=2), specs, FINGERPRINT)
    _, _, header_length = struct.unpack_from("<4sII", body, 0)
    broken = body[:12] + b"{" * header_length + body[12 + header_length :]
    with pytest.raises(WireFormatError, match="JSON"):
        unpack_targets(broken)
    header = json.loads(body[12 : 12 + header_length])
    header["views"][1]["offset"] += 8
    raw = json.dumps(header).encode()
    with pytest.raises(WireFormatError, match="contiguous"):
        unpack_targets(struct.pack("<4sII", MAGIC, WIRE_VERSION, len(raw)) + raw + body[12 + header_length :])


def test_pack_refuses_missing_keys_and_targets():
    specs = _specs()
    entries = _entries(specs, num_views=1)
    with pytest.raises(ValueError, match="content_hash"):
        pack_targets([{k: v for k, v in entries[0].items() if k != "content_hash"}], specs, FINGERPRINT)
    partial = dict(entries[0], targets={specs[0].name: entries[0]["targets"][specs[0].name]})
    with pytest.raises(ValueError, match="image_id=10"):
        pack_targets([partial], specs, FINGERPRINT)
    with pytest.raises(TypeError):
        fingerprint_digest(["not", "a", "dict"])


def test_subset_of_specs_round_trips():
    specs = [s for s in _specs() if s.name.startswith("cls/")]
    assert all(isinstance(s, TargetSpec) for s in specs)
    entries = _entries(specs, num_views=2)
    _, got_specs, got = unpack_targets(pack_targets(entries, specs, FINGERPRINT))
    assert [s.name for s in got_specs] == ["cls/p3", "cls/p4"]
    assert sorted(got[0]["targets"]) == ["cls/p3", "cls/p4"]


def test_imports_and_works_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from label_store import default_target_specs\n"
        "from label_store.wire import pack_targets, unpack_targets\n"
        "specs = default_target_specs(num_classes=2, reg_max=4, canvas_hw=(16, 16), strides=(8,), fpn_channels=2)\n"
        "entry = {'image_id': 1, 'view_id': 0, 'content_hash': 'x',"
        " 'targets': {s.name: np.ones(s.shape, np.float32) for s in specs}}\n"
        "_, _, got = unpack_targets(pack_targets([entry], specs, {'a': 1}))\n"
        "print(sorted(got[0]['targets']))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cls/p3" in result.stdout
