"""detcore.synth: byte-identical output, COCO validity, class count, box placement and size spread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detcore import synth
from detcore.coco import CocoDataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = synth.generate(root / "a", num_train=6, num_val=3, seed=1, progress=False)
    return root, summary


def test_generate_twice_is_byte_identical(generated, tmp_path):
    root, summary = generated
    synth.generate(tmp_path / "b", num_train=6, num_val=3, seed=1, progress=False)
    first, second = _files(root / "a"), _files(tmp_path / "b")
    assert len(first) == 6 + 3 + 2
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    assert summary["num_train_images"] == 6 and summary["num_val_images"] == 3
    assert summary["num_train_objects"] > 0 and summary["seconds"] > 0


def test_workers_give_identical_output(generated, tmp_path):
    root, _ = generated
    synth.generate(tmp_path / "w", num_train=6, num_val=3, seed=1, workers=2, progress=False)
    assert _files(root / "a") == _files(tmp_path / "w")


def test_other_seed_differs(generated, tmp_path):
    root, _ = generated
    synth.generate(tmp_path / "s", num_train=2, num_val=0, seed=2, progress=False)
    assert (root / "a" / "train" / "000001.png").read_bytes() != (tmp_path / "s" / "train" / "000001.png").read_bytes()


def test_annotations_are_valid_coco(generated):
    root, summary = generated
    for split, count in (("train", 6), ("val", 3)):
        ds = CocoDataset(root / "a" / "annotations" / f"{split}.json", root / "a" / split, repair=False)
        assert len(ds) == count and ds.repairs == []
        assert len(ds.classes) >= 8 and len(set(ds.classes)) == len(ds.classes)
        assert list(ds.cat_ids) != list(range(1, len(ds.cat_ids) + 1))  # not contiguous on purpose
        num_objects = 0
        for image_id in ds.image_ids:
            record = ds.record(image_id)
            assert (record.height, record.width) in synth.IMAGE_SIZES
            pixels = ds.load(image_id)  # also checks the PNG's size against the annotation
            assert pixels.shape == (record.height, record.width, 3)
            t = ds.targets(image_id)
            num_objects += len(t.gt_boxes)
            assert np.all(t.gt_boxes[:, 0] >= 0) and np.all(t.gt_boxes[:, 1] >= 0)
            assert np.all(t.gt_boxes[:, 2] <= record.width) and np.all(t.gt_boxes[:, 3] <= record.height)
            assert np.all(t.gt_boxes[:, 2] > t.gt_boxes[:, 0]) and np.all(t.gt_boxes[:, 3] > t.gt_boxes[:, 1])
        assert num_objects == summary[f"num_{split}_objects"]


def test_json_is_canonical(generated):
    root, _ = generated
    text = (root / "a" / "annotations" / "train.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n"
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h


def test_sizes_classes_and_visibility_on_a_sample():
    areas, labels, sizes = [], set(), set()
    for index in range(60):
        pixels, objects = synth.render_image(3, "train", index)
        sizes.add(pixels.shape[:2])
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert 0 <= x and 0 <= y and x + w <= pixels.shape[1] and y + h <= pixels.shape[0]
            assert obj["area"] >= synth.MIN_VISIBLE_PIXELS
            labels.add(obj["label"])
            areas.append(obj["area"])
    areas = np.asarray(areas)
    assert (areas < 32**2).sum() >= 20
    assert ((areas >= 32**2) & (areas < 96**2)).sum() >= 20
    assert (areas >= 96**2).sum() >= 5
    assert len(labels) == len(synth.CLASSES) >= 8
    assert len(sizes) >= 4 and len({h / w for h, w in sizes}) >= 3


def test_classes_differ_in_shape_and_texture_not_colour():
    shapes = {shape for shape, _ in synth.CLASSES}
    textures = {texture for _, texture in synth.CLASSES}
    assert len(set(synth.CLASSES)) == len(synth.CLASSES)
    assert len(shapes) >= 8 and len(textures) >= 3
    # Neither attribute alone names the class: some shape and some texture are shared.
    assert len(shapes) < len(synth.CLASSES) and len(textures) < len(synth.CLASSES)


def test_render_image_is_pure():
    a_pixels, a_objects = synth.render_image(0, "val", 5)
    synth.render_image(0, "val", 6)
    b_pixels, b_objects = synth.render_image(0, "val", 5)
    assert a_pixels.tobytes() == b_pixels.tobytes() and a_objects == b_objects
    c_pixels, _ = synth.render_image(0, "train", 5)
    assert c_pixels.shape != a_pixels.shape or c_pixels.tobytes() != a_pixels.tobytes()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_train"):
        synth.generate("/nonexistent-never-created", num_train=-1)
    with pytest.raises(ValueError, match="workers"):
        synth.generate("/nonexistent-never-created", workers=0)


def _square_layer(label: int, top: int, left: int, side: int) -> synth._Layer:
    zeros = np.zeros((side, side), np.float32)
    return synth._Layer(label, top, left, np.ones((side, side), bool), zeros, zeros, "solid", np.zeros((2, 3), np.float32), 5.0, 0.0)


def test_box_covers_the_visible_part_only():
    bottom = _square_layer(0, 10, 10, 20)  # x 10..30, y 10..30
    cover = _square_layer(-1, 0, 20, 40)  # a distractor over its right half (x >= 20)
    hidden = _square_layer(1, 22, 22, 6)  # fully under the distractor
    edge = _square_layer(2, 50, -5, 10)  # half outside the image on the left: 50 % visible
    painted, annotations = synth._resolve_occlusion([bottom, hidden, cover, edge], 64, 64)
    by_label = {a["label"]: a for a in annotations}
    assert set(by_label) == {0, 2}  # label 1 is dropped and not painted
    assert by_label[0]["bbox"] == [10, 10, 10, 20] and by_label[0]["area"] == 200
    assert by_label[2]["bbox"] == [0, 50, 5, 10] and by_label[2]["area"] == 50
    assert [layer.label for layer, _ in painted] == [2, -1, 0]
    # Below the 30 % threshold: a sliver of 5 of 40 columns stays visible.
    sliver = _square_layer(3, 0, 0, 40)
    _, kept = synth._resolve_occlusion([sliver, _square_layer(-1, 0, 5, 50)], 64, 64)
    assert kept == []


def _cli(argv: list[str]) -> int:
    import argparse

    from detcore import cli_data

    parser = argparse.ArgumentParser(prog="distill")
    cli_data.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_synth_and_check_exit_codes(tmp_path, capsys):
    out = tmp_path / "d"
    assert _cli(["data", "synth", "--out", str(out), "--num-train", "3", "--num-val", "1", "--seed", "4"]) == 0
    assert "wrote 3 train images" in capsys.readouterr().out
    check = ["data", "check", "--annotations", str(out / "annotations" / "train.json"), "--images", str(out / "train")]
    assert _cli(check) == 0
    assert "bad images: 0 of 3" in capsys.readouterr().out

    (out / "train" / "000002.png").write_bytes(b"not a png")
    assert _cli(check) == 3
    report = capsys.readouterr().out
    assert "bad images: 1 of 3" in report and "image_id=2" in report and "000002.png" in report

    data = json.loads((out / "annotations" / "train.json").read_text())
    data["annotations"][0]["bbox"][2] = 0
    (tmp_path / "repair.json").write_text(json.dumps(data))
    repair = ["data", "check", "--annotations", str(tmp_path / "repair.json"), "--images", str(out / "train")]
    assert _cli(repair) == 3  # repaired (and reported), but image 2 is still bad
    assert "annotation repairs: 1" in capsys.readouterr().out
    assert _cli([*repair, "--strict"]) == 2
    assert _cli(["data", "check", "--annotations", str(tmp_path / "missing.json"), "--images", str(out)]) == 2
    assert _cli(["data", "synth", "--out", str(out), "--num-train", "-1"]) == 2


def test_cli_progress_bars_follow_no_progress_and_tqdm_disable(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bars"
    check = ["data", "check", "--annotations", str(out / "annotations" / "train.json"), "--images", str(out / "train")]
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py sets it for the suite
    assert _cli(["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1"]) == 0
    assert "synth:" in capsys.readouterr().err
    assert _cli(check) == 0
    assert "decode:" in capsys.readouterr().err
    assert _cli(["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1", "--no-progress"]) == 0
    assert _cli([*check, "--no-progress"]) == 0
    assert "synth:" not in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert _cli(["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1"]) == 0
    assert _cli(check) == 0
    err = capsys.readouterr().err
    assert "synth:" not in err and "decode:" not in err
