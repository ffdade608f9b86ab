"""The direct shard reader returns exactly what zarr-python reads from the same arrays, and the
writer's shard files and metadata are the ones zarr-python writes for the same codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

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


@pytest.mark.parametrize("codec", CODECS)
def test_written_shards_are_the_bytes_zarr_writes(tmp_path, fingerprint, codec):
    from label_store.codecs import parse_codec

    specs = [TargetSpec("cls/p3", (3, 8, 6), codec), TargetSpec("box/p4", (32, 4, 3), codec)]
    url = tmp_path / "store.zarr"
    store = create_store(str(url), fingerprint, specs, views_per_shard=3)
    with store.open_part("p") as part:
        for image_id in range(7):  # shards of 3, 3 and 1 rows: the last one partial
            part.append({"image_id": image_id, "view_id": 0, "view": "{}", "content_hash": "h", "valid_region": (0, 0, 48, 64)},
                        synthetic_targets(specs, seed=image_id))
        part.commit()
    (part_dir,) = [p for p in (url / "parts").iterdir() if p.is_dir()]
    source = zarr.open_group(zarr.storage.LocalStore(url), mode="r")
    arrays = [(spec.name, parse_codec(codec).zarr_compressors()) for spec in specs]
    if codec.startswith("int"):
        arrays.append(("quant", [ZstdCodec(level=3), Crc32cCodec()]))
    twin = zarr.storage.LocalStore(tmp_path / "twin")
    for name, compressors in arrays:
        written = source[f"parts/{part_dir.name}/{name}"]
        codes = written[:]
        by_zarr = zarr.create_array(
            twin, name=name, shape=codes.shape, dtype=codes.dtype, chunks=(1, *codes.shape[1:]), shards=(3, *codes.shape[1:]),
            serializer=BytesCodec(), compressors=compressors, fill_value=0,
            dimension_names=written.metadata.dimension_names, config={"write_empty_chunks": True},
        )
        for start in range(0, 7, 3):  # shard by shard, as the writer flushes
            by_zarr[start:start + 3] = codes[start:start + 3]
        ours, theirs = part_dir / name, Path(tmp_path / "twin" / name)
        assert json.loads((ours / "zarr.json").read_bytes()) == json.loads((theirs / "zarr.json").read_bytes())
        shards = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file() and p.name != "zarr.json")
        assert len(shards) == 3
        assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file() and p.name != "zarr.json") == shards
        for shard in shards:
            assert (ours / shard).read_bytes() == (theirs / shard).read_bytes(), f"{name}/{shard}"
    for group in ("", "cls", "box"):
        assert json.loads((part_dir / group / "zarr.json").read_bytes()) == {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def test_encode_shard_refuses_a_row_count_outside_the_shard():
    from label_store._shard import encode_shard

    with pytest.raises(ValueError, match="1 to 3 rows. Got 4"):
        encode_shard(np.zeros((4, 2), np.uint8), 3, None)
    with pytest.raises(ValueError, match="Got 0"):
        encode_shard(np.zeros((0, 2), np.uint8), 3, None)
