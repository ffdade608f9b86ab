"""`teacher_service.pipeline_stages` as plain functions (no Ray): decode and render, the teacher
predictor (precision, CPU pinning, quantization), fault injection specs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detcore.coco import CocoDataset
from detcore.views import plan_views, render_array
from teacher_service.pipeline_stages import (
    FaultSpecError,
    TeacherPredictor,
    autocast_dtype,
    decode_and_render,
    parse_fault,
)

from precompute_fixtures import (  # noqa: F401  (fixtures are found by name)
    CANVAS,
    _decode_batch,
    _direct_targets,
    data,
    teacher_model,
)


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
