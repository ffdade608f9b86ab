"""The built-in synthetic detection benchmark (COCO format, byte-identical per arguments).

Hard enough that a small student is clearly weaker than a bigger teacher, small enough
to train on a 2-core machine:

- 12 classes, each a (shape, texture) pair: neither the shape nor the texture alone
  names the class (discs come solid or striped, checker appears on squares, stars and
  L-shapes, ...); colour never does: every object, and every distractor, draws its two
  colours from the same palette, with jitter.
- Objects are rotated, slightly anisotropic and textured in their own rotated frame,
  with sizes spanning COCO's small (< 32^2 px), medium and large (> 96^2 px) areas, on
  images of seven sizes between 160 and 320 px a side (several aspect ratios).
- Occlusion: objects and distractors are painted in a random order, later over earlier.
  An object's box is the box of its *visible* pixels, its ``area`` the visible pixel
  count (what COCOeval's small/medium/large ranges use). An object with less than 30 %
  of its pixels visible, or fewer than 24 visible pixels, is not painted at all (a
  top-down pass decides this before painting), so no half-hidden unlabelled instance of
  a class is left in the image.
- Clutter and look-alikes, unlabelled: ellipses (like discs), pentagons (like hexagons),
  4-point stars, 2:1 rectangles, T-shapes, arcs, thick lines and irregular blobs, with
  the same textures and palette as the objects. Partial class shapes are deliberately
  not used as distractors: they would be indistinguishable from labelled, occluded
  objects, i.e. label noise rather than difficulty.
- Noisy textured backgrounds: a smooth random colour field, sometimes a low-contrast
  global texture, per-pixel Gaussian noise, sometimes a slight blur.

Determinism: image ``index`` of ``split`` is drawn from
``numpy.random.default_rng([seed, split_code, index])`` alone, so any subset, order or
number of worker processes gives the same bytes; PNGs are written with fixed settings
(no metadata, ``compress_level=1``), JSON with ``sort_keys`` and rounded floats.
Identical bytes across machines need the same numpy, Pillow and zlib versions.

Variants: ``variant="standard"`` (the default, everything above) or ``"easy"``, the
quickstart's data: 4 classes whose shapes differ (solid disc, checker square, dotted
triangle, striped cross), 1-4 objects of 40-150 px per image, at most 2 distractors
that resemble none of them, the same backgrounds and noise. The standard variant's
bytes do not depend on the variant option existing (its files carry no variant field).

Default benchmark size: 5000 train and 500 val images (``distill data synth``), about
26,500 objects and 650 MB of PNGs; about 12 ms per image to draw and 20 ms including PNG
encoding and writing, per process (``benchmarks/synth_speed.py``; benchmarks/RESULTS.md,
"Synthetic dataset generation").

Legend: H x W image; S x S object patch; all masks are boolean numpy arrays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from detcore.engine import write_json_atomic

GENERATOR_VERSION = 1
"""Bumped whenever the pixels or annotations for given arguments would change."""

IMAGE_SIZES = ((256, 256), (192, 320), (320, 224), (224, 288), (288, 192), (160, 240), (240, 160))
"""``(height, width)`` choices, drawn uniformly."""

SHAPES = ("disc", "ring", "square", "triangle", "cross", "star", "hexagon", "crescent", "lshape")
TEXTURES = ("solid", "stripes", "dots", "checker")
CLASSES: tuple[tuple[str, str], ...] = (
    ("disc", "solid"),
    ("disc", "stripes"),
    ("ring", "dots"),
    ("square", "checker"),
    ("square", "stripes"),
    ("triangle", "solid"),
    ("triangle", "dots"),
    ("cross", "stripes"),
    ("star", "checker"),
    ("hexagon", "solid"),
    ("crescent", "dots"),
    ("lshape", "checker"),
)
"""(shape, texture) of each class, by contiguous label."""

CATEGORY_IDS = (1, 2, 3, 5, 7, 8, 11, 13, 17, 19, 23, 29)
"""COCO category id of each class: deliberately not contiguous, to exercise label mapping."""

DISTRACTORS = ("ellipse", "pentagon", "star4", "rectangle", "tshape", "arc", "line", "blob")

PALETTE = np.array(
    [
        (220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 200, 40), (200, 60, 200), (40, 190, 200),
        (240, 130, 30), (140, 90, 50), (235, 235, 235), (30, 30, 30), (130, 130, 130), (250, 160, 180),
        (120, 200, 120), (100, 60, 160),
    ],
    dtype=np.float32,
)
"""Colours shared by every class, distractor and background."""



@dataclass(frozen=True, slots=True)
class Variant:
    """What an image of one dataset variant may contain."""

    name: str
    """Variant name (``distill data synth --variant``)."""
    classes: tuple[int, ...]
    """Indices into CLASSES of this variant's classes; their order gives the contiguous labels."""
    num_objects: tuple[int, int]
    """Objects drawn per image: ``rng.integers(low, high)`` (high exclusive), before occlusion drops any."""
    num_distractors: tuple[int, int]
    """Distractors per image: ``rng.integers(low, high)``."""
    distractors: tuple[str, ...]
    """Distractor shapes to draw from."""
    object_size: tuple[float, float] | None
    """Uniform object diameter range in pixels; None: the standard small/medium/large mixture."""


