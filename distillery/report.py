"""The quickstart's table and report: AP over seeds, the gain-or-noise verdict, a self-contained HTML page.

A distilled row is called a *gain* over the baseline only when the difference of the
seed means exceeds the seed spread (the larger of the two rows' ranges over seeds),
a *loss* when it is below minus that spread, and *within noise* otherwise; with one
seed per row there is no spread and no verdict. Every number comes from the files the
training steps wrote.

The HTML report embeds everything (SVG charts, JPEG images as data URIs), so it can be
mailed or opened anywhere; it needs no plotting library.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

AP_KEYS = ("AP", "AP50", "AP75")
"""COCO metrics shown per row (the report's JSON keeps all six)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One table row: a model trained with one or more seeds."""

    label: str
    """Row name, e.g. ``gfl_tiny + LD``."""
    losses: str
    """`distill train --losses` value; ``teacher`` for the teacher, ``none`` for the baseline."""
    seeds: tuple[int, ...]
    """Seeds of the runs, in the order of ``metrics``."""
    metrics: tuple[dict[str, float], ...]
    """COCO metrics of each seed's run (AP, AP50, ... in percent)."""

    def values(self, key: str = "AP") -> list[float]:
        return [m[key] for m in self.metrics]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A distilled row against the baseline on AP."""

    delta: float
    """Mean AP of the row minus mean AP of the baseline."""
    spread: float | None
    """Larger of the two rows' AP ranges over seeds; None with a single seed on either side."""
    word: str
    """``gain``, ``loss``, ``within noise`` or ``one seed: not judged``."""


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdict(baseline: Sequence[float], distilled: Sequence[float]) -> Verdict:
    """Call the difference of means a gain or loss only when it exceeds the seed spread."""
    if not baseline or not distilled:
        raise ValueError(f"verdict() expects at least one value per row. Got {len(baseline)} and {len(distilled)}.")
    delta = mean_sd(distilled)[0] - mean_sd(baseline)[0]
    if len(baseline) < 2 or len(distilled) < 2:
        return Verdict(delta, None, "one seed: not judged")
    spread = max(max(baseline) - min(baseline), max(distilled) - min(distilled))
    if delta > spread:
        word = "gain"
    elif delta < -spread:
        word = "loss"
    else:
        word = "within noise"
    return Verdict(delta, spread, word)


def _cell(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {sd:.1f}"


def table_lines(rows: Sequence[Row]) -> list[list[str]]:
    """Header and cells of the table; the first student row (losses ``none``) is the baseline."""
    baseline = next((r for r in rows if r.losses == "none"), None)
    lines = [["model", *AP_KEYS, "AP per seed", "ΔAP vs baseline", "seed spread", "verdict"]]
    for row in rows:
        cells = [row.label, *(_cell(row.values(k)) for k in AP_KEYS)]
        cells.append(", ".join(f"{v:.1f}" for v in row.values()) if row.losses != "teacher" else "")
        if baseline is None or row.losses in ("none", "teacher"):
            cells += ["", "", ""]
        else:
            judged = verdict(baseline.values(), row.values())
            cells += [f"{judged.delta:+.1f}", "" if judged.spread is None else f"{judged.spread:.1f}", judged.word]
        lines.append(cells)
    return lines


def format_table(rows: Sequence[Row]) -> str:
    """The console table, columns padded."""
    lines = table_lines(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def table_caption(rows: Sequence[Row]) -> str:
    """What the table's numbers are: seeds per student and the verdict rule."""
    students = [r for r in rows if r.losses != "teacher"]
    seeds = sorted({len(r.seeds) for r in students})
    count = "/".join(str(s) for s in seeds)
    listed = ", ".join(str(s) for s in students[0].seeds) if students else ""
    return (
        f"Students: {count} seed(s) each ({listed}), cells are mean ± s.d. over seeds; the teacher is one run. "
        "A ΔAP is called a gain only when it exceeds the seed spread (the larger AP range over seeds "
        "of the baseline and the row); otherwise it is within noise."
    )


# -- loss curves ---------------------------------------------------------------------------

_NOT_LOSSES = {"step", "epoch", "lr", "img_s", "loss"}


def read_loss_history(metrics_jsonl: Path) -> list[dict[str, float]]:
    """The training lines of a student's ``metrics.jsonl`` (those with a ``loss`` field)."""
    if not metrics_jsonl.exists():
        return []
    history = []
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record and "step" in record:
            history.append(record)
    return history


def detection_terms(baseline_history: Sequence[dict[str, float]]) -> list[str]:
    """The loss terms the baseline logs: the detection terms every student shares."""
    names: set[str] = set()
    for record in baseline_history:
        names.update(k for k, v in record.items() if k not in _NOT_LOSSES and isinstance(v, (int, float)))
    return sorted(names)


def curve(history: Sequence[dict[str, float]], terms: Sequence[str] | None) -> list[tuple[float, float]]:
    """(step, value) points: the total ``loss``, or the sum of ``terms`` where given."""
    points = []
    for record in history:
        if terms is None:
            points.append((float(record["step"]), float(record["loss"])))
        elif all(t in record for t in terms):
            points.append((float(record["step"]), float(sum(record[t] for t in terms))))
    return points


# -- SVG charts ----------------------------------------------------------------------------

COLOURS = ("#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_bar_chart(bars: Sequence[tuple[str, Sequence[float]]], title: str, width: int = 560, height: int = 260) -> str:
    """Bars of the mean of each entry's values, with each value as a dot (seeds)."""
    left, bottom, top, right = 50, 60, 30, 10
    top_value = max([v for _, vals in bars for v in vals] + [1.0]) * 1.15
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(len(bars), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for tick in _ticks(0.0, top_value):
        y = top + plot_h * (1 - tick / top_value)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i, (label, values) in enumerate(bars):
        mean = sum(values) / len(values)
        x = left + i * slot + slot * 0.2
        y = top + plot_h * (1 - mean / top_value)
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.6:.1f}" height="{top + plot_h - y:.1f}" fill="{colour}" opacity="0.75"/>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{y - 4:.1f}" text-anchor="middle">{mean:.1f}</text>')
        for j, value in enumerate(values):
            dot_x = x + slot * 0.6 * (j + 1) / (len(values) + 1)
            dot_y = top + plot_h * (1 - value / top_value)
            parts.append(f'<circle cx="{dot_x:.1f}" cy="{dot_y:.1f}" r="3" fill="black"/>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 {top + plot_h / 2})" text-anchor="middle">AP</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], title: str, y_label: str,
                   width: int = 560, height: int = 280) -> str:
    """One polyline per series over a shared step axis, with a legend."""
    left, bottom, top, right = 55, 40, 30, 150
    points = [p for _, pts in series for p in pts]
    if not points:
        return f"<p>{html.escape(title)}: no training log found.</p>"
    x_max = max(p[0] for p in points) or 1.0
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    if y_max - y_min < 1e-9:
        y_max = y_min + 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(point: tuple[float, float]) -> str:
        return f"{left + plot_w * point[0] / x_max:.1f},{top + plot_h * (1 - (point[1] - y_min) / (y_max - y_min)):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{left + plot_w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for tick in _ticks(y_min, y_max):
        y = top + plot_h * (1 - (tick - y_min) / (y_max - y_min))
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for tick in _ticks(0.0, x_max):
        x = left + plot_w * tick / x_max
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 {top + plot_h / 2})" text-anchor="middle">{html.escape(y_label)}</text>')
    for i, (label, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(xy(p) for p in pts)}"/>')
        legend_y = top + 14 * i + 6
        parts.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{left + plot_w + 32}" y="{legend_y + 4}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values in [low, high]."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


# -- detections drawn on validation images -------------------------------------------------


def draw_detections(pixels, boxes, labels, scores, class_names: Sequence[str], title: str, score_thr: float = 0.3):
    """A PIL image of ``pixels`` (uint8 [H, W, 3]) with boxes (x1, y1, x2, y2) at score >= ``score_thr`` drawn."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(image)
    for box, label, score in zip(boxes, labels, scores):
        if score < score_thr:
            continue
        colour = COLOURS[1 + int(label) % (len(COLOURS) - 1)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        text = class_names[int(label)] if score >= 1.0 else f"{class_names[int(label)]} {score:.2f}"
        draw.rectangle((x1, max(y1 - 11, 0), x1 + 6 * len(text) + 2, max(y1 - 11, 0) + 11), fill=colour)
        draw.text((x1 + 1, max(y1 - 11, 0)), text, fill="white")
    canvas = Image.new("RGB", (image.width, image.height + 16), "white")
    canvas.paste(image, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black")
    return canvas


def predict(checkpoint: Path, dataset, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Detections of a checkpoint on some images of a `CocoDataset`, in source-image pixels, by image id."""
    import torch

    from detcore.checkpoint import load_detector_with_meta
    from detcore.datasets import ViewDataset, collate_views
    from detcore.evaluate import detections_to_image
    from detcore.views import plan_views

    model, meta = load_detector_with_meta(checkpoint)
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in image_ids],
                       canvas_hw=meta["canvas_hw"], scales=(1.0,), flip=False)
    batch = collate_views([ViewDataset(dataset, views)[k] for k in range(len(views))])
    with torch.no_grad():
        predictions = model.predict(model(batch["images"]), score_thr=0.05, canvas_hw=meta["canvas_hw"])
    return {
        view.image_id: {
            "boxes": detections_to_image(p["boxes"].float(), view),
            "scores": p["scores"].float().numpy(),
            "labels": p["labels"].numpy(),
        }
        for view, p in zip(batch["views"], predictions)
    }


def image_data_uri(image) -> str:
    """A PIL image as an inline JPEG (noisy synthetic pixels compress poorly as PNG)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def detection_panels(models: Sequence[tuple[str, Path]], annotations: Path, images: Path,
                     num_images: int = 3) -> list[list[tuple[str, str]]]:
    """Per validation image (the first ``num_images`` with objects): ground truth and each model's
    detections, as ``(caption, JPEG data URI)``."""
    import numpy as np

    from detcore.coco import CocoDataset

    dataset = CocoDataset(annotations, images)
    image_ids = [i for i in dataset.image_ids if len(dataset.targets(i).gt_boxes)][:num_images]
    detections = {name: predict(path, dataset, image_ids) for name, path in models}
    panels = []
    for image_id in image_ids:
        pixels = dataset.load(image_id)
        targets = dataset.targets(image_id)
        gt_boxes = np.asarray(targets.gt_boxes, dtype=np.float32).reshape(-1, 4)
        gt_labels = np.asarray(targets.gt_labels).reshape(-1)
        row = [("ground truth", image_data_uri(draw_detections(pixels, gt_boxes, gt_labels, np.ones(len(gt_boxes)),
                                                                dataset.classes, f"image {image_id}: ground truth")))]
        for name, _ in models:
            det = detections[name][image_id]
            row.append((name, image_data_uri(draw_detections(pixels, det["boxes"], det["labels"], det["scores"],
                                                            dataset.classes, name))))
        panels.append(row)
    return panels


# -- the page ------------------------------------------------------------------------------


def write_report(path: Path, *, title: str, intro: str, rows: Sequence[Row],
                 curves: Sequence[tuple[str, str, str, Sequence[tuple[str, Sequence[tuple[float, float]]]]]],
                 panels: Sequence[Sequence[tuple[str, str]]], timings: Sequence[tuple[str, str]],
                 summary: dict[str, Any]) -> Path:
    """Write the self-contained HTML report and a JSON of its numbers beside it (``.json``)."""
    lines = table_lines(rows)
    table = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in lines[0]) + "</tr>"]
    for line in lines[1:]:
        table.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>")
    table.append("</table>")
    bars = svg_bar_chart([(r.label.split(" ", 1)[-1] if r.losses != "teacher" else "teacher", r.values()) for r in rows],
                         "COCO AP per model (bar: mean, dots: seeds)")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(intro)}</p>",
        "<h2>AP</h2>", *table, f"<p class='note'>{html.escape(table_caption(rows))}</p>", bars,
        "<h2>Training loss</h2>",
        *(f"<div class='chart'>{svg_line_chart(series, name, y_label)}<p class='note'>{html.escape(note)}</p></div>"
          for name, y_label, note, series in curves),
        "<h2>Validation images</h2>",
        "<p class='note'>Boxes at score ≥ 0.3; seed 0 of each student.</p>",
    ]
    for row in panels:
        body.append("<div class='row'>" + "".join(
            f"<figure><img src='{uri}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, uri in row) + "</div>")
    body.append("<h2>Wall time of this run</h2><table>" + "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>" for name, value in timings) + "</table>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.note{color:#555;font-size:90%}"
             ".row{display:flex;gap:8px;flex-wrap:wrap}figure{margin:0}.chart{display:inline-block;vertical-align:top}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path
