"""`teacher_service.precompute`: the whole job on one local Ray cluster shared by the module (2 CPUs):
targets against a direct forward, codecs, resume, a killed worker at three points, corrupt and
missing images, CLI exit codes, quantization in the teacher stage, both canvases, and a two-node
`ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from detcore.coco import CocoDataset
from detcore.views import View, plan_views, render_array
from teacher_service.pipeline_stages import FAULT_ENV
from teacher_service.precompute import PrecomputeInputError, run_precompute

from precompute_fixtures import (  # noqa: F401  (fixtures are found by name)
    CANVAS,
    FP32_CODECS,
    FP32_CODECS_NO_BACKBONE,
    _cli,
    _committed_rows,
    _config,
    _direct_targets,
    _failures,
    _shutdown_ray_after_module,
    _store_contents,
    _write_teacher,
    data,
    dataclasses_replace,
    fp32_store,
    local_ray,
    ray_cluster_dir,
    teacher_model,
)


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


def test_new_store_fits_the_fpn_basis_on_the_first_views_and_a_resume_keeps_it(data, teacher_model, local_ray, tmp_path, capsys):
    from label_store import TargetSpec, fit_target_bases
    from label_store.reader import open_store
    from label_store.codecs import parse_codec
    from label_store.schema import DEFAULT_CODECS
    from teacher_service.precompute import plan_job

    assert DEFAULT_CODECS["fpn"].startswith("pca-std") and DEFAULT_CODECS["cls"].startswith("pca-std")  # the defaults this test exercises
    store = tmp_path / "pca.zarr"
    dataset = CocoDataset(data["annotations"], data["images"])
    ids = tuple(dataset.image_ids[:4])
    first = _config(data, store, image_ids=ids[:2], basis_views=3, device="cpu")
    assert run_precompute(first).views_stored == 4
    fitted = {spec.name: spec for spec in open_store(str(store)).targets}
    fpn = [name for name in fitted if name.startswith("fpn/")]
    assert fpn and all(fitted[name].transform is not None for name in fpn)
    # The default's k on the finest level, doubling on each coarser one (DEFAULT_LEVEL_STEP_GROWTH).
    k = parse_codec(DEFAULT_CODECS["fpn"]).steps_per_std
    assert [parse_codec(fitted[name].codec).steps_per_std for name in fpn] == [k * 2**i for i in range(len(fpn))]
    assert fitted[fpn[0]].codec == DEFAULT_CODECS["fpn"]
    # cls: the default's k on every level (BCD and LD weigh every point alike), a basis per level too.
    assert all(spec.codec == DEFAULT_CODECS["cls"] and spec.transform is not None for name, spec in fitted.items() if name.startswith("cls/"))
    assert all(spec.transform is None for name, spec in fitted.items() if name.split("/")[0] not in ("fpn", "cls"))
    # The basis is that of the teacher's targets on the plan's first 3 views, in order.
    views = plan_job(first, dataset, CANVAS)[:3]
    sample = [_direct_targets(teacher_model, render_array(dataset.load(v.image_id), v), with_backbone=False) for v in views]
    expected = {spec.name: spec for spec in fit_target_bases([TargetSpec(n, fitted[n].shape, fitted[n].codec) for n in fpn], sample)}
    for name in fpn:
        got, want = fitted[name].transform, expected[name].transform
        np.testing.assert_allclose(got.mean_array, want.mean_array, rtol=1e-4, atol=1e-5, err_msg=name)
        assert abs(float(got.basis_array[:, 0] @ want.basis_array[:, 0])) > 0.999, name
    # Resuming with more images (and another --basis-views) keeps the stored basis as it is.
    summary = run_precompute(dataclasses_replace(first, image_ids=ids, basis_views=1))
    assert (summary.views_skipped, summary.views_stored) == (4, 4)
    reader = open_store(str(store))
    assert {spec.name: spec.transform for spec in reader.targets} == {name: spec.transform for name, spec in fitted.items()}
    assert len(reader.keys()) == 8
    # Another transform codec on resume is another target set: exit 2, naming the targets.
    argv = ["precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"]),
            "--teacher", str(data["teacher"]), "--store", str(store), "--no-progress", "--device", "cpu"]
    assert _cli([*argv, "--codec", "fpn=pca-std4+blosc-zstd5-bitshuffle"]) == 2
    assert "fpn/p3" in capsys.readouterr().err
    # A transform codec where the store keeps only a region is refused before any work.
    with pytest.raises(PrecomputeInputError, match="box/p3"):
        run_precompute(_config(data, tmp_path / "region.zarr", image_ids=ids[:1], box_region="ld", codecs=(("box", "pca-std5"),)))


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
        group = name.split("/")[0]
        if group == "fpn":  # the default's step, doubling on each coarser level
            level = [n for n in codecs["small"] if n.startswith("fpn/")].index(name)
            default = parse_codec(DEFAULT_CODECS["fpn"])
            assert (small.storage_name, small.compressor_name) == (f"pca-std{default.steps_per_std * 2**level}", default.compressor_name)
        else:
            assert small.name == DEFAULT_CODECS[group]
        if small.compressor == "zstd":
            assert (fast.storage_name, fast.compressor, fast.level) == (small.storage_name, "zstd", 1) and small.level == 15
        else:  # the transform codecs of fpn and cls: bit-shuffled blosc, at level 1
            assert (fast.storage_name, fast.compressor, fast.level) == (small.storage_name, small.compressor, 1) and small.level > 1
    # the same quantizers: both stores decode to the same values
    for key in sorted(readers["small"].keys()):
        small, fast = readers["small"].read(*key), readers["fast"].read(*key)
        for name in small:
            np.testing.assert_array_equal(small[name], fast[name])
    parser = argparse.ArgumentParser(prog="distill")
    register_store(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", "inspect", str(stores["fast"])])
    assert args.func(args) == 0
    assert "pca-std24-dct+blosc-zstd1-bitshuffle" in capsys.readouterr().out  # the codec names carry the profile


def test_box_and_cls_regions_store_them_only_at_each_views_region(data, local_ray, tmp_path, capsys):
    from detcore.assign import stored_region
    from label_store.schema import BASIS_FREE_CODECS
    from detcore.views import image_to_view_boxes
    from label_store.cli import register as register_store
    from label_store.errors import StoreMismatchError
    from label_store.reader import open_store

    coco = CocoDataset(data["annotations"], data["images"])
    ids = tuple(coco.image_ids[:3])
    groups = ("cls", "box", "edges", "fpn")
    urls = {("box",): tmp_path / "region.zarr", ("cls",): tmp_path / "cls.zarr", (): tmp_path / "dense.zarr"}
    int_cls = (("cls", BASIS_FREE_CODECS["cls"]),)  # cls in a region takes the int codec: compare like with like
    for region_groups, url in urls.items():
        modes = {f"{group}_region": "ld" if group in region_groups else "dense" for group in ("box", "cls")}
        codecs = () if "cls" in region_groups else int_cls
        summary = run_precompute(_config(data, url, image_ids=ids, device="cpu", target_groups=groups, codecs=codecs, **modes))
        assert (summary.views_stored, summary.views_failed) == (6, 0)
    dense = open_store(str(urls[()]))
    assert dense.region is None
    assert {spec.codec for spec in open_store(str(urls[("cls",)])).targets if spec.group == "cls"} == {BASIS_FREE_CODECS["cls"]}
    for region_groups in (("box",), ("cls",)):
        region = open_store(str(urls[region_groups]))
        assert region.region.to_dict() == {
            "groups": list(region_groups), "topk": 9, "vlr_alpha": 0.25, "vlr_diou": "standard", "point_offset": 0.5,
        }
        _check_region_reads(coco, region, dense, region_groups, stored_region, image_to_view_boxes)
    with pytest.raises(StoreMismatchError, match="region: store has box at ATSS positives"):
        run_precompute(_config(data, urls[("box",)], image_ids=ids, device="cpu", target_groups=groups))
    parser = argparse.ArgumentParser(prog="distill")
    register_store(parser.add_subparsers(dest="command", required=True))
    for group in ("box", "cls"):
        args = parser.parse_args(["store", "inspect", str(urls[(group,)])])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert f"region           {group} at ATSS positives (topk 9) and VLR (alpha >= 0.25" in out
        share = open_store(str(urls[(group,)])).region_share()
        lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["cls"], ["box"])}
        assert f"{100 * share:6.1f}%" in lines[group]
        assert "100.0%" in lines["box" if group == "cls" else "cls"]


def _check_region_reads(coco, region, dense, region_groups, stored_region, image_to_view_boxes):
    """Each view's mask is `stored_region` of its GT; region groups equal the dense store inside it, the rest everywhere."""
    for key in region.keys():
        view = View.from_json(region.record(*key)["view"])
        expected = stored_region(
            image_to_view_boxes(coco.targets(view.image_id).gt_boxes, view), (view.canvas_h, view.canvas_w),
            region.fingerprint.strides, topk=9, vlr_alpha=0.25,
        ).numpy()
        mask = region.read_regions([key])[0]
        np.testing.assert_array_equal(mask, expected)
        assert 0 < mask.sum() < mask.size
        got, want = region.read(*key), dense.read(*key)
        starts: dict[str, int] = {}
        for spec in region.targets:
            if spec.group not in region_groups:
                np.testing.assert_array_equal(got[spec.name], want[spec.name])
                continue
            start = starts.get(spec.group, 0)
            keep = mask[start : start + spec.shape[1] * spec.shape[2]].reshape(spec.shape[1:])
            starts[spec.group] = start + spec.shape[1] * spec.shape[2]
            np.testing.assert_array_equal(got[spec.name][:, keep], want[spec.name][:, keep])
            assert np.isnan(got[spec.name][:, ~keep]).all()


