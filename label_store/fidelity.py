"""Fidelity of a codec: how much decoding changes the targets and the losses that use them.

Legend: C channels, H x W one level's map, R reg_max (box targets have 4 * (R + 1)
channels, bin j of edge e at channel ``e * (R + 1) + j``).

For every target the store measures, on a sample of views, at write time:
    max and mean absolute error of the decoded float32 values against the originals;
    the relative error of the reference loss that consumes the target,
        ``|L(student, decoded) - L(student, original)| / L(student, original)``,
    and the relative error of that loss's gradient with respect to the student,
        ``||dL/ds(decoded) - dL/ds(original)|| / ||dL/ds(original)||``.
Reference losses (numpy re-implementations, no torch), one per target group:
    cls       BCD's classification term: binary cross-entropy of sigmoid(student logits)
              against sigmoid(teacher logits), mean over all elements;
    box       LD's KL divergence at temperature T = 10 over each edge's R + 1 bins,
              ``T**2 * KL(softmax(t / T) || softmax(s / T))``, mean over points and edges;
    edges,    FGD's feature term without its masks: mean squared error;
    fpn,
    backbone
Each method's own loss where it can be computed from one view's target alone, as extra
columns (``method_loss_rel_error``); no torch, so these are numpy re-implementations:
    cls       ``class_kd_t2``: LD's class KD, ``T**2 * mean_k p_k (log p_k - log q_k)`` with
              softmaxes over the K classes at T = 2, mean over points (here at every point:
              the positives depend on the view's boxes, which the writer does not have);
              ``bcd_cls``: BCD's class term, ``sum_k BCE(s_k, p_k) * |p_k - sigmoid(s_k)|``
              with ``p = sigmoid(t)``, mean over points (BCD reads every point);
    box       LD's KL at T = 10 is the reference loss itself; ``bcd_giou``: BCD's box term,
              ``1 - GIoU`` of the boxes each point's expected edges span around it, mean over
              points (without its class-gap weight, which needs cls);
    edges     ``bcd_giou``: the same on the expected edges as stored;
    fpn,      ``fgd_attention_mse``: FGD's feature term weighted by the teacher's own spatial
    backbone  and channel attention at T = 0.5, ``mean(A_s * A_c * (s - t)**2)`` with
              ``A_s = H*W softmax_hw(mean_c |t| / T)``, ``A_c = C softmax_c(mean_hw |t| / T)``
              (without its foreground/background masks, which need the view's boxes);
              ``hgd_rms_mse``: HGD's stage term, the squared difference of the features each
              divided by its RMS over the channels at every point, mean over points and
              channels (without its object weights, which need the view's boxes).
The reference student is the teacher plus Gaussian noise of std ``0.5 * std(teacher)``
(fixed seed): a student close to its teacher, where the loss is small and a codec's
error weighs most. A student further away makes every relative error smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from label_store.codecs import fit_channel_basis, parse_codec
from label_store.schema import TARGET_GROUPS, TargetSpec

LD_TEMPERATURE = 10.0
STUDENT_NOISE = 0.5
"""Reference student = teacher + N(0, (STUDENT_NOISE * std(teacher))**2)."""
REFERENCE_SEED = 20261122

KD_TEMPERATURE = 2.0
GIOU_EPS = 1e-6
"""Floor of GIoU's union and enclosing area (as `student_trainer.losses.bcd.GIOU_EPS`)."""
FGD_TEMPERATURE = 0.5

LOSS_BUDGETS = {"cls": 0.005, "box": 0.005, "edges": 0.01, "fpn": 0.01, "backbone": 0.01}
"""Largest acceptable relative loss error per group (the defaults are chosen against it)."""

