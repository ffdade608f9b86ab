"""``distill store inspect | verify | gc`` through argparse, as the distill CLI assembles it."""

from __future__ import annotations

import argparse
import json

import numpy as np

from label_store import create_store
from label_store.cli import register


def _run(argv):
    parser = argparse.ArgumentParser(prog="distill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _fill(tmp_path, fingerprint, specs, make_record, make_targets):
    url = str(tmp_path / "store.zarr")
    store = create_store(url, fingerprint, specs, views_per_shard=2)
    with store.open_part("p") as part:
        for image_id in range(3):
            part.append(make_record(image_id), make_targets(specs, image_id))
        part.commit()
    store.record_failures([{"image_id": 9, "view_id": 0, "reason": "corrupt JPEG"}])
    return url, store


def test_inspect_json_and_text(tmp_path, capsys, fingerprint, specs, make_record, make_targets):
    url, _ = _fill(tmp_path, fingerprint, specs, make_record, make_targets)
    assert _run(["store", "inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["views"] == 3 and info["images"] == 3
    assert info["failures"] == [{"image_id": 9, "view_id": 0, "reason": "corrupt JPEG"}]
    assert _run(["store", "inspect", url]) == 0
    text = capsys.readouterr().out
    assert "views            3 in 3 images" in text and "fpn/p3" in text and "corrupt JPEG" in text
    # per group, the methods' own losses beside the reference loss
    assert "class_kd_t2" in text and "fgd_attention_mse" in text
    assert "class_kd_t2" in info["fidelity"]["groups"]["cls"]["method_loss_rel_error"]
    assert _run(["store", "inspect", str(tmp_path / "nothing")]) == 2


def test_verify_exit_codes(tmp_path, capsys, fingerprint, specs, make_record, make_targets):
    url, store = _fill(tmp_path, fingerprint, specs, make_record, make_targets)
    assert _run(["store", "verify", url, "--quiet"]) == 0
    assert "ok: 3 views" in capsys.readouterr().out
    reader = store.reader()
    shard = tmp_path / "store.zarr" / "parts" / reader._parts[0].part_dir / "cls" / "p4" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-36:-4]), "<u8").reshape(2, 2)
    data[int(index[1, 0]) + 1] ^= 0xFF  # row 1 is image 1
    shard.write_bytes(bytes(data))
    assert _run(["store", "verify", url, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "BAD image_id=1 view_id=0 part=p" in out and "image_id=0" not in out


def test_gc(tmp_path, capsys, fingerprint, specs, make_record, make_targets):
    url, store = _fill(tmp_path, fingerprint, specs, make_record, make_targets)
    part = store.open_part("left-behind")
    part.append(make_record(5), make_targets(specs, 5))
    part._flush()  # its arrays are on disk; it never commits
    assert _run(["store", "gc", url, "--dry-run"]) == 0
    assert "would remove 0 uncommitted parts" in capsys.readouterr().out  # recent, writer alive
    assert _run(["store", "gc", url, "--older-than", "0"]) == 0
    assert f"removed uncommitted part {part.part_dir}" in capsys.readouterr().out
    assert _run(["store", "gc", str(tmp_path / "nothing")]) == 2