VARIANTS = {
    "standard": Variant("standard", tuple(range(len(CLASSES))), (2, 11), (2, 8), DISTRACTORS, None),
    # Shapes unlike each other and unlike the distractors, large objects, little clutter.
    "easy": Variant("easy", (0, 3, 6, 7), (1, 5), (0, 3), ("star4", "arc", "line", "blob"), (40.0, 150.0)),
}
"""Dataset variants by name; "standard" is the benchmark, "easy" the quickstart's data."""


def get_variant(name: str) -> Variant:
    """The variant called ``name``; ValueError naming the known ones otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"synth variant= expects one of {sorted(VARIANTS)}. Got {name!r}.")
    return VARIANTS[name]


SPLIT_CODES = {"train": 0, "val": 1}
MIN_VISIBLE_FRACTION = 0.30
MIN_VISIBLE_PIXELS = 24
_PNG_SETTINGS = {"format": "PNG", "compress_level": 1, "optimize": False}


# -- geometry ------------------------------------------------------------------------------


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_polygon(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    "triangle": _regular_polygon(3, 1.0, -np.pi / 2) + np.array([0.0, 0.2]),
    "hexagon": _regular_polygon(6, 0.95),
    "pentagon": _regular_polygon(5, 0.95, -np.pi / 2),
    "star": _star_polygon(5, 1.0, 0.42),
    "star4": _star_polygon(4, 1.0, 0.38),
    "cross": np.array(
        [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3),
         (0.3, 0.9), (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)]
    ),
    "lshape": np.array([(-0.8, -0.9), (-0.25, -0.9), (-0.25, 0.35), (0.8, 0.35), (0.8, 0.9), (-0.8, 0.9)]),
    "tshape": np.array(
        [(-0.9, -0.8), (0.9, -0.8), (0.9, -0.3), (0.28, -0.3), (0.28, 0.9), (-0.28, 0.9), (-0.28, -0.3), (-0.9, -0.3)]
    ),
    "rectangle": np.array([(-0.95, -0.45), (0.95, -0.45), (0.95, 0.45), (-0.95, 0.45)]),
    "line": np.array([(-1.0, -0.09), (1.0, -0.09), (1.0, 0.09), (-1.0, 0.09)]),
}


def _polygon_mask(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every ``(u, v)``, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        if y0 != y1:
            crosses = (y0 > v) != (y1 > v)
            x_at = x0 + (v - y0) * ((x1 - x0) / (y1 - y0))
            inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, extra: float) -> np.ndarray:
    """Mask of a shape in its unit frame (``u, v`` in about [-1, 1]); ``extra`` varies a detail."""
    if shape in _POLYGONS:
        return _polygon_mask(u, v, _POLYGONS[shape])
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1.0
    if shape == "ellipse":
        return u * u + (v * v) * (2.2 + 0.8 * extra) <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.45 - 0.15 * extra) ** 2 + v * v > 0.8**2)
    if shape == "arc":
        return (r2 <= 1.0) & (r2 >= 0.7**2) & (v < 0.2 + 0.3 * extra)
    if shape == "blob":
        theta = np.arctan2(v, u)
        phase = 2 * np.pi * extra
        radius = 0.75 + 0.18 * np.sin(3 * theta + phase) + 0.1 * np.cos(5 * theta - 2 * phase)
        return r2 <= radius * radius
    raise ValueError(f"_shape_mask(shape=) expects one of the known shapes. Got {shape!r}.")


@dataclass(frozen=True, slots=True)
class _Layer:
    """One painted thing: a labelled object (label >= 0) or a distractor (label -1)."""

    label: int
    """Contiguous class label, or -1 for a distractor."""
    top: int
    """Row of the patch's top-left corner in the image (may be negative)."""
    left: int
    """Column of the patch's top-left corner in the image (may be negative)."""
    mask: np.ndarray
    """bool [S, S] shape mask over the whole patch (also the parts outside the image)."""
    u: np.ndarray
    """float32 [S, S] rotated frame coordinate along the object's axis, in pixels."""
    v: np.ndarray
    """float32 [S, S] rotated frame coordinate across it, in pixels."""
    texture: str
    """One of TEXTURES."""
    colours: np.ndarray
    """float32 [2, 3] the two colours of the texture."""
    period: float
    """Texture period in pixels."""
    phase: float
    """Texture offset in [0, 1)."""


