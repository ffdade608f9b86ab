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


# -- mmdetection's keep-ratio rule, landscape and portrait canvases ---------------------


def _mmdet_size(h: int, w: int, canvas=(800, 1333), factor: float = 1.0) -> tuple[int, int]:
    """mmcv's rescale_size for Resize(scale=canvas, keep_ratio=True), written independently."""
    long_edge, short_edge = max(canvas), min(canvas)
    scale = min(long_edge / max(h, w), short_edge / min(h, w)) * factor
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    return new_h, new_w


@pytest.mark.parametrize(
    "kind, h, w",
    [
        ("landscape", 480, 640),
        ("portrait", 640, 480),
        ("square", 500, 500),
        ("panoramic", 300, 2000),
        ("panoramic portrait", 2000, 300),
        ("tiny (upscaled)", 20, 30),
        ("tiny portrait (upscaled)", 30, 20),
    ],
)
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_planned_sizes_follow_mmdetection_keep_ratio(kind, h, w, factor):
    (view,) = plan_views([(1, h, w)], canvas_hw=(800, 1333), scales=(factor,), flip=False)
    expected_h, expected_w = _mmdet_size(h, w, factor=factor)
    got_h, got_w = view.resized_hw
    assert abs(got_h - expected_h) <= 1 and abs(got_w - expected_w) <= 1, (kind, view.resized_hw, (expected_h, expected_w))
    # Landscape (w >= h) on 800x1333, portrait on 1333x800; the image fits its canvas.
    assert (view.canvas_h, view.canvas_w) == ((800, 1333) if w >= h else (1333, 800))
    assert view.valid_region[2] <= view.canvas_w and view.valid_region[3] <= view.canvas_h
    if kind.startswith("tiny"):
        assert view.scale > 1


def test_portrait_coco_image_gets_mmdetections_size_not_the_fit_size():
    (view,) = plan_views([(1, 640, 480)], canvas_hw=(800, 1333), flip=False)
    assert view.resized_hw == (1067, 800)
    (legacy,) = plan_views([(1, 640, 480)], canvas_hw=(800, 1333), flip=False, orient=False)
    assert legacy.resized_hw == (800, 600) and (legacy.canvas_h, legacy.canvas_w) == (800, 1333)


def test_square_canvas_keeps_one_canvas():
    views = plan_views([(1, 40, 60), (2, 60, 40), (3, 50, 50)], canvas_hw=(64, 64), flip=False)
    assert {(v.canvas_h, v.canvas_w) for v in views} == {(64, 64)}
    assert [v.resized_hw for v in views] == [(43, 64), (64, 43), (64, 64)]


def test_coco_like_sizes_match_mmdetection_independently():
    """Every planned view of COCO-like sizes against mmdetection's rule (independent check)."""
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (612, 612), (333, 500), (640, 360)]
    sizes += [(int(h), int(w)) for h, w in rng.integers(120, 641, size=(300, 2))]
    images = [(i + 1, h, w) for i, (h, w) in enumerate(sizes)]
    for canvas in ((800, 1333), (1333, 800), (512, 768)):
        for view in plan_views(images, canvas_hw=canvas, scales=(1.0, 0.75), flip=True):
            factor = 1.0 if view.view_id < 2 else 0.75
            expected = _mmdet_size(view.image_h, view.image_w, canvas=canvas, factor=factor)
            assert abs(view.resized_hw[0] - expected[0]) <= 1 and abs(view.resized_hw[1] - expected[1]) <= 1, (view, expected)
            landscape = view.image_w >= view.image_h
            assert (view.canvas_w >= view.canvas_h) == landscape or view.canvas_w == view.canvas_h
            view.validate()


def test_scale_range_plans_spread_deterministic_views():
    images = [(5, 480, 640), (6, 640, 480)]
    views = plan_views(images, canvas_hw=(800, 1333), scale_range=(0.5, 1.0), views_per_image=4, flip=True)
    assert views == plan_views(images, canvas_hw=(800, 1333), scale_range=(0.5, 1.0), views_per_image=4, flip=True)
    assert len(views) == 2 * 4 * 2
    for image_id, h, w in images:
        mine = [v for v in views if v.image_id == image_id]
        assert [v.view_id for v in mine] == list(range(8))
        assert [v.flip for v in mine] == [False, True] * 4
        base = min(1333 / max(h, w), 800 / min(h, w))
        factors = [v.scale / base for v in mine[::2]]
        # One factor in each quarter of the range, in increasing order.
        for i, f in enumerate(factors):
            assert 0.5 + 0.125 * i <= f <= 0.5 + 0.125 * (i + 1) + 1e-12
        assert all(a.scale == b.scale for a, b in zip(mine[::2], mine[1::2]))
    base = min(1333 / 640, 800 / 480)  # the same for 480x640 and 640x480
    first, second = ([v.scale / base for v in views if v.image_id == i][::2] for i in (5, 6))
    assert first != second  # drawn per image, not one fixed set


def test_scale_range_errors():
    with pytest.raises(ViewError, match="scale_range"):
        plan_views([(1, 10, 10)], canvas_hw=(64, 64), scale_range=(0.9, 0.5), views_per_image=2)
    with pytest.raises(ViewError, match="views_per_image"):
        plan_views([(1, 10, 10)], canvas_hw=(64, 64), scale_range=(0.5, 0.9), views_per_image=0)
    with pytest.raises(ViewError, match="scale_range"):
        plan_views([(1, 10, 10)], canvas_hw=(64, 64), views_per_image=2)
    from detcore.views import parse_scale_range

    assert parse_scale_range("0.8:1.0") == (0.8, 1.0)
    for bad in ("0.8", "a:b", "0:1", "0.5:1.5"):
        with pytest.raises(ValueError, match="--scale-range"):
            parse_scale_range(bad)


def test_render_is_bit_identical_on_both_canvases_in_a_subprocess():
    import hashlib

    landscape = _pixels(30, 50, seed=3)
    portrait = _pixels(50, 30, seed=4)
    views = plan_views([(1, 30, 50), (2, 50, 30)], canvas_hw=(48, 80), scales=(1.0, 0.6), flip=True)
    assert {(v.canvas_h, v.canvas_w) for v in views} == {(48, 80), (80, 48)}
    pixels = {1: landscape, 2: portrait}
    local = [hashlib.sha256(render(pixels[v.image_id], v).image.numpy().tobytes()).hexdigest() for v in views]
    assert local == [hashlib.sha256(render(pixels[v.image_id].copy(), v).image.numpy().tobytes()).hexdigest() for v in views]
    code = (
        "import sys, hashlib, numpy as np\n"
        "from detcore.views import View, render\n"
        "rng = lambda h, w, s: np.random.default_rng(s).integers(0, 256, size=(h, w, 3), dtype=np.uint8)\n"
        "pixels = {1: rng(30, 50, 3), 2: rng(50, 30, 4)}\n"
        f"views = [View.from_json(t) for t in {[v.to_json() for v in views]!r}]\n"
        "for v in views:\n"
        "    sys.stdout.write(hashlib.sha256(render(pixels[v.image_id], v).image.numpy().tobytes()).hexdigest() + '\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == local
