"""The direct shard reader returns exactly what zarr-python reads from the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from label_store import TargetSpec, create_store
from label_store.testing import synthetic_targets

CODECS = ["fp32", "fp16+blosc-zstd5-shuffle", "int8-channel+blosc-zstd5-bitshuffle", "int5-view+zstd5", "int8-std8", "int6-view-dchw+zstd15"]


@pytest.mark.parametrize("codec", CODECS)
def test_fast_reader_matches_zarr(tmp_path, fingerprint, codec):
    specs = [
        TargetSpec("cls/p3", (3, 8, 6), codec),
        TargetSpec("box/p4", (32, 4, 3), codec),
        TargetSpec("fpn/p5", (16, 2, 2), codec),
    ]
    url = str(tmp_path / "store.zarr")
    store = create_store(url, fingerprint, specs, views_per_shard=3)
    with store.open_part("p") as part:
        for image_id in range(7):  # shards of 3, 3 and 1 rows
            part.append({"image_id": image_id, "view_id": 0, "view": "{}", "content_hash": "h", "valid_region": (0, 0, 48, 64)},
                        synthetic_targets(specs, seed=image_id))
        part.commit()
    reader = store.reader()
    part_dir = reader._parts[0].part_dir
    root = zarr.open_group(zarr.storage.LocalStore(url), mode="r")
    names = [s.name for s in specs]
    encoded = reader._read_encoded(list(range(7)), names)
    quantized = codec.startswith("int")
    if quantized:
        params = root[f"parts/{part_dir}/quant"][:]
    for row in range(7):
        assert reader._rows[row] == row
        for spec in specs:
            stored = root[f"parts/{part_dir}/{spec.name}"][row]
            assert stored.dtype == encoded[row][spec.name].codes.dtype
            assert np.array_equal(stored, encoded[row][spec.name].codes)
        if quantized:
            flat = np.concatenate([np.concatenate([encoded[row][n].scale, encoded[row][n].offset]) for n in names])
            assert np.array_equal(params[row], flat)
    assert root[f"parts/{part_dir}/cls/p3"].shape == (7, 3, 8, 6)
