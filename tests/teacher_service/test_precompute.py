"""The Ray precompute job, on a tiny dataset (8 images of 30-64 px, canvas 64) and a random gfl_tiny teacher.

First the stages as plain functions (no Ray), then the whole job on one local Ray cluster
shared by the module (2 CPUs): targets against a direct forward, resume, a killed worker
at three points, corrupt and missing images, CLI exit codes, and last a two-node
`ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detcore.checkpoint import save_checkpoint
from detcore.coco import CocoDataset
from detcore.models.gfl import build_detector
from detcore.views import View, plan_views, render_array
from teacher_service.pipeline_stages import (
    FAULT_ENV,
    FaultSpecError,
    TeacherPredictor,
    autocast_dtype,
    decode_and_render,
    parse_fault,
)
from teacher_service.precompute import PrecomputeConfig, PrecomputeInputError, PrecomputeSummary, run_precompute

CANVAS = (64, 64)
CLASSES = ("disc", "square")
IMAGE_SIZES = [(48, 64), (64, 48), (40, 40), (64, 64), (50, 70), (30, 60), (64, 32), (56, 56)]
FP32_CODECS = (("cls", "fp32"), ("box", "fp32"), ("fpn", "fp32"), ("backbone", "fp32"))
FP32_CODECS_NO_BACKBONE = FP32_CODECS[:3]


def _write_dataset(root: Path, sizes=IMAGE_SIZES) -> tuple[Path, Path]:
    from PIL import Image

    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index, (h, w) in enumerate(sizes):
        image_id = 10 + index
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"{image_id:04d}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        annotations.append(
            {"id": index + 1, "image_id": image_id, "category_id": 1 + 2 * (index % 2),
             "bbox": [2.0, 3.0, w / 2, h / 3], "area": w * h / 6, "iscrowd": 0}
        )
    categories = [{"id": 1, "name": CLASSES[0]}, {"id": 3, "name": CLASSES[1]}]
    annotations_path = root / "annotations.json"
    annotations_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotations_path, images_dir


def _write_teacher(path: Path, seed: int = 0, canvas_hw=CANVAS) -> Path:
    torch.manual_seed(seed)
    model = build_detector("gfl_tiny", num_classes=len(CLASSES))
    return save_checkpoint(path, model, classes=CLASSES, canvas_hw=canvas_hw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute-data")
    annotations, images = _write_dataset(root)
    teacher = _write_teacher(root / "teacher.pt")
    return {"root": root, "annotations": annotations, "images": images, "teacher": teacher}


@pytest.fixture(scope="module")
def teacher_model(data):
    from detcore.checkpoint import load_detector

    model = load_detector(data["teacher"], map_location="cpu")
    return model.eval()


def _config(data, store, **overrides) -> PrecomputeConfig:
    values = dict(
        annotations=str(data["annotations"]), images_dir=str(data["images"]), teacher=str(data["teacher"]),
        store=str(store), batch_size=3, views_per_part=4, cpus_per_actor=0.5, cpus_per_task=0.5,
        torch_threads=1, show_progress=False,
    )
    values.update(overrides)
    return PrecomputeConfig(**values)


def _direct_targets(model, pixels_chw: np.ndarray, with_backbone: bool) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(torch.from_numpy(pixels_chw)[None], with_backbone=with_backbone)
    return {name: t[0].numpy() for name, t in out.to_targets(("cls", "box", "fpn") + (("backbone",) if with_backbone else ())).items()}


# ---- stages as plain functions -------------------------------------------------------------


def _decode_batch(dataset: CocoDataset, views: list[View]) -> dict[str, np.ndarray]:
    return {
        "image_id": np.asarray([v.image_id for v in views]),
        "view_id": np.asarray([v.view_id for v in views]),
        "view": np.asarray(views, dtype=object),
        "path": np.asarray([str(dataset.image_path(v.image_id)) for v in views], dtype=object),
    }


def test_decode_and_render_turns_bad_images_into_error_rows(data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    dataset = CocoDataset(data["annotations"], images)
    ids = dataset.image_ids[:4]
    (images / dataset.record(ids[1]).file_name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / dataset.record(ids[2]).file_name).unlink()
    from PIL import Image

    h, w = dataset.record(ids[3]).height, dataset.record(ids[3]).width
    Image.fromarray(np.zeros((h + 2, w, 3), np.uint8)).save(images / dataset.record(ids[3]).file_name)
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in ids], canvas_hw=CANVAS)

    out = decode_and_render(_decode_batch(dataset, views))

    assert len(out["error"]) == len(views) == 8
    good = [k for k, v in enumerate(views) if v.image_id == ids[0]]
    for k, view in enumerate(views):
        if k in good:
            assert out["error"][k] == ""
            expected = render_array(dataset.load(view.image_id), view)
            np.testing.assert_array_equal(out["pixels"][k], expected)
            assert tuple(out["valid_region"][k]) == view.valid_region
            assert len(out["content_hash"][k]) == 32
        else:
            assert out["error"][k] != ""
            assert float(np.abs(out["pixels"][k]).max()) == 0.0
    reasons = {int(out["image_id"][k]): out["error"][k] for k in range(len(views))}
    assert "ImageDecodeError" in reasons[ids[1]]
    assert "file not found" in reasons[ids[2]]
    assert "ViewError" in reasons[ids[3]] and f"{h}x{w}" in reasons[ids[3]]
    assert out["decode_s"].shape == (8,) and float(out["decode_s"].min()) >= 0.0


def test_teacher_predictor_matches_direct_forward_and_skips_error_rows(data, teacher_model):
    dataset = CocoDataset(data["annotations"], data["images"])
    ids = dataset.image_ids[:3]
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in ids], canvas_hw=CANVAS)
    batch = decode_and_render(_decode_batch(dataset, views))
    batch["error"][2] = "ImageDecodeError: injected"
    batch["pixels"][4, :, 5, 5] = np.nan  # a teacher output that the store would refuse
    shapes = {name: tuple(t.shape[1:]) for name, t in teacher_model(torch.zeros(1, 3, *CANVAS), with_backbone=True).to_targets(("cls", "box", "fpn", "backbone")).items()}
    predictor = TeacherPredictor(
        str(data["teacher"]), shapes, batch_size=2, device="cpu", torch_threads=1,
        transfer_dtypes={"fpn/p3": "float16"},
    )

    out = predictor(batch)

    assert set(shapes) <= set(out) and "pixels" not in out
    assert [k for k in range(len(views)) if out["error"][k] != ""] == [2, 4]
    assert out["error"][2] == "ImageDecodeError: injected" and "NaN" in out["error"][4]
    for k, view in enumerate(views):
        if k == 2:
            assert all(float(np.abs(out[name][k]).max()) == 0.0 for name in shapes)
            assert out["forward_s"][k] == 0.0
            continue
        if k == 4:
            continue
        expected = _direct_targets(teacher_model, batch["pixels"][k], with_backbone=True)
        for name in shapes:
            if name == "fpn/p3":
                assert out[name].dtype == np.float16
                np.testing.assert_allclose(out[name][k].astype(np.float32), expected[name], rtol=2e-3, atol=1e-4)
            else:
                np.testing.assert_allclose(out[name][k], expected[name], rtol=1e-4, atol=1e-5)
        assert out["forward_s"][k] > 0.0



def test_autocast_dtype_by_device_and_precision():
    assert autocast_dtype("cpu", "auto") is None and autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cuda", "fp32") is None and autocast_dtype("cuda:1", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16  # asked for explicitly, also on the CPU
    assert autocast_dtype("cuda", "fp16") is torch.float16 and autocast_dtype("cuda", "bf16") is torch.bfloat16


def test_teacher_predictor_under_bf16_autocast_stays_near_float32(data, teacher_model):
    # The GPU path's autocast branch (`precision="auto"` is bf16 there), run on the CPU.
    dataset = CocoDataset(data["annotations"], data["images"])
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids[:2]],
                       canvas_hw=CANVAS)
    batch = decode_and_render(_decode_batch(dataset, views))
    shapes = {name: tuple(t.shape[1:]) for name, t in teacher_model(torch.zeros(1, 3, *CANVAS)).to_targets(("cls", "box", "fpn")).items()}
    exact = TeacherPredictor(str(data["teacher"]), shapes, batch_size=2, device="cpu", torch_threads=1)(batch)
    reduced = TeacherPredictor(str(data["teacher"]), shapes, batch_size=2, device="cpu", precision="bf16",
                               torch_threads=1)(batch)
    assert all(e == "" for e in reduced["error"])
    for name in shapes:
        assert reduced[name].dtype == np.float32 and reduced[name].shape == exact[name].shape
        error = np.linalg.norm(reduced[name] - exact[name]) / np.linalg.norm(exact[name])
        # bf16 keeps 8 mantissa bits: ~0.4% per operation, a few % through the network,
        # and never bit-identical to float32 (else autocast did not apply)
        assert 0.0 < error < 0.05, (name, error)

def test_parse_fault():
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("teacher:/tmp/x") == ("teacher", "/tmp/x")
    with pytest.raises(FaultSpecError, match="point"):
        parse_fault("nowhere:/tmp/x")
    with pytest.raises(FaultSpecError):
        parse_fault("teacher")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"annotations": "/nonexistent.json"}, "annotations="),
        ({"images_dir": "/nonexistent-dir"}, "images_dir="),
        ({"scales": (1.5,)}, "scales="),
        ({"target_groups": ("cls", "logits")}, "target_groups="),
        ({"batch_size": 0}, "batch_size="),
        ({"precision": "fp8"}, "precision="),
        ({"quantize_on_device": "yes"}, "quantize_on_device="),
        ({"codec_profile": "tiny"}, "codec-profile"),
        ({"canvas_hw": (64, 0)}, "canvas_hw="),
    ],
)
def test_config_validation(data, tmp_path, overrides, match):
    with pytest.raises(PrecomputeInputError, match=match):
        _config(data, tmp_path / "s.zarr", **overrides).validate()


@pytest.mark.parametrize(
    "batch_size, views_per_part, expected",
    [(8, 32, 32), (3, 4, 6), (64, 32, 64), (1, 1, 1)],
)
def test_block_views_is_a_part_in_whole_forward_batches(data, tmp_path, batch_size, views_per_part, expected):
    config = _config(data, tmp_path / "s.zarr", batch_size=batch_size, views_per_part=views_per_part)
    assert config.block_views == expected
    assert config.block_views % batch_size == 0 and config.block_views >= views_per_part


def _cli(argv: list[str]) -> int:
    from teacher_service.cli import register

    parser = argparse.ArgumentParser(prog="distill")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_bad_input_exits_2_before_starting_ray(data, tmp_path, capsys):
    import ray

    common = ["--images", str(data["images"]), "--teacher", str(data["teacher"]), "--store", str(tmp_path / "s.zarr")]
    assert _cli(["precompute", "--annotations", str(tmp_path / "missing.json"), *common]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert _cli(["precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"])]) == 2
    assert "Missing: --teacher" in capsys.readouterr().err
    assert _cli(["precompute", "--annotations", str(data["annotations"]), *common, "--codec", "fpn=int9-view"]) == 2
    assert "int9-view" in capsys.readouterr().err
    assert _cli(["precompute", "--annotations", str(data["annotations"]), *common, "--views-per-image", "2"]) == 2
    assert "--scale-range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _cli(["precompute", "--annotations", str(data["annotations"]), *common, "--scale-range", "0.9:0.5"])
    assert exit_info.value.code == 2 and "--scale-range expects LO:HI" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_cli_unknown_codec_profile_exits_2_naming_the_flag(data, tmp_path, capsys):
    common = ["--annotations", str(data["annotations"]), "--images", str(data["images"]), "--teacher", str(data["teacher"])]
    with pytest.raises(SystemExit) as exit_info:
        _cli(["precompute", *common, "--store", str(tmp_path / "s.zarr"), "--codec-profile", "tiny"])
    assert exit_info.value.code == 2
    assert "--codec-profile" in capsys.readouterr().err


def test_codec_profile_auto_follows_the_teacher_device(data, tmp_path):
    from teacher_service.store_layout import profile_codecs, resolve_codec_profile

    assert resolve_codec_profile(_config(data, tmp_path / "s.zarr", device="cpu")) == "small"
    assert resolve_codec_profile(_config(data, tmp_path / "s.zarr", device="cuda")) == "fast"
    assert resolve_codec_profile(_config(data, tmp_path / "s.zarr", device="cuda", codec_profile="small")) == "small"
    fast = profile_codecs(_config(data, tmp_path / "s.zarr", codec_profile="fast", target_groups=("cls", "backbone")))
    assert fast == {"cls": "int5-view-dchw+zstd1", "backbone": "int6-view+blosc-zstd1-bitshuffle"}


def test_cli_without_inputs_uses_the_quickstart_store_views_and_targets(data, tmp_path, monkeypatch):
    from detcore import defaults
    from teacher_service import cli

    calls = []
    monkeypatch.setattr(defaults, "ensure_default_dataset", lambda preset: calls.append(preset.name) or (
        data["annotations"], data["images"], tmp_path / "val.json", tmp_path / "val"))
    monkeypatch.setattr(defaults, "ensure_default_teacher", lambda preset: data["teacher"])
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser(prog="distill")
    cli.register(parser.add_subparsers(dest="command"))

    inputs = cli._resolve_inputs(parser.parse_args(["precompute"]))

    assert calls == ["quick"]
    assert (inputs.annotations, inputs.teacher) == (str(data["annotations"]), str(data["teacher"]))
    assert inputs.store == str(tmp_path / "home" / "stores" / "quick-easy-gfl_r18.zarr")
    assert inputs.targets == ("cls", "box", "fpn", "backbone")
    assert inputs.scales == tuple(defaults.PRESETS["quick"].scales)
    explicit = cli._resolve_inputs(parser.parse_args(["precompute", "--targets", "cls", "--scales", "0.5"]))
    assert (explicit.targets, explicit.scales) == (("cls",), (0.5,))


# ---- the whole job on Ray ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray")


@pytest.fixture()
def local_ray(ray_cluster_dir):
    """One local 2-CPU Ray instance for the module (restarted if a test shut it down)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray_after_module():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _store_contents(url: str) -> dict[tuple[int, int], tuple[dict, dict[str, np.ndarray]]]:
    from label_store.reader import open_store

    reader = open_store(url)
    out = {}
    for key in sorted(reader.keys()):
        record = reader.record(*key)
        out[key] = (record, reader.read(*key))
    return out