def test_cls_region_flag_errors_exit_2_naming_the_flag(data, tmp_path, capsys):
    argv = ["precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"]),
            "--teacher", str(data["teacher"]), "--store", str(tmp_path / "s.zarr"), "--no-progress", "--device", "cpu",
            "--cls-region", "ld"]
    assert _cli([*argv, "--targets", "box,fpn"]) == 2
    assert "(--cls-region ld) expects 'cls' among the target groups" in capsys.readouterr().err
    assert _cli([*argv, "--codec", "cls=pca-std5"]) == 2
    err = capsys.readouterr().err
    assert "--cls-region ld expects int or float codecs" in err and "cls/p3" in err
    assert _cli([*argv, "--box-region", "ld", "--codec", "box=pca-std5"]) == 2
    assert "--box-region ld expects int or float codecs" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


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


def test_actors_that_leave_no_cpu_for_decoding_are_refused(data, local_ray, tmp_path):
    # 2 actors x 1 CPU on the 2-CPU cluster: no decode task could ever run (the job would hang)
    store = tmp_path / "full.zarr"
    with pytest.raises(PrecomputeInputError, match="plus one decode/write task"):
        run_precompute(_config(data, store, num_actors=2, cpus_per_actor=1.0, cpus_per_task=1.0))
    from label_store.reader import open_store

    assert len(open_store(str(store)).keys()) == 0  # nothing half-done


def test_device_quantized_targets_by_mode_and_device():
    from label_store.schema import TargetSpec
    from teacher_service.precompute import device_quantized

    specs = [TargetSpec("cls/p3", (2, 4, 4), "int5-view-dchw+zstd15"), TargetSpec("box/p3", (8, 4, 4), "fp16"),
             TargetSpec("fpn/p3", (4, 4, 4), "int8-std4+zstd5"), TargetSpec("fpn/p4", (4, 2, 2), "int8-channel")]
    quantizable = {"cls/p3": "int5-view-dchw+zstd15", "fpn/p4": "int8-channel"}
    assert device_quantized(specs, "cuda", "auto") == quantizable == device_quantized(specs, "cpu", "on")
    assert device_quantized(specs, "cpu", "auto") == {} == device_quantized(specs, "cuda", "off")


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