def _make_layer(rng: np.random.Generator, height: int, width: int, label: int, shape: str, texture: str, size: float) -> _Layer:
    """Rasterise one rotated, anisotropic shape of about ``size`` pixels across."""
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.85, 1.18)
    extra = rng.uniform()
    half_u, half_v = 0.5 * size * aspect, 0.5 * size / aspect
    if shape == "line":
        half_u = 0.5 * size * rng.uniform(1.5, 2.5)
    reach = math.hypot(half_u, half_v)
    side = int(math.ceil(2 * reach)) + 2
    cy = rng.uniform(0, height)
    cx = rng.uniform(0, width)
    top, left = int(math.floor(cy - side / 2)), int(math.floor(cx - side / 2))
    ys = (np.arange(side, dtype=np.float32) + top + 0.5 - cy)[:, None]
    xs = (np.arange(side, dtype=np.float32) + left + 0.5 - cx)[None, :]
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = xs * cos + ys * sin
    v = ys * cos - xs * sin
    mask = _shape_mask(shape, u / np.float32(half_u), v / np.float32(half_v), extra)
    first, second = rng.choice(len(PALETTE), size=2, replace=False)
    colours = np.clip(PALETTE[[first, second]] + rng.uniform(-25, 25, size=(2, 3)).astype(np.float32), 0, 255)
    period = float(rng.uniform(4.0, 9.0)) if size < 40 else float(rng.uniform(6.0, 16.0))
    return _Layer(label, top, left, mask, u, v, texture, colours, period, float(rng.uniform()))


def _texture(u: np.ndarray, v: np.ndarray, texture: str, colours: np.ndarray, period: float, phase: float) -> np.ndarray:
    """float32 [..., 3] texture colours at frame coordinates ``(u, v)`` (pixels)."""
    a, b = u / np.float32(period) + np.float32(phase), v / np.float32(period) + np.float32(phase)
    if texture == "solid":
        # A shading ramp instead of a flat fill: solid objects are not single-colour blobs.
        weight = np.clip(0.5 + 0.06 * a, 0.0, 1.0)
        second = 0.35 * colours[0] + 0.65 * colours[1]
        return colours[0] * (1 - weight)[..., None] + second * weight[..., None]
    if texture == "stripes":
        pick = (np.floor(a).astype(np.int32) & 1).astype(bool)
    elif texture == "dots":
        fa, fb = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
        pick = fa * fa + fb * fb < 0.09
    elif texture == "checker":
        pick = ((np.floor(a).astype(np.int32) + np.floor(b).astype(np.int32)) & 1).astype(bool)
    else:
        raise ValueError(f"_texture(texture=) expects one of {TEXTURES}. Got {texture!r}.")
    return np.where(pick[..., None], colours[1], colours[0])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3]: smooth colour field, sometimes a faint global texture."""
    from PIL import Image

    grid = int(rng.integers(2, 6))
    base = PALETTE[rng.integers(len(PALETTE), size=(grid, grid))] * np.float32(0.6) + np.float32(50)
    base = base + rng.uniform(-30, 30, size=(grid, grid, 3)).astype(np.float32)
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    field = np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.float32)
    if rng.uniform() < 0.6:
        angle = rng.uniform(0, np.pi)
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        u = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))
        v = ys * np.float32(math.cos(angle)) - xs * np.float32(math.sin(angle))
        texture = TEXTURES[int(rng.integers(1, len(TEXTURES)))]
        colours = PALETTE[rng.choice(len(PALETTE), size=2, replace=False)]
        pattern = _texture(u, v, texture, colours, float(rng.uniform(6, 20)), float(rng.uniform()))
        strength = np.float32(rng.uniform(0.1, 0.3))
        field = field * (1 - strength) + pattern * strength
    return field


def _object_size(rng: np.random.Generator) -> float:
    """Diameter in pixels: a mixture covering COCO small, medium and large areas."""
    bucket = rng.uniform()
    if bucket < 0.35:
        return float(rng.uniform(10, 34))
    if bucket < 0.70:
        return float(rng.uniform(34, 100))
    return float(rng.uniform(110, 210))


def _clip_patch(layer: _Layer, height: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """(image rows, image cols, patch rows, patch cols) of the patch's part inside the image."""
    side = layer.mask.shape[0]
    y0, x0 = max(layer.top, 0), max(layer.left, 0)
    y1, x1 = min(layer.top + side, height), min(layer.left + side, width)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1), slice(y0 - layer.top, y1 - layer.top), slice(x0 - layer.left, x1 - layer.left))