def _committed_rows(url: str) -> list[tuple[int, int]]:
    """Every committed manifest row's key, duplicates included (readers hide them), to check exactly-once."""
    from label_store._fs import Location
    from label_store._manifest import load_parts

    rows = []
    for entry in load_parts(Location(url)):
        rows += zip(entry.table.column("image_id").to_pylist(), entry.table.column("view_id").to_pylist())
    return rows


def _failures(url: str) -> list[dict]:
    from label_store.reader import open_store
    from label_store.writer import create_store

    reader = open_store(url)
    return create_store(url, reader.fingerprint, reader.targets).failures()


@pytest.fixture(scope="module")
def fp32_store(data, ray_cluster_dir, tmp_path_factory):
    """One complete fp32 store of all views (with backbone targets), the reference for several tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    store = tmp_path_factory.mktemp("stores") / "fp32.zarr"
    summary = run_precompute(_config(data, store, codecs=FP32_CODECS, target_groups=("cls", "box", "fpn", "backbone")))
    return store, summary


def test_fp32_store_equals_direct_teacher_forward(data, teacher_model, fp32_store, local_ray):
    store, summary = fp32_store
    dataset = CocoDataset(data["annotations"], data["images"])
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids], canvas_hw=CANVAS)
    assert (summary.views_planned, summary.views_stored, summary.views_failed, summary.views_skipped) == (16, 16, 0, 0)
    assert summary.num_parts >= 2 and summary.bytes_written > 0  # views_per_part=4 < 16 views
    assert summary.forward_seconds > 0 and summary.decode_seconds > 0 and summary.write_seconds > 0

    contents = _store_contents(str(store))
    assert sorted(contents) == sorted(v.key for v in views)
    assert sorted(_committed_rows(str(store))) == sorted(v.key for v in views)
    from detcore.views import content_hash

    for view in views:
        record, targets = contents[view.key]
        pixels = dataset.load(view.image_id)
        assert View.from_json(record["view"]) == view
        assert record["content_hash"] == content_hash(pixels)
        assert tuple(record["valid_region"]) == view.valid_region
        expected = _direct_targets(teacher_model, render_array(pixels, view), with_backbone=True)
        assert set(targets) == set(expected)
        for name, array in targets.items():
            np.testing.assert_allclose(array, expected[name], rtol=1e-4, atol=1e-5, err_msg=f"{view.key} {name}")


def test_default_codecs_within_stated_error(data, teacher_model, local_ray, tmp_path):
    from label_store.encoding import encode_view
    from label_store.reader import open_store

    store = tmp_path / "default.zarr"
    dataset = CocoDataset(data["annotations"], data["images"])
    ids = dataset.image_ids[:3]
    summary = run_precompute(_config(data, store, image_ids=tuple(ids), batch_size=4))
    assert (summary.views_stored, summary.views_failed) == (6, 0)

    reader = open_store(str(store))
    specs = {spec.name: spec for spec in reader.targets}
    assert {name.split("/")[0] for name in specs} == {"cls", "box", "fpn"}
    assert all(spec.target_codec.quantized for spec in specs.values())
    checked, quantization_error = 0, 0.0
    for key in sorted(reader.keys()):
        record = reader.record(*key)
        view = View.from_json(record["view"])
        expected = _direct_targets(teacher_model, render_array(dataset.load(view.image_id), view), with_backbone=False)
        for name, array in reader.read(*key).items():
            spec = specs[name]
            scale = encode_view({name: expected[name]}, [spec])[name].scale
            bound = spec.target_codec.error_bound(expected[name], scale)
            excess = float((np.abs(array - expected[name]) - bound * 1.01).max())
            assert excess <= 1e-5, (key, name, excess)
            quantization_error += float(np.abs(array - expected[name]).sum())
            checked += 1
    assert checked == 6 * len(specs)
    assert quantization_error > 0.0  # the store really quantized (a 1x1 level can decode exactly)


def test_codec_profiles_store_the_same_values_with_faster_compression(data, local_ray, tmp_path, capsys):
    from label_store.cli import register as register_store
    from label_store.codecs import parse_codec
    from label_store.reader import open_store
    from label_store.schema import DEFAULT_CODECS

    ids = tuple(CocoDataset(data["annotations"], data["images"]).image_ids[:2])
    stores = {profile: tmp_path / f"{profile}.zarr" for profile in ("small", "fast")}
    for profile, store in stores.items():
        summary = run_precompute(_config(data, store, image_ids=ids, codec_profile=profile, device="cpu",
                                         codecs=(("fpn/p4", "int8-channel+zstd9"),)))
        assert (summary.views_stored, summary.views_failed) == (4, 0)
    readers = {profile: open_store(str(store)) for profile, store in stores.items()}
    codecs = {profile: {spec.name: parse_codec(spec.codec) for spec in reader.targets} for profile, reader in readers.items()}
    for name, small in codecs["small"].items():
        fast = codecs["fast"][name]
        if name == "fpn/p4":  # an explicit --codec wins over either profile
            assert small.name == fast.name == "int8-channel+zstd9"
            continue
        assert small.name == DEFAULT_CODECS[name.split("/")[0]]
        assert (fast.storage_name, fast.compressor, fast.level) == (small.storage_name, "zstd", 1) and small.level == 15
    # the same quantizers: both stores decode to the same values
    for key in sorted(readers["small"].keys()):
        small, fast = readers["small"].read(*key), readers["fast"].read(*key)
        for name in small:
            np.testing.assert_array_equal(small[name], fast[name])
    parser = argparse.ArgumentParser(prog="distill")
    register_store(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", "inspect", str(stores["fast"])])
    assert args.func(args) == 0
    assert "int5-view-dchw+zstd1" in capsys.readouterr().out


def test_interrupted_then_resumed_equals_uninterrupted(data, fp32_store, local_ray, tmp_path):
    reference, _ = fp32_store
    store = tmp_path / "resumed.zarr"
    config = _config(data, store, codecs=FP32_CODECS, target_groups=("cls", "box", "fpn", "backbone"))

    first = run_precompute(dataclasses_replace(config, max_views=5))
    assert (first.views_stored, first.views_left) == (5, 11)
    progress: list[tuple[int, int, int]] = []
    second = run_precompute(config, on_progress=lambda *counts: progress.append(counts))
    assert (second.views_skipped, second.views_stored, second.views_left) == (5, 11, 0)
    assert progress[-1] == (11, 0, 11) and all(a[0] <= b[0] for a, b in zip(progress, progress[1:]))
    third = run_precompute(config)  # nothing left: no Ray work at all
    assert (third.views_skipped, third.views_stored, third.num_parts) == (16, 0, 0)

    expected, got = _store_contents(str(reference)), _store_contents(str(store))
    assert sorted(got) == sorted(expected)
    assert sorted(_committed_rows(str(store))) == sorted(got)
    for key, (record, targets) in expected.items():
        got_record, got_targets = got[key]
        for field in ("view", "content_hash", "valid_region"):
            assert got_record[field] == record[field]
        for name, array in targets.items():
            # Same pixels and weights; other batch compositions may move the last float bits.
            np.testing.assert_allclose(got_targets[name], array, rtol=1e-5, atol=1e-6)


def dataclasses_replace(config: PrecomputeConfig, **changes) -> PrecomputeConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize("point", ["teacher", "write-before-commit", "write-after-commit"])
def test_killed_worker_every_view_stored_exactly_once(data, fp32_store, local_ray, tmp_path, monkeypatch, point):
    reference, _ = fp32_store
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(FAULT_ENV, f"{point}:{markers}")
    store = tmp_path / "killed.zarr"

    summary = run_precompute(_config(data, store, codecs=FP32_CODECS, target_groups=("cls", "box", "fpn", "backbone")))

    killed = (markers / f"killed-{point}").read_text().split()
    assert len(killed) == 1 and int(killed[0]) != os.getpid()  # a worker really died
    assert (summary.views_stored, summary.views_failed) == (16, 0) or point == "write-after-commit"
    rows = _committed_rows(str(store))
    assert len(rows) == len(set(rows)) == 16
    expected, got = _store_contents(str(reference)), _store_contents(str(store))
    assert sorted(got) == sorted(expected)
    for key, (_, targets) in expected.items():
        for name, array in targets.items():
            np.testing.assert_allclose(got[key][1][name], array, rtol=1e-5, atol=1e-6)


def test_corrupt_and_missing_images_go_to_failures_and_exit_3(data, local_ray, tmp_path, capsys):
    from label_store.reader import open_store

    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    dataset = CocoDataset(data["annotations"], images)
    corrupt, missing = dataset.image_ids[1], dataset.image_ids[4]
    path = images / dataset.record(corrupt).file_name
    path.write_bytes(path.read_bytes()[:60])  # truncated PNG
    (images / dataset.record(missing).file_name).unlink()
    store = tmp_path / "partial.zarr"
    argv = ["precompute", "--annotations", str(data["annotations"]), "--images", str(images),
            "--teacher", str(data["teacher"]), "--store", str(store), "--batch-size", "3", "--views-per-part", "4",
            "--cpus-per-actor", "0.5", "--no-progress", "--summary-json", str(tmp_path / "summary.json")]

    code = _cli(argv)

    captured = capsys.readouterr()
    assert code == 3
    assert "4 view(s) failed" in captured.err and str(store) in captured.err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["views_stored"], summary["views_failed"]) == (12, 4)
    reader = open_store(str(store))
    assert sorted(reader.keys()) == sorted((i, v) for i in dataset.image_ids if i not in (corrupt, missing) for v in (0, 1))
    failures = {(int(f["image_id"]), int(f["view_id"])): f["reason"] for f in _failures(str(store))}
    assert sorted(failures) == [(corrupt, 0), (corrupt, 1), (missing, 0), (missing, 1)]
    assert "file not found" in failures[(missing, 0)]
    assert "ImageDecodeError" in failures[(corrupt, 1)] and str(path) in failures[(corrupt, 1)]

    # The images come back: the same command retries exactly the failed views.
    shutil.copy(data["images"] / dataset.record(corrupt).file_name, path)
    shutil.copy(data["images"] / dataset.record(missing).file_name, images / dataset.record(missing).file_name)
    assert _cli(argv) == 0
    assert len(open_store(str(store)).keys()) == 16


def test_store_made_by_another_teacher_or_canvas_is_refused(data, fp32_store, local_ray, tmp_path, capsys):
    store, _ = fp32_store
    other_teacher = _write_teacher(tmp_path / "other.pt", seed=1)
    base = ["precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"]),
            "--store", str(store), "--targets", "cls,box,fpn,backbone", "--no-progress",
            *[arg for group, codec in FP32_CODECS for arg in ("--codec", f"{group}={codec}")]]

    assert _cli([*base, "--teacher", str(other_teacher)]) == 2
    assert "checkpoint_sha256" in capsys.readouterr().err
    assert _cli([*base, "--teacher", str(data["teacher"]), "--canvas", "96x96"]) == 2
    assert "canvas" in capsys.readouterr().err
    # an explicit codec that differs from the store's: another target set, refused by name
    assert _cli([*base[:-8], "--codec", "box=int8-view", "--teacher", str(data["teacher"])]) == 2
    assert "box/p3" in capsys.readouterr().err
    # no codec given: the store keeps its own (fp32) codecs and the job resumes
    assert _cli([*base[:-8], "--teacher", str(data["teacher"])]) == 0
    assert "already committed (skipped)  16" in capsys.readouterr().out.replace("   ", "  ")
    assert _cli([*base, "--teacher", str(data["teacher"])]) == 0  # the same job resumes: nothing to do
    assert "already committed (skipped)  16" in capsys.readouterr().out.replace("   ", "  ")


def test_two_node_cluster_stores_every_view_once(data, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        store = tmp_path / "cluster.zarr"
        summary = run_precompute(_config(data, store, num_actors=2, cpus_per_actor=0.5, cpus_per_task=0.25))
        assert (summary.views_stored, summary.views_failed) == (16, 0)
        rows = _committed_rows(str(store))
        assert len(rows) == len(set(rows)) == 16
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_local_cluster_cpus_fit_the_actors_and_the_tasks(data, tmp_path):
    from teacher_service.ray_runtime import local_cluster_cpus

    config = _config(data, tmp_path / "s.zarr", cpus_per_actor=1.0, cpus_per_task=1.0)
    # the actors plus one decode/write task at least
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=2), cpu_count=8) == 2
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=1), cpu_count=8) == 2
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=1) == 2
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=16) == 16
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=3, num_actors=3), cpu_count=2) == 4
    # with a pinned teacher, a decode and a write task at once
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=2, pinned=True) == 3
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=16, pinned=True) == 16
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=3, num_actors=3), cpu_count=2, pinned=True) == 5
    tiny = dataclasses.replace(config, num_cpus=1, cpus_per_actor=0.5, cpus_per_task=0.25)
    assert local_cluster_cpus(tiny, cpu_count=1) == local_cluster_cpus(tiny, cpu_count=1, pinned=True) == 1


def test_cpu_pinning_gives_a_cpu_teacher_cores_of_its_own(data, tmp_path):
    from teacher_service.ray_runtime import cpu_pinning

    config = _config(data, tmp_path / "s.zarr", cpus_per_actor=1.0)  # device auto
    assert cpu_pinning(config, [0, 1], gpu=False) == ((0,), (1,))
    assert cpu_pinning(config, [5, 3, 9], gpu=False) == ((3,), (5, 9))
    two = dataclasses.replace(config, num_actors=2, cpus_per_actor=1.5)
    assert cpu_pinning(two, range(8), gpu=False) == ((0, 1, 2), (3, 4, 5, 6, 7))
    # no core left for the rest, a GPU teacher, a joined cluster, or switched off: no pinning
    assert cpu_pinning(config, [0], gpu=False) is None
    assert cpu_pinning(two, [0, 1, 2], gpu=False) is None
    assert cpu_pinning(config, [0, 1], gpu=True) is None
    assert cpu_pinning(dataclasses.replace(config, device="cuda"), [0, 1], gpu=False) is None
    assert cpu_pinning(dataclasses.replace(config, device="cpu"), [0, 1], gpu=True) == ((0,), (1,))
    assert cpu_pinning(dataclasses.replace(config, ray_address="127.0.0.1:6379"), [0, 1], gpu=False) is None
    assert cpu_pinning(dataclasses.replace(config, pin_cpus=False), [0, 1], gpu=False) is None


def test_pinned_teacher_predictor_keeps_every_thread_on_its_cores(data):
    # in a child process: pinning the test process itself would slow the rest of the suite
    code = (
        "import os, sys, threading\n"
        "import numpy as np\n"
        "from teacher_service.pipeline_stages import TeacherPredictor\n"
        "stop = threading.Event(); helper = threading.Thread(target=stop.wait); helper.start()\n"
        "core = min(os.sched_getaffinity(0))\n"
        "predictor = TeacherPredictor(sys.argv[1], {'cls/p3': (2, 8, 8)}, batch_size=1, device='cpu', "
        "torch_threads=1, cpu_affinity=[core])\n"
        "out = predictor({'image_id': np.array([1]), 'view_id': np.array([0]), 'view': np.array(['{}'], dtype=object), "
        "'content_hash': np.array(['h'], dtype=object), 'valid_region': np.zeros((1, 4), np.int64), "
        "'error': np.array([''], dtype=object), 'pixels': np.zeros((1, 3, 64, 64), np.float32), "
        "'decode_s': np.zeros(1)})\n"
        "masks = [os.sched_getaffinity(int(t)) for t in os.listdir('/proc/self/task')]\n"
        "stop.set(); helper.join()\n"
        "print(len(masks), all(m == {core} for m in masks), out['cls/p3'].shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(data["teacher"])], capture_output=True, text=True,
                            cwd=str(Path(__file__).resolve().parents[2]))
    assert result.returncode == 0, result.stderr[-2000:]
    threads, pinned, shape = result.stdout.split(maxsplit=2)
    assert int(threads) >= 2 and pinned == "True" and shape.strip() == "(1, 2, 8, 8)"


def test_job_that_starts_its_own_cluster_pins_the_teacher(data, tmp_path, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU teacher whatever the machine
    store = tmp_path / "own-cluster.zarr"
    try:
        summary = run_precompute(_config(data, store, cpus_per_actor=1.0, cpus_per_task=1.0, num_cpus=2))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert (summary.views_stored, summary.views_failed) == (16, 0)
    cores = sorted(os.sched_getaffinity(0))
    pinning_row = next(line for line in summary.format().splitlines() if line.strip().startswith("CPU pinning"))
    if len(cores) >= 2:
        assert (summary.teacher_cpus, summary.stage_cpus) == ((cores[0],), tuple(cores[1:]))
        assert f"teacher on CPU {cores[0]}" in pinning_row
        # the stages share their pinned cores, whatever Ray's task slots for them
        assert 1 <= summary.stage_slots <= len(cores) - 1
    else:  # one usable core: nothing to pin apart
        assert summary.teacher_cpus == () and pinning_row.endswith(" off")
        assert summary.stage_slots >= 1
    assert summary.num_actors == 1 and summary.bottleneck != "-"
    assert sorted(os.sched_getaffinity(0)) == cores  # the driver's own mask is restored
    rows = _committed_rows(str(store))
    assert len(rows) == len(set(rows)) == 16


def test_local_cluster_workers_import_from_the_source_tree_and_the_driver_env_is_kept(data, tmp_path, monkeypatch):
    import ray

    from teacher_service.ray_runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", "/opt/users-own-path")
    repo_root = str(Path(__file__).resolve().parents[2])
    try:
        started, _ = init_ray(_config(data, tmp_path / "unused.zarr", num_cpus=2))
        assert started
        # the driver's environment is as it was; the cluster's workers have the source tree first
        assert os.environ["PYTHONPATH"] == "/opt/users-own-path"
        worker_path = ray.get(ray.remote(lambda: os.environ.get("PYTHONPATH")).remote())
    finally:
        ray.shutdown()
    assert worker_path == os.pathsep.join([repo_root, "/opt/users-own-path"])


def test_actors_that_leave_no_cpu_for_decoding_are_refused(data, local_ray, tmp_path):
    # 2 actors x 1 CPU on the 2-CPU cluster: no decode task could ever run (the job would hang)
    store = tmp_path / "full.zarr"
    with pytest.raises(PrecomputeInputError, match="plus one decode/write task"):
        run_precompute(_config(data, store, num_actors=2, cpus_per_actor=1.0, cpus_per_task=1.0))
    from label_store.reader import open_store

    assert len(open_store(str(store)).keys()) == 0  # nothing half-done


def test_resume_keeps_the_codecs_the_store_was_written_with(data, local_ray, tmp_path, monkeypatch, caplog):
    import label_store.schema as schema

    store = tmp_path / "old_defaults.zarr"
    first = run_precompute(_config(data, store, max_views=4))
    assert first.views_stored == 4
    written = _store_codecs(store)
    # the defaults move on (as they did when prediction was added): the same command resumes
    monkeypatch.setitem(schema.DEFAULT_CODECS, "box", "int8-view+zstd3")
    with caplog.at_level(logging.INFO, logger="teacher_service.precompute"):
        second = run_precompute(_config(data, store))
    assert second.views_skipped == 4 and second.views_stored == 12
    assert _store_codecs(store) == written
    assert "codecs it was written with" in caplog.text
    # an explicit, different choice is still refused, naming the target
    from label_store.errors import StoreMismatchError

    with pytest.raises(StoreMismatchError, match="box/p3"):
        run_precompute(_config(data, store, codecs=(("box", "int8-view+zstd3"),)))


def _store_codecs(store) -> dict[str, str]:
    from label_store.reader import open_store

    return {spec.name: spec.codec for spec in open_store(str(store)).targets}


def _summary(**fields) -> PrecomputeSummary:
    base = dict(store="s.zarr", views_planned=64, views_skipped=0, views_stored=64, views_failed=0, views_left=0,
                num_parts=2, bytes_written=1 << 20, seconds=30.0, ray_init_seconds=3.0, decode_seconds=4.0,
                forward_seconds=10.0, encode_seconds=1.0, write_seconds=20.0, stage_slots=1, num_actors=1)
    return PrecomputeSummary(**{**base, **fields})


def test_summary_says_which_side_bound_the_job():
    # one stage slot: 24 worker-s of decode + write outweigh the teacher's 11 s
    stage_bound = _summary()
    assert stage_bound.bottleneck.startswith("decode + write on the CPU: 24.0 worker-s over 1 task slot(s), >= 24.0 s")
    assert "the teacher's 11.0 s per actor" in stage_bound.bottleneck and "--codec" in stage_bound.bottleneck
    assert any(line.strip().startswith("bound by") and "decode + write" in line for line in stage_bound.format().splitlines())
    # the same work over 15 slots (a GPU node's other cores): the teacher binds
    teacher_bound = _summary(stage_slots=15)
    assert teacher_bound.bottleneck == "the teacher: 11.0 s per actor, against >= 1.6 s of decode + write per task slot (15)"
    # two actors halve the teacher's side
    assert _summary(stage_slots=8, num_actors=2).bottleneck.startswith("the teacher: 5.5 s per actor, against >= 3.0 s")
    # nothing ran (all views committed before): no verdict
    assert _summary(views_stored=0, stage_slots=0).bottleneck == "-"
    # decode, not the codecs, dominating the CPU side: no codec advice
    decode_bound = _summary(decode_seconds=20.0, write_seconds=4.0)
    assert decode_bound.bottleneck.startswith("decode + write on the CPU") and "--codec" not in decode_bound.bottleneck
    assert stage_bound.to_dict()["bound_by"] == stage_bound.bottleneck


# ---- quantization in the teacher stage ------------------------------------------------------


@pytest.mark.parametrize(
    "codec_name", ["int6-view-dhw+zstd15", "int5-view-dchw+zstd15", "int8-channel+zstd5", "int4-view", "int5-view-dchw-floor-1+zstd3"]
)
def test_quantize_batch_gives_the_writers_bytes(codec_name):
    from label_store.codecs import parse_codec
    from label_store.encoding import QuantizedTarget, encode_inputs, encode_view
    from label_store.schema import TargetSpec
    from teacher_service.pipeline_stages import quantize_batch

    codec = parse_codec(codec_name)
    generator = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 8, 6, 5, generator=generator) * 3 + 1
    batch[1] = 0.25  # a constant view: scale 0, every code 0
    batch[2, :, 0, 0] = torch.tensor([-7.0, 9.0, 0.5, 1.5, 2.5, -0.5, 3.0, 4.0])  # spread, ties after scaling
    codes, scale, offset = quantize_batch(batch.to(torch.bfloat16).float(), codec)
    assert codes.dtype == torch.uint8 and scale.shape == offset.shape == (4, codec.num_params(8))
    spec = TargetSpec("fpn/p3", (8, 6, 5), codec_name)
    for k in range(4):
        floats = batch[k].to(torch.bfloat16).float().numpy()
        expected = encode_view({"fpn/p3": floats}, [spec])["fpn/p3"]
        got, _ = encode_inputs({"fpn/p3": QuantizedTarget(codes[k].numpy(), scale[k].numpy(), offset[k].numpy())}, [spec], "t")
        np.testing.assert_array_equal(got["fpn/p3"].codes, expected.codes)
        np.testing.assert_array_equal(got["fpn/p3"].scale, expected.scale)
        np.testing.assert_array_equal(got["fpn/p3"].offset, expected.offset)
    assert int(codes[1].max()) == 0 and float(scale[1].max()) == 0.0
    with pytest.raises(ValueError, match="scaling"):
        quantize_batch(batch, parse_codec("int8-std4"))


def test_device_quantized_targets_by_mode_and_device():
    from label_store.schema import TargetSpec
    from teacher_service.precompute import device_quantized

    specs = [TargetSpec("cls/p3", (2, 4, 4), "int5-view-dchw+zstd15"), TargetSpec("box/p3", (8, 4, 4), "fp16"),
             TargetSpec("fpn/p3", (4, 4, 4), "int8-std4+zstd5"), TargetSpec("fpn/p4", (4, 2, 2), "int8-channel")]
    quantizable = {"cls/p3": "int5-view-dchw+zstd15", "fpn/p4": "int8-channel"}
    assert device_quantized(specs, "cuda", "auto") == quantizable == device_quantized(specs, "cpu", "on")
    assert device_quantized(specs, "cpu", "auto") == {} == device_quantized(specs, "cuda", "off")


def test_teacher_predictor_quantizes_and_samples_originals(data, teacher_model):
    from label_store.codecs import parse_codec
    from teacher_service.pipeline_stages import ORIGINALS_COLUMN, quantize_batch

    dataset = CocoDataset(data["annotations"], data["images"])
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids[:3]],
                       canvas_hw=CANVAS)
    batch = decode_and_render(_decode_batch(dataset, views))
    batch["error"][0] = "ImageDecodeError: injected"
    shapes = {name: tuple(t.shape[1:]) for name, t in teacher_model(torch.zeros(1, 3, *CANVAS)).to_targets(("cls", "box", "fpn")).items()}
    codec = "int6-view-dhw+zstd15"
    predictor = TeacherPredictor(str(data["teacher"]), shapes, batch_size=2, device="cpu", torch_threads=1,
                                 quantize={"fpn/p3": codec, "cls/p4": codec}, fidelity_views=2)
    out = predictor(batch)
    assert out["fpn/p3"].dtype == np.uint8 and out["cls/p3"].dtype == np.float32
    assert out["fpn/p3#scale"].shape == (len(views), 1) and "cls/p3#scale" not in out
    carrying = [k for k in range(len(views)) if out[ORIGINALS_COLUMN][k]]
    assert carrying == [1, 2]  # the first two good views; the failed one carries nothing
    for k in carrying:
        direct = _direct_targets(teacher_model, batch["pixels"][k], with_backbone=False)
        values, start = np.frombuffer(out[ORIGINALS_COLUMN][k], np.float32), 0
        for name in [n for n in shapes if n in ("fpn/p3", "cls/p4")]:  # the targets' order
            size = int(np.prod(shapes[name]))
            original = values[start : start + size].reshape(shapes[name])
            start += size
            np.testing.assert_allclose(original, direct[name], rtol=1e-4, atol=1e-5)
            codes, scale, _ = quantize_batch(torch.from_numpy(original[None].copy()), parse_codec(codec))
            np.testing.assert_array_equal(out[name][k], codes[0].numpy())
            np.testing.assert_array_equal(out[name + "#scale"][k], scale[0].numpy())
        assert start == values.size
    assert not out["fpn/p3"][0].any() and out[ORIGINALS_COLUMN][0] == b""


def test_store_quantized_in_the_teacher_stage_equals_the_writers(data, local_ray, tmp_path):
    from label_store.reader import open_store

    stores = {}
    for mode, quantized in (("off", 0), ("on", 16), ("auto", 0)):  # auto: only with a GPU teacher
        stores[mode] = tmp_path / f"{mode}.zarr"
        summary = run_precompute(_config(data, stores[mode], quantize_on_device=mode, device="cpu",
                                         target_groups=("cls", "box", "fpn")))
        assert (summary.views_stored, summary.views_failed, summary.views_quantized_on_device) == (16, 0, quantized)
        assert ("quantized there" in summary.format()) == bool(quantized)
    off, on = _store_contents(str(stores["off"])), _store_contents(str(stores["on"]))
    assert sorted(off) == sorted(on)
    for key, (record, targets) in off.items():
        assert on[key][0]["checksum"] == record["checksum"]  # the same bytes
        for name, array in targets.items():
            np.testing.assert_array_equal(on[key][1][name], array)
    stores.pop("auto")
    fidelity = {mode: open_store(str(url)).fidelity["targets"] for mode, url in stores.items()}
    assert set(fidelity["on"]) == set(fidelity["off"]) and all(row["views"] > 0 for row in fidelity["on"].values())


# ---- landscape and portrait canvases ---------------------------------------------------------


def test_precompute_fills_both_canvases_with_the_teachers_view_of_each(data, teacher_model, local_ray, tmp_path):
    """--canvas 48x64: landscape images on 48x64, portrait ones on 64x48, one store; targets equal
    the teacher's forward on the student's re-rendering of each recorded view."""
    from detcore.views import content_hash
    from label_store.maintenance import inspect_store
    from label_store.reader import open_store

    store = tmp_path / "two.zarr"
    summary = run_precompute(_config(data, store, canvas_hw=(48, 64), codecs=FP32_CODECS_NO_BACKBONE, flip=False))
    assert (summary.views_planned, summary.views_stored, summary.views_failed) == (8, 8, 0)
    reader = open_store(str(store))
    assert [c.canvas_hw for c in reader.canvases] == [(48, 64), (64, 48)]
    dataset = CocoDataset(data["annotations"], data["images"])
    canvases = set()
    for key in reader.keys():
        record = reader.record(*key)
        view = View.from_json(record["view"])
        pixels = dataset.load(view.image_id)
        landscape = view.image_w >= view.image_h
        assert (view.canvas_h, view.canvas_w) == ((48, 64) if landscape else (64, 48))
        assert reader.canvas_of(*key).canvas_hw == (view.canvas_h, view.canvas_w)
        assert record["content_hash"] == content_hash(pixels)
        expected = _direct_targets(teacher_model, render_array(pixels, view), with_backbone=False)
        for name, array in reader.read(*key).items():
            np.testing.assert_allclose(array, expected[name], rtol=1e-4, atol=1e-5, err_msg=f"{key} {name}")
        canvases.add((view.canvas_h, view.canvas_w))
    assert canvases == {(48, 64), (64, 48)}
    info = inspect_store(str(store))
    assert sum(c["views"] for c in info["canvases"]) == 8 and all(c["views"] for c in info["canvases"])
    assert 0 < info["padding_share"] < 1


def test_scale_range_views_are_planned_and_stored(data, local_ray, tmp_path):
    from label_store.reader import open_store

    store = tmp_path / "range.zarr"
    ids = tuple(CocoDataset(data["annotations"], data["images"]).image_ids[:2])
    config = _config(data, store, canvas_hw=(48, 64), scale_range=(0.5, 1.0), views_per_image=3, image_ids=ids)
    summary = run_precompute(config)
    assert (summary.views_planned, summary.views_stored) == (12, 12)
    views = [View.from_json(open_store(str(store)).record(*key)["view"]) for key in open_store(str(store)).keys()]
    assert len({round(v.scale, 9) for v in views if v.image_id == ids[0]}) == 3


def test_schema_1_store_resumes_with_its_own_views(data, teacher_model, local_ray, tmp_path):
    """A store written before canvases (one non-square canvas, views fit into it) resumes as it was planned."""
    from label_store import create_store
    from label_store.maintenance import verify_store
    from label_store.reader import open_store
    from label_store.testing import write_schema_1_layout
    from teacher_service.store_layout import store_layout

    store = tmp_path / "old.zarr"
    config = _config(data, store, canvas_hw=(48, 64), codecs=FP32_CODECS_NO_BACKBONE)
    layout = store_layout(config)
    create_store(str(store), layout.fingerprint, list(layout.target_specs), canvases=[(48, 64)])
    first = run_precompute(dataclasses_replace(config, max_views=5))
    assert first.views_stored == 5
    write_schema_1_layout(str(store))
    second = run_precompute(config)
    assert (second.views_skipped, second.views_stored, second.views_left) == (5, 11, 0)
    reader = open_store(str(store))
    assert reader.schema_version == 1 and len(reader) == 16 and verify_store(str(store)).ok
    dataset = CocoDataset(data["annotations"], data["images"])
    for key in reader.keys():
        view = View.from_json(reader.record(*key)["view"])
        assert (view.canvas_h, view.canvas_w) == (48, 64)
        assert view.scale == pytest.approx(min(48 / view.image_h, 64 / view.image_w))
        expected = _direct_targets(teacher_model, render_array(dataset.load(view.image_id), view), with_backbone=False)
        np.testing.assert_allclose(reader.read(*key)["cls/p3"], expected["cls/p3"], rtol=1e-4, atol=1e-5)
