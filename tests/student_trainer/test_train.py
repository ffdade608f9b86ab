"""Tiny end-to-end runs of `train_student`, one per target source; resume; refusals; changed images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fake_endpoint import FakeEndpoint
from student_fixtures import run_config, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_store_run_writes_every_output(world, tmp_path):
    from detcore.checkpoint import load_detector_with_meta
    from detcore.train import evaluate_detector
    from student_trainer.train import train_student

    out = tmp_path / "run"
    config = run_config(world, out, losses="ld,bcd,fgd,hgd", val_annotations=str(world.val_annotations),
                        val_images=str(world.val_images), eval_every=1, iters=4)
    summary = train_student(config, progress=False)

    assert summary["finished"] and summary["step"] == 4
    assert summary["source"]["kind"] == "store"
    results = json.loads((out / "results.json").read_text())
    assert set(results["coco"]) >= {"AP", "AP50", "AP75"} and 0.0 <= results["coco"]["AP"] <= 1.0
    lines = _read_jsonl(out / "metrics.jsonl")
    train_lines = [line for line in lines if "eval" not in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    for term in ("qfl", "dfl", "giou", "ld_main", "ld_vlr", "ld_kd", "bcd_cls", "bcd_iou", "fgd", "hgd", "loss", "img_s"):
        assert all(np.isfinite(line[term]) for line in train_lines), term
    # every term is in the total the optimizer saw
    first = train_lines[0]
    parts = sum(first[k] for k in ("qfl", "dfl", "giou", "ld_main", "ld_vlr", "ld_kd", "bcd_cls", "bcd_iou", "fgd", "hgd"))
    assert parts == pytest.approx(first["loss"], rel=1e-5)
    evals = [line["eval"] for line in lines if "eval" in line]
    assert [e["tag"] for e in evals] == ["epoch 1", "final"]  # 4 images / batch 2: an epoch is 2 steps
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the student is a plain detcore checkpoint: `distill detector eval` loads it
    model, meta = load_detector_with_meta(out / "final.pt")
    assert meta["classes"] == ("square", "disc") and meta["canvas_hw"] == (64, 64)
    assert model.config.fpn_channels == 16
    metrics = evaluate_detector(out / "final.pt", world.val_annotations, world.val_images, progress=False)
    assert metrics["AP"] == pytest.approx(results["coco"]["AP"], abs=1e-9)
    # FGD and HGD modules travel with the checkpoints
    final = torch.load(out / "final.pt", weights_only=True)
    assert any(k.startswith("fgd.") for k in final["training"]["distill_state"])
    assert any(k.startswith("hgd.") for k in final["training"]["distill_state"])


def test_distill_modules_are_trained(world, tmp_path):
    from detcore.models.gfl import build_detector
    from student_trainer.distill import DistillationModel
    from student_trainer.sources import StoreSource
    from student_trainer.train import train_student

    out = tmp_path / "run"
    config = run_config(world, out, losses="ld_im,fgd,hgd", iters=2)
    train_student(config, progress=False)
    trained = torch.load(out / "final.pt", weights_only=True)["training"]["distill_state"]

    # the same construction as train_student, untrained
    torch.manual_seed(config.optim.seed)
    student = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    specs = StoreSource(str(world.store), []).specs
    initial = DistillationModel(student, config.losses, (64, 64), {s.name: s.shape[0] for s in specs}).distill_state_dict()
    assert set(initial) == set(trained)
    weights = [k for k in initial if k.endswith("weight") and ("adapters" in k or "gc" in k.lower() or "align" in k)]
    assert weights
    changed = [k for k in weights if not torch.equal(initial[k], trained[k])]
    assert any(k.startswith("ld_im.adapters") for k in weights)
    assert changed == weights  # LD imitation's and HGD's adapters, FGD's align convs and GcBlocks: all trained


def test_remote_source_run_with_retry(world, tmp_path):
    from student_trainer.train import train_student

    endpoint = FakeEndpoint(world.teacher, token="tok", overload_first=1)
    with endpoint as url:
        config = run_config(world, tmp_path / "run", losses="ld,fgd", source="remote", endpoint=url, token="tok", iters=2)
        summary = train_student(config, progress=False)
    assert summary["finished"]
    assert summary["source"]["kind"] == "remote" and summary["source"]["retries"] >= 1
    assert endpoint.overloaded == 1
    assert sum(len(r) for r in endpoint.requests) == 4  # 2 steps x batch 2, every view from the endpoint


def test_remote_source_without_store_plans_views(world, tmp_path):
    from student_trainer.train import train_student

    with FakeEndpoint(world.teacher, token="tok") as url:
        config = run_config(world, tmp_path / "run", losses="ld", source="remote", endpoint=url, token="tok",
                            store="", canvas="64x64", iters=2)
        summary = train_student(config, progress=False)
    assert summary["finished"] and summary["step"] == 2
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert "planned views" in record["resolved"]["views"]


def test_read_through_fills_misses_from_the_endpoint(world, tmp_path):
    from student_trainer.train import train_student

    partial = write_store(tmp_path / "partial.zarr", world.teacher, world.annotations, world.images, image_ids=[1, 2])
    endpoint = FakeEndpoint(world.teacher, token="tok")
    with endpoint as url:
        config = run_config(world, tmp_path / "run", losses="ld", source="read-through", endpoint=url, token="tok",
                            store=str(partial), iters=4)
        summary = train_student(config, progress=False)
    fetched = {key[0] for request in endpoint.requests for key in request}
    assert fetched == {3, 4}  # images 1 and 2 came from the store, 3 and 4 from the endpoint
    assert summary["source"]["fetched_views"] == sum(len(r) for r in endpoint.requests) > 0


def test_inprocess_baseline_run(world, tmp_path):
    from student_trainer.train import train_student

    config = run_config(world, tmp_path / "run", losses="ld,hgd", source="inprocess", teacher=str(world.teacher), iters=2)
    summary = train_student(config, progress=False)
    assert summary["finished"] and summary["source"]["kind"] == "inprocess"
    assert summary["source"]["teacher_seconds"] > 0


def test_resume_after_interruption_equals_an_uninterrupted_run(world, tmp_path):
    from student_trainer.train import train_student

    straight = tmp_path / "straight"
    train_student(run_config(world, straight, losses="ld,fgd", iters=4, checkpoint_every=100), progress=False)

    resumed = tmp_path / "resumed"
    config = run_config(world, resumed, losses="ld,fgd", iters=4, checkpoint_every=100)
    first = train_student(config, stop_after_steps=3, progress=False)
    assert not first["finished"] and first["step"] == 3
    assert not (resumed / "final.pt").exists()
    assert torch.load(resumed / "last.pt", weights_only=True)["training"]["step"] == 3
    second = train_student(config, progress=False)
    assert second["finished"] and second["step"] == 4

    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(resumed / "final.pt", weights_only=True)
    for key, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in a["training"]["distill_state"].items():
        torch.testing.assert_close(b["training"]["distill_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    steps = [line["step"] for line in _read_jsonl(resumed / "metrics.jsonl") if "eval" not in line]
    assert steps == [1, 2, 3, 4]


def test_resume_with_another_config_is_refused(world, tmp_path):
    from student_trainer.train import ResumeMismatchError, train_student

    out = tmp_path / "run"
    train_student(run_config(world, out, losses="ld", iters=4), stop_after_steps=1, progress=False)
    with pytest.raises(ResumeMismatchError, match="losses.enabled"):
        train_student(run_config(world, out, losses="fgd", iters=4), progress=False)


def test_store_of_another_canvas_or_classes_is_refused(world, tmp_path):
    from student_trainer.data import StoreFitError
    from student_trainer.train import train_student

    wide = write_store(tmp_path / "wide.zarr", world.teacher, world.annotations, world.images, canvas=(64, 96))
    with pytest.raises(StoreFitError) as info:
        train_student(run_config(world, tmp_path / "a", store=str(wide), canvas="64x64"), progress=False)
    assert "canvas: store has (64, 96), the run config asks for (64, 64)" in str(info.value)

    other = write_store(tmp_path / "other.zarr", world.teacher, world.annotations, world.images,
                        fingerprint_overrides={"classes": ["square", "triangle"]})
    with pytest.raises(StoreFitError) as info:
        train_student(run_config(world, tmp_path / "b", store=str(other)), progress=False)
    message = str(info.value)
    assert "classes: store has 2 ['square', 'triangle']" in message and "['square', 'disc']" in message
    assert message.count("\n  - ") == 1 and "canvas:" not in message  # only what differs

    box_only = write_store(tmp_path / "cls_box.zarr", world.teacher, world.annotations, world.images, groups=("cls", "box"))
    with pytest.raises(StoreFitError, match=r"targets: the enabled losses need \['fpn/p3'"):
        train_student(run_config(world, tmp_path / "c", store=str(box_only), losses="fgd"), progress=False)
    # LD's feature imitation reads the FPN targets too, and says so before any training
    with pytest.raises(StoreFitError, match=r"targets: the enabled losses need \['fpn/p3'"):
        train_student(run_config(world, tmp_path / "d", store=str(box_only), losses="ld,ld_im"), progress=False)


def test_changed_image_is_reported_by_id(world, tmp_path):
    import shutil

    from student_trainer.cli import run_config as run_cli_config
    from student_trainer.data import ImageChangedError
    from student_trainer.train import train_student

    images = tmp_path / "images"
    shutil.copytree(world.images, images)
    pixels = np.asarray(Image.open(images / "0002.png")).copy()
    pixels[0, 0] = (pixels[0, 0].astype(int) + 1) % 256  # one pixel: same size, another hash
    Image.fromarray(pixels).save(images / "0002.png")

    summary = train_student(run_config(world, tmp_path / "run", images=str(images), iters=4), progress=False)
    assert summary["finished"]
    assert list(summary["skipped_images"]["changed"]) == ["3"]  # file 0002.png is image id 3
    assert "image 3 changed on disk since precompute (hash" in summary["skipped_images"]["changed"]["3"]

    assert run_cli_config(run_config(world, tmp_path / "cli", images=str(images), iters=2), progress=False) == 3

    with pytest.raises(ImageChangedError, match="image 3 changed on disk since precompute"):
        train_student(run_config(world, tmp_path / "strict", images=str(images), strict_hash=True, iters=4), progress=False)


def test_dataloader_workers_read_the_store(world, tmp_path):
    from student_trainer.train import train_student

    summary = train_student(run_config(world, tmp_path / "run", losses="ld", num_workers=2, iters=2), progress=False)
    assert summary["finished"] and summary["step"] == 2


def test_two_canvas_store_trains_in_batches_of_one_canvas(world, tmp_path):
    """Landscape and portrait views of one store: every batch holds one canvas (a mixed batch could not stack)."""
    from label_store import open_store
    from student_fixtures import write_store

    from student_trainer.train import train_student

    store = write_store(tmp_path / "two.zarr", world.teacher, world.annotations, world.images, canvas=(48, 80))
    reader = open_store(str(store))
    assert {reader.canvas_of(*key).canvas_hw for key in reader.keys()} == {(48, 80), (80, 48)}
    summary = train_student(run_config(world, tmp_path / "run", store=str(store), losses="ld,fgd,ld_im", iters=3), progress=False)
    assert summary["finished"] and summary["step"] == 3


def test_schema_1_store_still_trains_and_resumes(world, tmp_path):
    """A store in the layout written before canvases (schema 1, one non-square canvas, views fit into it)."""
    from label_store import open_store
    from label_store.testing import write_schema_1_layout
    from student_fixtures import write_store

    from student_trainer.train import train_student

    store = write_store(tmp_path / "old.zarr", world.teacher, world.annotations, world.images, canvas=(48, 80), orient=False)
    write_schema_1_layout(str(store))
    assert open_store(str(store)).schema_version == 1
    out = tmp_path / "run"
    train_student(run_config(world, out, store=str(store), losses="ld,fgd", iters=4), stop_after_steps=2, progress=False)
    summary = train_student(run_config(world, out, store=str(store), losses="ld,fgd", iters=4), progress=False)
    assert summary["finished"] and summary["step"] == 4
