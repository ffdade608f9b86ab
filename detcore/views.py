"""Views: explicit geometric recipes for rendering one image onto a fixed canvas.

A view is plain data (it round-trips through a JSON or Parquet row). The teacher renders
a view once, when the label store is filled; the student renders the same view again,
epochs later and possibly on another machine, and must get the same pixels. That is why
`render` uses only integer-exact or single-library operations (PIL's resampling on uint8,
numpy flips and copies), never a thread-count-dependent float kernel.

Legend: M GT boxes; canvas H x W; boxes are ``(x1, y1, x2, y2)`` in pixels.

Sizes follow mmdetection's keep-ratio rule, which users' teachers were trained with: with
``--canvas HxW`` an image is scaled by ``min(long canvas side / long image side, short
canvas side / short image side)`` (upscaling included); landscape images (w >= h) go on the
canvas whose long side runs across, portrait ones on its transpose, so a store has two
canvases (one when square) and every target keeps one fixed shape per canvas.

Rendering order (and its inverse, `view_to_image_boxes`):
    1. resize the decoded image (height h, width w) to ``(resized_h, resized_w)`` =
       ``(round(h * scale), round(w * scale))`` with PIL bilinear resampling;
    2. if ``flip``, mirror horizontally inside the resized image;
    3. paste at ``(offset_x, offset_y)`` on a zero canvas (zero *after* normalisation,
       as mmdetection pads), ``offset + resized <= canvas``.
The valid region is ``(offset_x, offset_y, offset_x + resized_w, offset_y + resized_h)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

# ImageNet statistics in RGB order on the 0-255 scale (torchvision's and mmdetection's).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class ViewError(ValueError):
    """A view recipe that cannot be rendered (it names the image and view)."""


@dataclass(frozen=True, slots=True)
class View:
    """One explicit geometric recipe for one image."""

    image_id: int
    """COCO image id of the source image."""
    view_id: int
    """Index of this view among the views of its image (0..K-1)."""
    canvas_h: int
    """Canvas height in pixels: a store's landscape canvas or its transpose (`store_canvases`)."""
    canvas_w: int
    """Canvas width in pixels."""
    image_h: int
    """Height of the decoded (EXIF-oriented) source image."""
    image_w: int
    """Width of the decoded (EXIF-oriented) source image."""
    scale: float
    """Absolute resize factor from source pixels to canvas pixels (resized size ``round(side * scale)``)."""
    flip: bool
    """Mirror horizontally after resizing."""
    offset_x: int = 0
    """Left padding: column of the canvas where the resized image starts."""
    offset_y: int = 0
    """Top padding: row of the canvas where the resized image starts."""

    @property
    def key(self) -> tuple[int, int]:
        """``(image_id, view_id)``: unique within a store."""
        return (self.image_id, self.view_id)

    @property
    def resized_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the image after resizing, before placement."""
        return (max(1, int(round(self.image_h * self.scale))), max(1, int(round(self.image_w * self.scale))))

    @property
    def valid_region(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` of the canvas covered by image pixels (the rest is padding)."""
        rh, rw = self.resized_hw
        return (self.offset_x, self.offset_y, self.offset_x + rw, self.offset_y + rh)

    def validate(self) -> None:
        """Raise `ViewError` if the recipe does not fit its canvas."""
        where = f"image_id={self.image_id} view_id={self.view_id}"
        if self.canvas_h <= 0 or self.canvas_w <= 0:
            raise ViewError(f"View(canvas=) expects a positive size. Got {self.canvas_h}x{self.canvas_w} ({where}).")
        if self.image_h <= 0 or self.image_w <= 0:
            raise ViewError(f"View(image=) expects a positive size. Got {self.image_h}x{self.image_w} ({where}).")
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ViewError(f"View(scale=) expects a positive finite number. Got {self.scale} ({where}).")
        if self.offset_x < 0 or self.offset_y < 0:
            raise ViewError(f"View(offset=) expects non-negative offsets. Got ({self.offset_x}, {self.offset_y}) ({where}).")
        x1, y1, x2, y2 = self.valid_region
        if x2 > self.canvas_w or y2 > self.canvas_h:
            raise ViewError(
                f"View expects the resized image to fit the canvas {self.canvas_h}x{self.canvas_w}. "
                f"Got region {(x1, y1, x2, y2)} ({where}); lower the scale or the offset."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "View":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(row) - {"offset_x", "offset_y"}
        if missing:
            raise ViewError(f"View.from_dict expects fields {sorted(names)}. Missing {sorted(missing)} in {row!r}.")
        return cls(
            image_id=int(row["image_id"]),
            view_id=int(row["view_id"]),
            canvas_h=int(row["canvas_h"]),
            canvas_w=int(row["canvas_w"]),
            image_h=int(row["image_h"]),
            image_w=int(row["image_w"]),
            scale=float(row["scale"]),
            flip=bool(row["flip"]),
            offset_x=int(row.get("offset_x", 0)),
            offset_y=int(row.get("offset_y", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "View":
        return cls.from_dict(json.loads(text))


def fit_scale(image_h: int, image_w: int, canvas_h: int, canvas_w: int) -> float:
    """The largest scale at which the whole image fits the canvas (aspect kept)."""
    return min(canvas_h / image_h, canvas_w / image_w)


def store_canvases(canvas_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The canvases of ``--canvas HxW``: ``(H, W)`` then ``(W, H)``; one when square."""
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    return ((h, w),) if h == w else ((h, w), (w, h))


def view_canvas(image_h: int, image_w: int, canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """The canvas ``(H, W)`` of an image under ``--canvas``: landscape (w >= h) on the
    canvas with the long side across, portrait on the one with the long side down."""
    long_side, short_side = max(canvas_hw), min(canvas_hw)
    return (short_side, long_side) if image_w >= image_h else (long_side, short_side)


def keep_ratio_scale(image_h: int, image_w: int, canvas_hw: tuple[int, int]) -> float:
    """mmdetection's ``Resize(scale=canvas, keep_ratio=True)`` factor, upscaling included:
    ``min(long canvas side / long image side, short canvas side / short image side)``."""
    return min(max(canvas_hw) / max(image_h, image_w), min(canvas_hw) / min(image_h, image_w))


def range_scales(image_id: int, scale_range: tuple[float, float], views_per_image: int) -> list[float]:
    """``views_per_image`` scale factors spread over ``scale_range`` (LO, HI): one drawn in each of
    N equal sub-ranges, from a generator seeded by the image id (deterministic, recorded per view)."""
    lo, hi = float(scale_range[0]), float(scale_range[1])
    draws = np.random.default_rng([0x5CA1E, int(image_id)]).random(views_per_image)
    return [lo + (hi - lo) * (i + float(u)) / views_per_image for i, u in enumerate(draws)]


def parse_scale_range(text: str) -> tuple[float, float]:
    """``"LO:HI"`` (``--scale-range``) -> ``(LO, HI)`` with 0 < LO <= HI <= 1; ValueError otherwise."""
    try:
        lo, hi = (float(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--scale-range expects LO:HI, two numbers with 0 < LO <= HI <= 1 (e.g. 0.8:1.0). Got {text!r}.") from None
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"--scale-range expects LO:HI with 0 < LO <= HI <= 1 (e.g. 0.8:1.0). Got {text!r}.")
    return (lo, hi)


def check_scales(scales: Sequence[float] | None, scale_range: tuple[float, float] | None, views_per_image: int | None, where: str) -> None:
    """Raise `ViewError` for scale factors outside (0, 1] or an inconsistent ``--scale-range``."""
    if scale_range is not None:
        lo, hi = scale_range
        if not (0 < lo <= hi <= 1):
            raise ViewError(f"{where}(scale_range=) expects LO:HI with 0 < LO <= HI <= 1. Got {lo}:{hi}.")
        if not isinstance(views_per_image, int) or isinstance(views_per_image, bool) or views_per_image < 1:
            raise ViewError(f"{where}(views_per_image=) expects a positive int with scale_range. Got {views_per_image!r}.")
    elif views_per_image is not None:
        raise ViewError(f"{where}(views_per_image=) expects scale_range (--scale-range LO:HI) with it. Got none.")
    for s in scales or ():
        if not (0 < s <= 1):
            raise ViewError(f"{where}(scales=) expects factors in (0, 1]. Got {list(scales)}.")


def plan_views(
    images: Iterable[tuple[int, int, int]],
    *,
    canvas_hw: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    scale_range: tuple[float, float] | None = None,
    views_per_image: int | None = None,
    orient: bool = True,
) -> list[View]:
    """Views of every image: each scale, each with a mirrored twin when ``flip``.

    Args:
        images: ``(image_id, height, width)`` of each decoded image.
        canvas_hw: ``--canvas (H, W)``. Landscape images (w >= h) go on the canvas with the
            long side across, portrait ones on its transpose (`view_canvas`), at
            mmdetection's keep-ratio scale (`keep_ratio_scale`, upscaling included).
        scales: factors relative to that scale (1.0 is mmdetection's size), each in (0, 1].
        flip: add a mirrored twin of every scale.
        scale_range: ``(LO, HI)``: instead of ``scales``, ``views_per_image`` factors
            spread over the range per image (`range_scales`).
        views_per_image: N, with ``scale_range``.
        orient: False plans as stores of schema 1 did: every view on ``canvas_hw`` as given,
            scaled to fit it (to resume such a store with the views it was planned with).

    Returns views ordered by image, then scale, then (unflipped, flipped); placed at the
    top-left corner, as mmdetection pads on the bottom and right.
    """
    check_scales(None if scale_range is not None else scales, scale_range, views_per_image, "plan_views")
    views: list[View] = []
    for image_id, h, w in images:
        if orient:
            canvas_h, canvas_w = view_canvas(h, w, canvas_hw)
            base = keep_ratio_scale(h, w, canvas_hw)
        else:
            canvas_h, canvas_w = canvas_hw
            base = fit_scale(h, w, canvas_h, canvas_w)
        factors = range_scales(image_id, scale_range, views_per_image) if scale_range is not None else scales
        view_id = 0
        for s in factors:
            # h * base <= canvas side up to float error, so round() never overshoots by a pixel.
            scale = base * s
            for mirrored in ((False, True) if flip else (False,)):
                view = View(int(image_id), view_id, int(canvas_h), int(canvas_w), int(h), int(w), float(scale), mirrored)
                view.validate()
                views.append(view)
                view_id += 1
    return views


def content_hash(pixels: np.ndarray) -> str:
    """BLAKE2b-128 hex digest of decoded pixels (shape and dtype included).

    Recorded with every stored view: the student recomputes it on the image it loads and
    refuses a view whose source pixels changed since the teacher saw them.
    """
    array = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}|{array.dtype.str}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class RenderedView:
    """What `render` returns for one view."""

    image: "Any"
    """Tensor[3, H, W] float32, normalised, zero in the padding."""
    gt_boxes: "Any"
    """Tensor[M, 4] float32, (x1, y1, x2, y2) in canvas pixels."""
    valid_region: tuple[int, int, int, int]
    """(x1, y1, x2, y2) of the canvas covered by image pixels."""


def render_array(pixels: np.ndarray, view: View) -> np.ndarray:
    """Render to a normalised float32 array ``[3, H, W]`` (numpy; see module docstring)."""
    from PIL import Image

    where = f"image_id={view.image_id} view_id={view.view_id}"
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ViewError(f"render(pixels=) expects uint8 [H, W, 3] RGB. Got {pixels.dtype} {pixels.shape} ({where}).")
    if pixels.shape[:2] != (view.image_h, view.image_w):
        raise ViewError(
            f"render expects the image size recorded in the view, {view.image_h}x{view.image_w}. "
            f"Got {pixels.shape[0]}x{pixels.shape[1]} ({where}); the file changed since the views were planned."
        )
    view.validate()
    rh, rw = view.resized_hw
    if (rh, rw) == (view.image_h, view.image_w):
        resized = pixels
    else:
        resized = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.BILINEAR))
    if view.flip:
        resized = resized[:, ::-1]
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32)
    inv_std = np.asarray([1.0 / s for s in PIXEL_STD], dtype=np.float32)
    canvas = np.zeros((3, view.canvas_h, view.canvas_w), dtype=np.float32)
    normalised = (resized.astype(np.float32) - mean) * inv_std
    canvas[:, view.offset_y : view.offset_y + rh, view.offset_x : view.offset_x + rw] = normalised.transpose(2, 0, 1)
    return canvas


def image_to_view_boxes(boxes: np.ndarray, view: View) -> np.ndarray:
    """Map ``[M, 4]`` boxes from source-image to canvas pixels (resize, flip, place)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    rh, rw = view.resized_hw
    sx, sy = rw / view.image_w, rh / view.image_h
    out = boxes * np.asarray([sx, sy, sx, sy], dtype=np.float32)
    if view.flip:
        out = np.stack([rw - out[:, 2], out[:, 1], rw - out[:, 0], out[:, 3]], axis=1)
    return out + np.asarray([view.offset_x, view.offset_y, view.offset_x, view.offset_y], dtype=np.float32)


def view_to_image_boxes(boxes: np.ndarray, view: View, clip: bool = True) -> np.ndarray:
    """Inverse of `image_to_view_boxes`: canvas pixels back to source-image pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    rh, rw = view.resized_hw
    sx, sy = rw / view.image_w, rh / view.image_h
    out = boxes - np.asarray([view.offset_x, view.offset_y, view.offset_x, view.offset_y], dtype=np.float32)
    if view.flip:
        out = np.stack([rw - out[:, 2], out[:, 1], rw - out[:, 0], out[:, 3]], axis=1)
    out = out / np.asarray([sx, sy, sx, sy], dtype=np.float32)
    if clip:
        out[:, 0::2] = out[:, 0::2].clip(0, view.image_w)
        out[:, 1::2] = out[:, 1::2].clip(0, view.image_h)
    return out


def render(pixels: np.ndarray, view: View, gt_boxes: np.ndarray | None = None) -> RenderedView:
    """Render one view: normalised canvas tensor, transformed GT boxes and valid region.

    Args:
        pixels: uint8 ``[h, w, 3]`` RGB, as `detcore.images.load_image` returns.
        view: the recipe; its recorded image size must match ``pixels``.
        gt_boxes: ``[M, 4]`` boxes in source-image pixels, or None.

    Deterministic and bit-identical across calls and processes for the same library
    versions (tested in tests/detcore/test_views.py).
    """
    import torch

    array = render_array(pixels, view)
    boxes = np.zeros((0, 4), np.float32) if gt_boxes is None else image_to_view_boxes(gt_boxes, view)
    return RenderedView(torch.from_numpy(array), torch.from_numpy(np.ascontiguousarray(boxes)), view.valid_region)
