"""Teacher-like synthetic targets for tests and benchmarks (until real teacher outputs exist).

Legend: K classes, R reg_max, C channels, H x W one level's map.

The arrays follow the value statistics of a trained GFL teacher, per view:
    cls/*       sigmoid logits: a per-class background level in [-7.5, -4.5], a smooth
                spatial field (std 0.8) and per-point texture (std ``texture``); a few
                objects add Gaussian blobs of +8..+12 on their class, strongest at the
                level that matches their size, so a handful of logits reach +1..+5;
    box/*       edge-distribution logits, peaked: for each point and edge an expected
                distance d (smooth over space, in [0, R]) and a width w in [0.7, 1.7]
                bins give ``6 - 1.5 * min(((j - d) / w)**2, 9)``, plus texture;
    fpn/*       features without ReLU, roughly N(0, 1): per-channel mean N(0, 0.3**2) and
                gain lognormal(0, 0.4), times a smooth field (std 0.8) plus texture
                (std ``2 * texture``);
    backbone/*  post-ReLU stage features: the same field shifted by -0.3 and clipped at 0
                (about 60% zeros).
``texture`` (per-point noise, 0.3 by default) sets how much is left for entropy coding;
real teacher maps are spatially smoother than independent noise, so the default is the
pessimistic side for compression.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

from label_store.schema import TargetSpec


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cell: float) -> np.ndarray:
    """Unit-variance-ish field, bilinear interpolation of a grid with one node per ``cell`` points."""
    channels, height, width = shape
    gh, gw = max(1, math.ceil(height / cell)) + 1, max(1, math.ceil(width / cell)) + 1
    grid = rng.standard_normal((channels, gh, gw), dtype=np.float32)
    ys = np.linspace(0, gh - 1.0, height, dtype=np.float32) if height > 1 else np.zeros(1, np.float32)
    xs = np.linspace(0, gw - 1.0, width, dtype=np.float32) if width > 1 else np.zeros(1, np.float32)
    y0 = np.minimum(ys.astype(int), gh - 2) if gh > 1 else np.zeros(height, int)
    x0 = np.minimum(xs.astype(int), gw - 2) if gw > 1 else np.zeros(width, int)
    fy = (ys - y0)[None, :, None]
    fx = (xs - x0)[None, None, :]
    top = grid[:, y0][:, :, x0] * (1 - fx) + grid[:, y0][:, :, x0 + 1] * fx
    bottom = grid[:, y0 + 1][:, :, x0] * (1 - fx) + grid[:, y0 + 1][:, :, x0 + 1] * fx
    field = top * (1 - fy) + bottom * fy
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def synthetic_targets(
    specs: Sequence[TargetSpec],
    *,
    seed: int = 0,
    texture: float = 0.3,
    num_objects: int = 4,
) -> dict[str, np.ndarray]:
    """One view of teacher-like targets: name -> float32 array[C, H, W] for every spec.

    Args:
        specs: the targets to produce (groups cls, box, fpn, backbone).
        seed: the view's seed; the same seed gives the same arrays.
        texture: std of per-point noise on logits (twice that on features).
        num_objects: objects in the view (blobs on the class logits).
    """
    rng = np.random.default_rng(seed)
    objects = [
        (int(rng.integers(0, 1 << 30)), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.5), rng.uniform(8, 12))
        for _ in range(num_objects)
    ]
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        c, h, w = spec.shape
        sub = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        if spec.group == "cls":
            base = sub.uniform(-7.5, -4.5, (c, 1, 1)).astype(np.float32)
            x = base + 0.8 * _smooth_field(sub, spec.shape, 4) + texture * sub.standard_normal(spec.shape, dtype=np.float32)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            for token, cy, cx, size, peak in objects:
                # strongest where the object spans ~4 cells of this level (detector level assignment)
                cells = size * max(h, w)
                weight = math.exp(-0.5 * math.log2(max(cells, 1e-3) / 4.0) ** 2)
                radius = max(0.5, cells / 4)
                blob = np.exp(-((yy - cy * h) ** 2 + (xx - cx * w) ** 2) / (2 * radius**2))
                x[token % c] += (peak * weight) * blob
        elif spec.group == "box":
            bins = c // 4
            reg_max = bins - 1
            dist = np.clip(reg_max / 2 + reg_max / 3 * _smooth_field(sub, (4, h, w), 8), 0, reg_max)
            width = 0.7 + 0.5 * np.abs(_smooth_field(sub, (4, h, w), 8))
            j = np.arange(bins, dtype=np.float32)[None, :, None, None]
            logits = 6 - 1.5 * np.minimum(((j - dist[:, None]) / width[:, None]) ** 2, 9)
            x = logits.reshape(c, h, w) + texture * sub.standard_normal(spec.shape, dtype=np.float32)
        else:
            mean = sub.normal(0, 0.3, (c, 1, 1)).astype(np.float32)
            gain = np.exp(sub.normal(0, 0.4, (c, 1, 1))).astype(np.float32)
            field = 0.8 * _smooth_field(sub, spec.shape, 4) + 2 * texture * sub.standard_normal(spec.shape, dtype=np.float32)
            x = mean + gain * field
            if spec.group == "backbone":
                x = np.maximum(x - 0.3, 0)
        out[spec.name] = np.ascontiguousarray(x, dtype=np.float32)
    return out


def write_schema_1_layout(path: str) -> None:
    """Rewrite a local store of one canvas's views into the schema-1 layout, byte for byte what
    the writer of schema 1 produced: root attributes without ``canvases`` and version 1,
    manifest entries without the ``canvas`` column. For tests that old stores still read.

    Raises:
        ValueError: a view of the store is on another canvas than the first.
    """
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from label_store._manifest import META_KEY, ROOT_KEY

    root = os.path.join(path, "zarr.json")
    with open(root) as handle:
        group = json.load(handle)
    meta = group["attributes"][ROOT_KEY]
    meta.pop("canvases", None)
    meta["schema_version"] = 1
    meta["layout"] = {k: v for k, v in meta["layout"].items() if "<canvas path>" not in k}
    meta["layout"]["parts/<part_dir>/<group>/<level>"] = "codes[N, C, H, W], one view per inner chunk, views_per_shard per shard"
    with open(root, "w") as handle:
        json.dump(group, handle, indent=2)
    folder = os.path.join(path, "manifest", "parts")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        file = os.path.join(folder, name)
        table = pq.read_table(file)
        if any(value != 0 for value in table.column("canvas").to_pylist()):
            raise ValueError(f"write_schema_1_layout expects every view on the first canvas. Got others in {file}.")
        entry = json.loads(table.schema.metadata[META_KEY])
        entry["schema_version"] = 1
        table = table.drop_columns(["canvas"]).replace_schema_metadata({META_KEY: json.dumps(entry, sort_keys=True).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        with open(file, "wb") as handle:
            handle.write(sink.getvalue().to_pybytes())