LOSS_NAMES = {
    "cls": "bce_sigmoid_targets",
    "box": f"ld_kl_t{int(LD_TEMPERATURE)}",
    "edges": "feature_mse",
    "fpn": "feature_mse",
    "backbone": "feature_mse",
}


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def bce_sigmoid_targets(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean ``BCE(sigmoid(student), sigmoid(teacher))`` over all elements (logits in, any shape)."""
    s = student.astype(np.float64)
    return float(np.mean(_softplus(s) - _sigmoid(teacher.astype(np.float64)) * s))


def ld_kl(student: np.ndarray, teacher: np.ndarray, temperature: float = LD_TEMPERATURE) -> float:
    """LD's ``T**2 * KL(softmax(t / T) || softmax(s / T))``, mean over points and the 4 edges.

    Args:
        student, teacher: box logits array[4 * (R + 1), H, W].
    """
    bins = teacher.shape[0] // 4
    t = teacher.astype(np.float64).reshape(4, bins, -1) / temperature
    s = student.astype(np.float64).reshape(4, bins, -1) / temperature
    log_t, log_s = _log_softmax(t, 1), _log_softmax(s, 1)
    return float(temperature**2 * np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=1)))


def feature_mse(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean squared error (FGD's feature term without its foreground/background masks)."""
    return float(np.mean((student.astype(np.float64) - teacher.astype(np.float64)) ** 2))


def class_kd(student: np.ndarray, teacher: np.ndarray, temperature: float = KD_TEMPERATURE) -> float:
    """LD's class KD, ``T**2 * mean_k p_k (log p_k - log q_k)`` over the K classes, mean over points.

    Args:
        student, teacher: class logits array[K, H, W].
    """
    log_p = _log_softmax(teacher.astype(np.float64) / temperature, 0)
    log_q = _log_softmax(student.astype(np.float64) / temperature, 0)
    return float(temperature**2 * np.mean(np.exp(log_p) * (log_p - log_q)))


def fgd_attention_mse(student: np.ndarray, teacher: np.ndarray, temperature: float = FGD_TEMPERATURE) -> float:
    """FGD's feature term weighted by the teacher's spatial and channel attention (no masks).

    Args:
        student, teacher: features array[C, H, W].
    """
    t = teacher.astype(np.float64)
    value = np.abs(t)
    channels, height, width = t.shape
    spatial = height * width * np.exp(_log_softmax(value.mean(axis=0).reshape(-1) / temperature, 0)).reshape(1, height, width)
    channel = channels * np.exp(_log_softmax(value.mean(axis=(1, 2)) / temperature, 0)).reshape(channels, 1, 1)
    return float(np.mean(spatial * channel * (student.astype(np.float64) - t) ** 2))


def bcd_cls(student: np.ndarray, teacher: np.ndarray) -> float:
    """BCD's class term, ``sum_k BCE(s_k, p_k) * |p_k - sigmoid(s_k)|`` with ``p = sigmoid(t)``, mean over points.

    Args:
        student, teacher: class logits array[K, ...].
    """
    s = student.astype(np.float64)
    p = _sigmoid(teacher.astype(np.float64))
    return float(np.mean(np.sum((_softplus(s) - p * s) * np.abs(p - _sigmoid(s)), axis=0)))


def _expected_edges(box: np.ndarray) -> np.ndarray:
    """Box logits array[4 * (R + 1), ...] -> expected edge distances array[4, N] (left, top, right, bottom)."""
    bins = box.shape[0] // 4
    probs = np.exp(_log_softmax(box.astype(np.float64).reshape(4, bins, -1), 1))
    return np.einsum("ejn,j->en", probs, np.arange(bins, dtype=np.float64))


def edges_giou_loss(student: np.ndarray, teacher: np.ndarray) -> float:
    """``1 - GIoU`` of the boxes ``(-l, -t, r, b)`` that edge distances array[4, ...] span around each point, mean over points.

    GIoU is invariant to shifting and scaling both boxes, so the point and the stride drop out.
    """
    s = student.astype(np.float64).reshape(4, -1)
    t = teacher.astype(np.float64).reshape(4, -1)
    boxes_s = np.stack([-s[0], -s[1], s[2], s[3]])
    boxes_t = np.stack([-t[0], -t[1], t[2], t[3]])
    area = lambda b: np.clip(b[2] - b[0], 0, None) * np.clip(b[3] - b[1], 0, None)  # noqa: E731
    overlap = np.clip(np.minimum(boxes_s[2:], boxes_t[2:]) - np.maximum(boxes_s[:2], boxes_t[:2]), 0, None).prod(axis=0)
    union = np.maximum(area(boxes_s) + area(boxes_t) - overlap, GIOU_EPS)
    enclose = np.maximum(
        np.clip(np.maximum(boxes_s[2:], boxes_t[2:]) - np.minimum(boxes_s[:2], boxes_t[:2]), 0, None).prod(axis=0), GIOU_EPS
    )
    return float(np.mean(1.0 - (overlap / union - (enclose - union) / enclose)))


def bcd_giou(student: np.ndarray, teacher: np.ndarray) -> float:
    """BCD's box term on box logits array[4 * (R + 1), ...]: `edges_giou_loss` of their expected edges."""
    return edges_giou_loss(_expected_edges(student), _expected_edges(teacher))


def hgd_rms_mse(student: np.ndarray, teacher: np.ndarray, eps: float = 1e-6) -> float:
    """HGD's stage term without its object weights: ``mean((s / rms_c(s) - t / rms_c(t))**2)``, the RMS over
    the channels at each point (as `student_trainer.losses.hgd.channel_rms_normalize`).

    Args:
        student, teacher: features array[C, H, W].
    """
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    normalize = lambda x: x / np.sqrt(np.mean(x * x, axis=0, keepdims=True) + eps)  # noqa: E731
    return float(np.mean((normalize(s) - normalize(t)) ** 2))


METHOD_LOSSES = {
    "cls": {"class_kd_t2": class_kd, "bcd_cls": bcd_cls},
    "box": {"bcd_giou": bcd_giou},
    "edges": {"bcd_giou": edges_giou_loss},
    "fpn": {"fgd_attention_mse": fgd_attention_mse, "hgd_rms_mse": hgd_rms_mse},
    "backbone": {"fgd_attention_mse": fgd_attention_mse, "hgd_rms_mse": hgd_rms_mse},
}
"""Per group, the methods' own losses reported beside the reference loss (module docstring)."""


def _method_losses(group: str, student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    return {name: loss(student, teacher) for name, loss in METHOD_LOSSES.get(group, {}).items()}


def _loss_and_grad_ref(group: str, student: np.ndarray, teacher: np.ndarray) -> tuple[float, np.ndarray]:
    """The loss and the part of its student-gradient that depends on the teacher (up to a constant)."""
    if group == "cls":
        return bce_sigmoid_targets(student, teacher), _sigmoid(teacher.astype(np.float64))
    if group == "box":
        bins = teacher.shape[0] // 4
        probs = np.exp(_log_softmax(teacher.astype(np.float64).reshape(4, bins, -1) / LD_TEMPERATURE, 1))
        return ld_kl(student, teacher), probs
    return feature_mse(student, teacher), teacher.astype(np.float64)


def _student_gradient_anchor(group: str, student: np.ndarray) -> np.ndarray:
    """The student-only part of the gradient: dL/ds is proportional to anchor(s) - ref(t)."""
    if group == "cls":
        return _sigmoid(student.astype(np.float64))
    if group == "box":
        bins = student.shape[0] // 4
        return np.exp(_log_softmax(student.astype(np.float64).reshape(4, bins, -1) / LD_TEMPERATURE, 1))
    return student.astype(np.float64)


def reference_student(teacher: np.ndarray) -> np.ndarray:
    """The fixed reference student for ``teacher``: teacher + N(0, (0.5 * std)**2), seeded."""
    rng = np.random.default_rng(REFERENCE_SEED)
    sigma = STUDENT_NOISE * float(teacher.std(dtype=np.float64))
    return (teacher + sigma * rng.standard_normal(teacher.shape, dtype=np.float32)).astype(np.float32)


@dataclass(slots=True)
class _Reference:
    student: np.ndarray
    loss: float
    grad_ref: np.ndarray
    grad_anchor: np.ndarray
    methods: dict[str, float]


def _reference(group: str, teacher: np.ndarray) -> _Reference:
    student = reference_student(teacher)
    loss, grad_ref = _loss_and_grad_ref(group, student, teacher)
    return _Reference(student, loss, grad_ref, _student_gradient_anchor(group, student), _method_losses(group, student, teacher))


def _copy_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of one target's sums that later additions do not share with ``entry``."""
    out = dict(entry)
    if "methods" in entry:
        out["methods"] = {name: dict(sums) for name, sums in entry["methods"].items()}
    return out


class FidelityAccumulator:
    """Sums over sampled views, per target, that merge exactly across parts.

    `report` turns them into the JSON the store keeps (see `summarize`).
    """

    def __init__(self, stats: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.stats: dict[str, dict[str, Any]] = {name: _copy_entry(value) for name, value in (stats or {}).items()}

    def add(self, spec: TargetSpec, original: np.ndarray, decoded: np.ndarray, reference: _Reference | None = None) -> None:
        """Account one view of one target (float32 array[C, H, W] before and after the codec)."""
        group = spec.group
        ref = reference or _reference(group, original)
        loss_decoded, grad_decoded = _loss_and_grad_ref(group, ref.student, decoded)
        error = np.abs(decoded.astype(np.float64) - original)
        grad_diff = float(np.sum((grad_decoded - ref.grad_ref) ** 2))
        grad_norm = float(np.sum((ref.grad_anchor - ref.grad_ref) ** 2))
        rel = abs(loss_decoded - ref.loss) / ref.loss if ref.loss > 0 else 0.0
        entry = self.stats.setdefault(
            spec.name,
            {
                "codec": spec.codec,
                "loss": LOSS_NAMES[group],
                "views": 0,
                "elements": 0,
                "sum_abs_error": 0.0,
                "max_abs_error": 0.0,
                "loss_fp32_sum": 0.0,
                "loss_decoded_sum": 0.0,
                "worst_view_loss_rel_error": 0.0,
                "grad_sq_diff_sum": 0.0,
                "grad_sq_ref_sum": 0.0,
            },
        )
        entry["views"] += 1
        entry["elements"] += int(original.size)
        entry["sum_abs_error"] += float(error.sum())
        entry["max_abs_error"] = max(entry["max_abs_error"], float(error.max()) if error.size else 0.0)
        entry["loss_fp32_sum"] += ref.loss
        entry["loss_decoded_sum"] += loss_decoded
        entry["worst_view_loss_rel_error"] = max(entry["worst_view_loss_rel_error"], rel)
        entry["grad_sq_diff_sum"] += grad_diff
        entry["grad_sq_ref_sum"] += grad_norm
        methods = entry.setdefault("methods", {})
        for name, value in _method_losses(group, ref.student, decoded).items():
            sums = methods.setdefault(name, {"fp32_sum": 0.0, "decoded_sum": 0.0})
            sums["fp32_sum"] += ref.methods[name]
            sums["decoded_sum"] += value

    def merge(self, other: "FidelityAccumulator | Mapping[str, Mapping[str, Any]]") -> None:
        """Add another accumulator's sums (e.g. another part's) into this one."""
        stats = other.stats if isinstance(other, FidelityAccumulator) else other
        for name, theirs in stats.items():
            mine = self.stats.get(name)
            if mine is None:
                self.stats[name] = _copy_entry(theirs)
                continue
            for key in ("views", "elements", "sum_abs_error", "loss_fp32_sum", "loss_decoded_sum", "grad_sq_diff_sum", "grad_sq_ref_sum"):
                mine[key] += theirs[key]
            for key in ("max_abs_error", "worst_view_loss_rel_error"):
                mine[key] = max(mine[key], theirs[key])
            methods = mine.setdefault("methods", {})
            for method, sums in theirs.get("methods", {}).items():
                into = methods.setdefault(method, {"fp32_sum": 0.0, "decoded_sum": 0.0})
                into["fp32_sum"] += sums["fp32_sum"]
                into["decoded_sum"] += sums["decoded_sum"]

    def report(self) -> dict[str, dict[str, Any]]:
        return summarize(self.stats)


def _relative(decoded: float, reference: float) -> float:
    return abs(decoded - reference) / reference if reference > 0 else 0.0


def summarize(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: the raw sums plus ``mean_abs_error``, ``loss_rel_error``, ``grad_rel_error``."""
    out = {}
    for name, entry in stats.items():
        row = dict(entry)
        row["mean_abs_error"] = entry["sum_abs_error"] / entry["elements"] if entry["elements"] else 0.0
        ref = entry["loss_fp32_sum"]
        row["loss_rel_error"] = abs(entry["loss_decoded_sum"] - ref) / ref if ref > 0 else 0.0
        norm = entry["grad_sq_ref_sum"]
        row["grad_rel_error"] = math.sqrt(entry["grad_sq_diff_sum"] / norm) if norm > 0 else 0.0
        row["method_loss_rel_error"] = {
            method: _relative(sums["decoded_sum"], sums["fp32_sum"]) for method, sums in entry.get("methods", {}).items()
        }
        out[name] = row
    return out


def group_summary(report: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group, the fidelity of the loss over all its levels together.

    The distillation losses flatten all levels into one set of points (so a level weighs by
    its number of elements); ``loss_rel_error`` is the relative error of that total,
    ``worst_level_loss_rel_error`` the largest error of a single level.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, row in report.items():
        group = name.split("/", 1)[0]
        views = max(row["views"], 1)
        per_view_elements = row["elements"] / views
        entry = out.setdefault(
            group,
            {"loss": row["loss"], "codecs": [], "ref": 0.0, "dec": 0.0, "gdiff": 0.0, "gref": 0.0, "abs": 0.0, "elements": 0,
             "max_abs_error": 0.0, "worst_level_loss_rel_error": 0.0, "methods": {}},
        )
        for method, sums in row.get("methods", {}).items():
            into = entry["methods"].setdefault(method, [0.0, 0.0])
            into[0] += per_view_elements * sums["fp32_sum"] / views
            into[1] += per_view_elements * sums["decoded_sum"] / views
        if row["codec"] not in entry["codecs"]:
            entry["codecs"].append(row["codec"])
        entry["ref"] += per_view_elements * row["loss_fp32_sum"] / views
        entry["dec"] += per_view_elements * row["loss_decoded_sum"] / views
        entry["gdiff"] += row["grad_sq_diff_sum"] / views
        entry["gref"] += row["grad_sq_ref_sum"] / views
        entry["abs"] += row["sum_abs_error"]
        entry["elements"] += row["elements"]
        entry["max_abs_error"] = max(entry["max_abs_error"], row["max_abs_error"])
        entry["worst_level_loss_rel_error"] = max(entry["worst_level_loss_rel_error"], row["loss_rel_error"])
    for entry in out.values():
        ref, dec, gref = entry.pop("ref"), entry.pop("dec"), entry.pop("gref")
        gdiff, total_abs, elements = entry.pop("gdiff"), entry.pop("abs"), entry.pop("elements")
        entry["loss_rel_error"] = abs(dec - ref) / ref if ref > 0 else 0.0
        entry["grad_rel_error"] = math.sqrt(gdiff / gref) if gref > 0 else 0.0
        entry["mean_abs_error"] = total_abs / elements if elements else 0.0
        entry["method_loss_rel_error"] = {method: _relative(dec_m, ref_m) for method, (ref_m, dec_m) in entry.pop("methods").items()}
    return out


def measure_fidelity(targets_sample: Sequence[Mapping[str, np.ndarray]], specs: Sequence[TargetSpec]) -> dict[str, dict[str, Any]]:
    """Fidelity report of ``specs``' codecs on a sample of views (name -> float32 array[C, H, W]).

    Returns:
        name -> {codec, loss, views, max_abs_error, mean_abs_error, loss_rel_error,
        worst_view_loss_rel_error, grad_rel_error, and the sums they come from}.
    """
    from label_store.encoding import check_targets

    accumulator = FidelityAccumulator()
    for index, targets in enumerate(targets_sample):
        arrays = check_targets(targets, specs, f"measure_fidelity(targets_sample[{index}])")
        for spec in specs:
            codec = spec.target_codec
            codes, scale, offset = codec.encode(arrays[spec.name])
            accumulator.add(spec, arrays[spec.name], codec.decode(codes, scale, offset))
    return accumulator.report()


DEFAULT_CANDIDATES = (
    ["fp16+zstd5", "fp16+blosc-zstd5-shuffle"]
    + [f"int{b}-{s}+{c}" for b in (8, 7, 6, 5, 4) for s in ("channel", "view") for c in ("zstd5", "blosc-zstd5-bitshuffle")]
    + [f"int8-std{k}+zstd5" for k in (4, 6, 8, 12, 16, 24, 32)]
    + [f"int{b}-view-d{axes}+zstd{level}" for b in (8, 7, 6, 5, 4) for axes in ("hw", "chw", "bhw") for level in (5, 15)]
)
"""Codecs `choose_codecs` compares by default (fp32 is the reference, always measured).
Those with the ``b`` prediction axis (a box target's 4 edges) are tried on box targets only."""


def choose_codecs(
    targets_sample: Sequence[Mapping[str, np.ndarray]],
    specs: Sequence[TargetSpec],
    *,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    budgets: Mapping[str, float] = LOSS_BUDGETS,
) -> dict[str, Any]:
    """Measure candidate codecs per target group and pick the smallest within the loss budget.

    A codec passes when the group's loss over all levels together (`group_summary`), the
    loss of every single level and each method's own loss (`METHOD_LOSSES`) stay under the group's budget (the per-level condition keeps
    a lucky cancellation between levels from passing); among passing codecs the one with
    the fewest stored bytes per view (compressed codes, crc32c and scale/offset) wins. The codecs in ``specs`` are ignored; their names and shapes are used.

    Returns:
        ``{"chosen": {group: codec name or None}, "rows": [one dict per group and codec with
        bytes_per_view, fp32_bytes_per_view, ratio, loss_rel_error, worst_level_loss_rel_error,
        grad_rel_error, max_abs_error, mean_abs_error, method_loss_rel_error, passes]}``.
    """
    from label_store.encoding import check_targets

    arrays = [check_targets(t, specs, f"choose_codecs(targets_sample[{i}])") for i, t in enumerate(targets_sample)]
    if not arrays:
        raise ValueError("choose_codecs(targets_sample=) expects at least one view. Got none.")
    groups = sorted({spec.group for spec in specs}, key=TARGET_GROUPS.index)
    references = {(i, spec.name): _reference(spec.group, view[spec.name]) for i, view in enumerate(arrays) for spec in specs}
    rows, chosen = [], {}
    for group in groups:
        group_specs = [spec for spec in specs if spec.group == group]
        fp32_bytes = sum(spec.fp32_nbytes for spec in group_specs)
        best = None
        for name in ["fp32", *candidates]:
            codec = parse_codec(name)
            if "b" in codec.predict and group != "box":
                continue  # its channel groups are the 4 box edges
            accumulator = FidelityAccumulator()
            stored = 0
            # A transform codec's basis is fitted on the sample it is judged on (as a store fits it on its first views).
            bases = {spec.name: fit_channel_basis([view[spec.name] for view in arrays]) if codec.needs_basis else None for spec in group_specs}
            for index, view in enumerate(arrays):
                for spec in group_specs:
                    bound = codec.with_basis(bases[spec.name])
                    codes, scale, offset = bound.encode(view[spec.name])
                    stored += codec.compressed_nbytes(codes) + 8 * scale.size
                    accumulator.add(TargetSpec(spec.name, spec.shape, name, bases[spec.name]), view[spec.name], bound.decode(codes, scale, offset), references[(index, spec.name)])
            report = accumulator.report()
            summary = group_summary(report)[group]
            bytes_per_view = stored / len(arrays)
            row = {
                "group": group,
                "codec": codec.name,
                "bytes_per_view": bytes_per_view,
                "fp32_bytes_per_view": fp32_bytes,
                "ratio": fp32_bytes / bytes_per_view,
                "loss_rel_error": summary["loss_rel_error"],
                "worst_level_loss_rel_error": summary["worst_level_loss_rel_error"],
                "grad_rel_error": summary["grad_rel_error"],
                "max_abs_error": summary["max_abs_error"],
                "mean_abs_error": summary["mean_abs_error"],
                "method_loss_rel_error": summary["method_loss_rel_error"],
            }
            worst = max(row["loss_rel_error"], row["worst_level_loss_rel_error"], *row["method_loss_rel_error"].values())
            row["passes"] = worst < budgets[group]
            rows.append(row)
            if row["passes"] and (best is None or bytes_per_view < best["bytes_per_view"]):
                best = row
        chosen[group] = best["codec"] if best else None
    return {"chosen": chosen, "rows": rows}