def _resolve_occlusion(
    layers: list[_Layer], height: int, width: int
) -> tuple[list[tuple[_Layer, tuple[slice, slice, slice, slice]]], list[dict[str, Any]]]:
    """Decide, top layer first, what gets painted and the box of each object's visible part.

    Args:
        layers: in painting order (later ones cover earlier ones).

    Returns:
        ``(painted, annotations)``: the layers to paint with their image windows, top
        first; and per kept object ``{"label", "bbox" (x, y, w, h), "area"}``, top first.
        An object with less than MIN_VISIBLE_FRACTION of its pixels (inside and outside
        the image) visible, or fewer than MIN_VISIBLE_PIXELS, is dropped unpainted.
    """
    covered = np.zeros((height, width), dtype=bool)
    painted: list[tuple[_Layer, tuple[slice, slice, slice, slice]]] = []
    annotations: list[dict[str, Any]] = []
    for layer in reversed(layers):
        window = _clip_patch(layer, height, width)
        if window is None:
            continue
        rows, cols, prow, pcol = window
        mask = layer.mask[prow, pcol]
        if layer.label >= 0:
            visible = mask & ~covered[rows, cols]
            num_visible = int(visible.sum())
            total = int(layer.mask.sum())
            if total == 0 or num_visible < MIN_VISIBLE_PIXELS or num_visible < MIN_VISIBLE_FRACTION * total:
                continue
            ys = np.flatnonzero(visible.any(axis=1))
            xs = np.flatnonzero(visible.any(axis=0))
            x1, y1 = cols.start + int(xs[0]), rows.start + int(ys[0])
            x2, y2 = cols.start + int(xs[-1]) + 1, rows.start + int(ys[-1]) + 1
            annotations.append({"label": layer.label, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": num_visible})
        covered[rows, cols] |= mask
        painted.append((layer, window))
    return painted, annotations


def render_image(seed: int, split: str, index: int, variant: str = "standard") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image and its annotations (labels are contiguous within ``variant``'s classes).

    Returns:
        uint8 ``[H, W, 3]`` RGB pixels and a list of ``{"label", "bbox" (x, y, w, h),
        "area"}`` for the visible objects, in painting order.
    """
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    height, width = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    image = _background(rng, height, width)

    spec = get_variant(variant)
    num_objects = int(rng.integers(*spec.num_objects))
    num_distractors = int(rng.integers(*spec.num_distractors))
    kinds = [("object", int(rng.integers(len(spec.classes)))) for _ in range(num_objects)]
    kinds += [("distractor", int(rng.integers(len(spec.distractors)))) for _ in range(num_distractors)]
    order = rng.permutation(len(kinds))
    layers: list[_Layer] = []
    for k in order:
        kind, which = kinds[k]
        size = _object_size(rng) if spec.object_size is None else float(rng.uniform(*spec.object_size))
        if kind == "object":
            shape, texture = CLASSES[spec.classes[which]]
            layers.append(_make_layer(rng, height, width, which, shape, texture, size))
        else:
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
            layers.append(_make_layer(rng, height, width, -1, spec.distractors[which], texture, min(size, 120.0)))

    painted, annotations = _resolve_occlusion(layers, height, width)

    for layer, (rows, cols, prow, pcol) in reversed(painted):
        mask = layer.mask[prow, pcol]
        u, v = layer.u[prow, pcol][mask], layer.v[prow, pcol][mask]
        colours = _texture(u, v, layer.texture, layer.colours, layer.period, layer.phase)
        region = image[rows, cols]
        region[mask] = colours

    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(3, 12))
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if rng.uniform() < 0.3:
        from PIL import Image, ImageFilter

        radius = float(rng.uniform(0.4, 1.0))
        pixels = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))
    annotations.reverse()  # painting order, bottom first
    return pixels, annotations


def _write_image(task: tuple[int, str, int, str, str]) -> tuple[int, int, int, list[dict[str, Any]]]:
    """Worker: render and save one image; returns (index, height, width, annotations)."""
    from PIL import Image

    seed, split, index, path, variant = task
    pixels, annotations = render_image(seed, split, index, variant)
    Image.fromarray(pixels).save(path, **_PNG_SETTINGS)
    return index, pixels.shape[0], pixels.shape[1], annotations


def file_name(index: int) -> str:
    """Image file name of index ``index`` (relative to its split folder)."""
    return f"{index + 1:06d}.png"


def _coco_json(
    split: str, seed: int, results: list[tuple[int, int, int, list[dict[str, Any]]]], spec: Variant
) -> dict[str, Any]:
    images, annotations = [], []
    for index, height, width, objects in sorted(results, key=lambda r: r[0]):
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name(index), "height": height, "width": width})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[spec.classes[obj["label"]]],
                    "bbox": [round(float(v), 2) for v in obj["bbox"]],
                    "area": round(float(obj["area"]), 2),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": CATEGORY_IDS[c], "name": f"{CLASSES[c][0]}_{CLASSES[c][1]}", "supercategory": "shape"}
        for c in spec.classes
    ]
    info = {
        "description": "distillery synthetic detection benchmark",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
    }
    if spec.name != "standard":
        info["variant"] = spec.name
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def generate(
    out_dir: str | Path,
    *,
    num_train: int = 5000,
    num_val: int = 500,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    variant: str = "standard",
) -> dict[str, Any]:
    """Write the dataset: ``out_dir/{train,val}/*.png`` and ``out_dir/annotations/{train,val}.json``.

    Args:
        out_dir: created if missing; existing files of the same names are overwritten.
        num_train, num_val: images per split (0 allowed).
        seed: the dataset seed; the same arguments give byte-identical files.
        workers: processes; the output does not depend on it.
        progress: show a tqdm progress bar.
        variant: a name in VARIANTS: "standard" (the benchmark) or "easy" (the quickstart's).

    Returns:
        A summary: ``out_dir``, ``num_classes``, per split ``num_<split>_images`` and
        ``num_<split>_objects``, ``seconds`` and ``ms_per_image`` (wall clock).
    """
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if int(value) < 0:
            raise ValueError(f"generate({name}=) expects a count >= 0. Got {value}.")
    if int(workers) < 1:
        raise ValueError(f"generate(workers=) expects >= 1. Got {workers}.")
    spec = get_variant(variant)
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out_dir": str(out), "num_classes": len(spec.classes), "seed": int(seed), "variant": spec.name}
    start = time.perf_counter()
    splits = (("train", int(num_train)), ("val", int(num_val)))
    total = sum(n for _, n in splits)
    bar = tqdm(total=total, desc="synth", unit="img", disable=not progress)
    pool = None
    if int(workers) > 1 and total > 1:
        import multiprocessing

        # spawn: safe even when the parent already holds threads (torch, Ray).
        pool = multiprocessing.get_context("spawn").Pool(int(workers))
    try:
        for split, count in splits:
            (out / split).mkdir(parents=True, exist_ok=True)
            tasks = [(int(seed), split, i, str(out / split / file_name(i)), spec.name) for i in range(count)]
            mapper: Callable = pool.imap_unordered if pool is not None else map
            results = []
            for result in mapper(_write_image, tasks, **({"chunksize": 8} if pool is not None else {})):
                results.append(result)
                bar.update(1)
            data = _coco_json(split, int(seed), results, spec)
            write_json_atomic(out / "annotations" / f"{split}.json", data, compact=True)
            summary[f"num_{split}_images"] = count
            summary[f"num_{split}_objects"] = len(data["annotations"])
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - start
    summary["seconds"] = round(seconds, 3)
    summary["ms_per_image"] = round(1000.0 * seconds / total, 3) if total else 0.0
    return summary
