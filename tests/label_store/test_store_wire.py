"""label_store.wire (the multi-view HTTP body) carries exactly the store's per-view encoding."""

from __future__ import annotations

import numpy as np
import pytest

from label_store import encode_targets
from label_store.wire import WireFormatError, fingerprint_digest, pack_targets, read_header, unpack_targets


def test_pack_unpack_round_trip(fingerprint, specs, make_targets):
    entries = [{"image_id": i, "view_id": 1, "content_hash": f"h{i}", "targets": make_targets(specs, i, 1)} for i in (4, 2)]
    body = pack_targets(entries, specs, fingerprint.to_dict())
    got_fingerprint, got_specs, got = unpack_targets(body)
    assert got_fingerprint == fingerprint.to_dict() and got_specs == specs
    assert [(e["image_id"], e["view_id"], e["content_hash"]) for e in got] == [(4, 1, "h4"), (2, 1, "h2")]
    header, start = read_header(body)
    for row, entry, sent in zip(header["views"], got, entries):
        blob = body[start + row["offset"] : start + row["offset"] + row["length"]]
        assert blob == encode_targets(sent["targets"], specs)  # the same bytes a store checksums
        for spec in specs:
            codec = spec.target_codec
            assert np.array_equal(entry["targets"][spec.name], codec.decode(*codec.encode(sent["targets"][spec.name])))
    with pytest.raises(WireFormatError, match="truncated or padded"):
        unpack_targets(body[:-8])
    assert fingerprint_digest(fingerprint.to_dict()) == fingerprint_digest(got_fingerprint)
