"""detcore.views: deterministic rendering, box transforms, planning, and plain-data round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detcore.views import (
    PIXEL_MEAN,
    PIXEL_STD,
    View,
    ViewError,
    content_hash,
    image_to_view_boxes,
    plan_views,
    render,
    render_array,
    view_to_image_boxes,
)

REPO = Path(__file__).resolve().parents[2]


def _pixels(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _normalised(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) - np.asarray(PIXEL_MEAN, np.float32)) * np.asarray(
        [1.0 / s for s in PIXEL_STD], np.float32
    )


VIEW = View(image_id=7, view_id=1, canvas_h=64, canvas_w=64, image_h=40, image_w=60, scale=0.5, flip=True, offset_x=3, offset_y=5)


def test_render_is_deterministic_in_process():
    pixels = _pixels()
    boxes = np.array([[10, 4, 30, 20]], np.float32)
    first = render(pixels, VIEW, boxes)
    second = render(pixels.copy(), VIEW, boxes)
    assert first.image.numpy().tobytes() == second.image.numpy().tobytes()
    assert first.gt_boxes.numpy().tobytes() == second.gt_boxes.numpy().tobytes()
    assert tuple(first.image.shape) == (3, 64, 64)
    assert first.valid_region == (3, 5, 33, 25)


def test_render_is_bit_identical_in_a_subprocess():
    pixels = _pixels()
    local = render(pixels, VIEW).image.numpy()
    code = (
        "import sys, hashlib, numpy as np\n"
        "from detcore.views import View, render\n"
        "pixels = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)\n"
        f"view = View.from_json({VIEW.to_json()!r})\n"
        "sys.stdout.write(hashlib.sha256(render(pixels, view).image.numpy().tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    import hashlib

    assert out.stdout.strip() == hashlib.sha256(local.tobytes()).hexdigest()


def test_render_pixels_padding_and_flip_without_resize():
    pixels = _pixels(10, 12)
    view = View(1, 0, 16, 20, 10, 12, 1.0, True, offset_x=4, offset_y=2)
    canvas = render_array(pixels, view)
    assert canvas.shape == (3, 16, 20) and canvas.dtype == np.float32
    # Padding is zero after normalisation; the image occupies rows 2..11, cols 4..15.
    assert np.all(canvas[:, :2] == 0) and np.all(canvas[:, 12:] == 0)
    assert np.all(canvas[:, :, :4] == 0) and np.all(canvas[:, :, 16:] == 0)
    for r, c in [(0, 0), (3, 5), (9, 11)]:
        expected = _normalised(pixels[r, 12 - 1 - c])
        np.testing.assert_allclose(canvas[:, 2 + r, 4 + c], expected, rtol=0, atol=1e-6)


def test_boxes_under_scale_flip_and_offset_hand_computed():
    boxes = np.array([[10, 4, 30, 20], [0, 0, 60, 40]], np.float32)
    # scale 0.5 -> resized 20x30 (HxW): (5, 2, 15, 10) and (0, 0, 30, 20);
    # flip in a width of 30: (15, 2, 25, 10) and (0, 0, 30, 20); offset (3, 5).
    expected = np.array([[18, 7, 28, 15], [3, 5, 33, 25]], np.float32)
    np.testing.assert_allclose(image_to_view_boxes(boxes, VIEW), expected, atol=1e-5)
    no_flip = View(7, 0, 64, 64, 40, 60, 0.5, False, offset_x=3, offset_y=5)
    np.testing.assert_allclose(image_to_view_boxes(boxes, no_flip), [[8, 7, 18, 15], [3, 5, 33, 25]], atol=1e-5)
    upscale = View(7, 2, 100, 100, 40, 60, 1.5, True)
    # scale 1.5 -> 60x90: (15, 6, 45, 30) -> flipped in 90: (45, 6, 75, 30).
    np.testing.assert_allclose(image_to_view_boxes(boxes[:1], upscale), [[45, 6, 75, 30]], atol=1e-4)
    rendered = render(_pixels(), VIEW, boxes)
    np.testing.assert_allclose(rendered.gt_boxes.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("scale", [0.37, 0.5, 1.0, 1.3])
def test_image_view_image_round_trip(flip, scale):
    view = View(3, 0, 128, 128, 40, 60, scale, flip, offset_x=2, offset_y=1)
    boxes = np.array([[1.5, 2.0, 20.0, 30.0], [40.0, 10.0, 59.0, 39.0], [0, 0, 60, 40]], np.float32)
    back = view_to_image_boxes(image_to_view_boxes(boxes, view), view)
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_view_to_image_clips_to_the_image():
    view = View(3, 0, 64, 64, 40, 60, 1.0, False)
    back = view_to_image_boxes(np.array([[-5, -5, 62, 63]], np.float32), view)
    np.testing.assert_allclose(back, [[0, 0, 60, 40]])


def test_plan_views_counts_ids_and_fit():
    views = plan_views([(11, 40, 60), (12, 100, 50)], canvas_hw=(64, 64), scales=(1.0, 0.5), flip=True)
    assert len(views) == 8
    assert [v.image_id for v in views] == [11] * 4 + [12] * 4
    assert [v.view_id for v in views] == [0, 1, 2, 3] * 2
    assert [v.flip for v in views[:4]] == [False, True, False, True]
    assert len({v.key for v in views}) == 8
    # Image 11 (40x60): fit scale min(64/40, 64/60) = 16/15 -> 43x64; image 12 (100x50): 0.64 -> 64x32.
    assert views[0].resized_hw == (43, 64) and views[0].valid_region == (0, 0, 64, 43)
    assert views[4].resized_hw == (64, 32)
    assert views[2].scale == pytest.approx(views[0].scale * 0.5)
    no_flip = plan_views([(1, 10, 10)], canvas_hw=(32, 32), scales=(1.0, 0.75, 0.5), flip=False)
    assert len(no_flip) == 3 and not any(v.flip for v in no_flip)
    with pytest.raises(ViewError):
        plan_views([(1, 10, 10)], canvas_hw=(32, 32), scales=(1.5,))


def test_view_validation_errors():
    with pytest.raises(ViewError, match="image_id=7"):
        View(7, 0, 32, 32, 40, 60, 1.0, False).validate()
    with pytest.raises(ViewError):
        render_array(_pixels(41, 60), VIEW)  # size differs from the recorded one
    with pytest.raises(ViewError):
        render_array(_pixels().astype(np.float32), VIEW)


def test_view_dict_json_and_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    views = plan_views([(5, 30, 50), (6, 50, 30)], canvas_hw=(64, 64), scales=(1.0, 0.5))
    assert all(View.from_dict(v.to_dict()) == v for v in views)
    assert all(View.from_json(v.to_json()) == v for v in views)
    pq.write_table(pa.Table.from_pylist([v.to_dict() for v in views]), tmp_path / "views.parquet")
    rows = pq.read_table(tmp_path / "views.parquet").to_pylist()
    assert [View.from_dict(r) for r in rows] == views
    with pytest.raises(ViewError, match="scale"):
        View.from_dict({k: v for k, v in views[0].to_dict().items() if k != "scale"})


def test_content_hash_sensitivity():
    pixels = _pixels()
    digest = content_hash(pixels)
    assert len(digest) == 32 and digest == content_hash(pixels.copy())
    changed = pixels.copy()
    changed[17, 23, 1] ^= 1
    assert content_hash(changed) != digest
    assert content_hash(pixels.reshape(60, 40, 3)) != digest  # same bytes, other shape
