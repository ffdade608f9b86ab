"""Reference losses (hand-computed cases), fidelity sums, and codec choice."""

from __future__ import annotations

import math

import numpy as np
import pytest

from label_store import choose_codecs, measure_fidelity
from label_store.fidelity import (
    FidelityAccumulator,
    bce_sigmoid_targets,
    bcd_cls,
    bcd_giou,
    class_kd,
    fgd_attention_mse,
    feature_mse,
    group_summary,
    hgd_rms_mse,
    ld_kl,
    reference_student,
)
from label_store.schema import TargetSpec


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bce_hand_computed():
    student = np.array([0.0, 2.0], np.float32)
    teacher = np.array([0.0, -1.0], np.float32)
    expected = 0.0
    for s, t in zip(student, teacher):
        p, q = _sigmoid(t), _sigmoid(s)
        expected += -(p * math.log(q) + (1 - p) * math.log(1 - q))
    assert bce_sigmoid_targets(student, teacher) == pytest.approx(expected / 2, rel=1e-9)


def test_ld_kl_hand_computed_and_zero_when_equal():
    temperature = 10.0
    teacher = np.zeros((8, 1, 1), np.float32)  # R = 1: two bins per edge, uniform teacher
    student = np.zeros((8, 1, 1), np.float32)
    student[0::2] = temperature * math.log(3.0)  # softmax(s / T) = (3/4, 1/4) on every edge
    expected = temperature**2 * 0.5 * math.log(4.0 / 3.0)
    assert ld_kl(student, teacher, temperature) == pytest.approx(expected, rel=1e-6)
    assert ld_kl(teacher, teacher, temperature) == 0.0
    assert ld_kl(teacher, student, temperature) > 0


def test_feature_mse():
    a = np.array([[[1.0, 2.0]]], np.float32)
    b = np.array([[[0.0, 4.0]]], np.float32)
    assert feature_mse(a, b) == pytest.approx(2.5)


def test_reference_student_is_fixed_and_close():
    teacher = np.random.default_rng(0).normal(-5, 2, (4, 8, 8)).astype(np.float32)
    a, b = reference_student(teacher), reference_student(teacher)
    assert np.array_equal(a, b)
    assert np.std(a - teacher) == pytest.approx(0.5 * teacher.std(), rel=0.15)


def _sample(specs, make_targets, n=2):
    return [make_targets(specs, i) for i in range(n)]


def test_fp32_fidelity_is_exact(specs, make_targets):
    fp32 = [TargetSpec(s.name, s.shape, "fp32") for s in specs]
    report = measure_fidelity(_sample(fp32, make_targets), fp32)
    assert set(report) == {s.name for s in specs}
    for row in report.values():
        assert row["views"] == 2
        assert row["max_abs_error"] == 0 and row["loss_rel_error"] == 0 and row["grad_rel_error"] == 0


def test_coarse_codec_has_larger_error(specs, make_targets):
    sample = _sample(specs, make_targets)
    fine = [TargetSpec(s.name, s.shape, "int8-channel") for s in specs]
    coarse = [TargetSpec(s.name, s.shape, "int3-view") for s in specs]
    fine_report, coarse_report = measure_fidelity(sample, fine), measure_fidelity(sample, coarse)
    for spec in specs:
        assert coarse_report[spec.name]["mean_abs_error"] > 4 * fine_report[spec.name]["mean_abs_error"]
        assert coarse_report[spec.name]["grad_rel_error"] > fine_report[spec.name]["grad_rel_error"]
        assert 0 < fine_report[spec.name]["max_abs_error"] < 0.1
        assert coarse_report[spec.name]["loss"] in ("bce_sigmoid_targets", "ld_kl_t10", "feature_mse")


def test_accumulator_merge_equals_joint(specs, make_targets):
    sample = _sample(specs, make_targets, 3)
    joint = FidelityAccumulator()
    first, second = FidelityAccumulator(), FidelityAccumulator()
    for index, view in enumerate(sample):
        for spec in specs:
            codec = spec.target_codec
            decoded = codec.decode(*codec.encode(view[spec.name]))
            joint.add(spec, view[spec.name], decoded)
            (first if index < 2 else second).add(spec, view[spec.name], decoded)
    first.merge(second.stats)
    merged, expected = first.report(), joint.report()
    for name in expected:
        for key in ("views", "elements", "max_abs_error", "worst_view_loss_rel_error"):
            assert merged[name][key] == expected[name][key]
        for key in ("mean_abs_error", "loss_rel_error", "grad_rel_error"):
            assert merged[name][key] == pytest.approx(expected[name][key], rel=1e-12)


def test_group_summary_weights_levels_by_elements():
    report = {
        "cls/p3": {"codec": "x", "loss": "bce", "views": 1, "elements": 300, "sum_abs_error": 3.0, "max_abs_error": 0.1,
                   "loss_fp32_sum": 1.0, "loss_decoded_sum": 1.01, "grad_sq_diff_sum": 1.0, "grad_sq_ref_sum": 100.0, "loss_rel_error": 0.01},
        "cls/p4": {"codec": "x", "loss": "bce", "views": 1, "elements": 100, "sum_abs_error": 1.0, "max_abs_error": 0.2,
                   "loss_fp32_sum": 1.0, "loss_decoded_sum": 0.95, "grad_sq_diff_sum": 0.0, "grad_sq_ref_sum": 100.0, "loss_rel_error": 0.05},
    }
    summary = group_summary(report)["cls"]
    # (300 * 0.01 - 100 * 0.05) / (300 + 100)
    assert summary["loss_rel_error"] == pytest.approx(abs(300 * 0.01 - 100 * 0.05) / 400)
    assert summary["worst_level_loss_rel_error"] == 0.05
    assert summary["max_abs_error"] == 0.2
    assert summary["grad_rel_error"] == pytest.approx(math.sqrt(1.0 / 200.0))
    assert summary["mean_abs_error"] == pytest.approx(4.0 / 400)


def test_choose_codecs_picks_smallest_within_budget(specs, make_targets):
    sample = _sample(specs, make_targets)
    result = choose_codecs(sample, specs, candidates=["int8-channel+zstd5", "int2-view+zstd5"], budgets={"cls": 0.005, "box": 0.005, "fpn": 0.01})
    rows = {(r["group"], r["codec"]): r for r in result["rows"]}
    for group in ("cls", "box", "fpn"):
        assert rows[(group, "fp32")]["ratio"] < 1.0  # the crc32c makes fp32 slightly larger than raw
        assert rows[(group, "fp32")]["loss_rel_error"] == 0
        assert rows[(group, "int2-view+zstd5")]["bytes_per_view"] < rows[(group, "int8-channel+zstd5")]["bytes_per_view"]
        passing = [r for r in result["rows"] if r["group"] == group and r["passes"]]
        assert result["chosen"][group] == min(passing, key=lambda r: r["bytes_per_view"])["codec"]
    assert not rows[("fpn", "int2-view+zstd5")]["passes"]
    assert result["chosen"]["fpn"] == "int8-channel+zstd5"
    budgets = {"cls": 0.005, "box": 0.005, "fpn": 0.01}
    for row in result["rows"]:  # a codec passes on the reference loss, every level and each method's own loss
        errors = [row["loss_rel_error"], row["worst_level_loss_rel_error"], *row["method_loss_rel_error"].values()]
        assert row["passes"] == (max(errors) < budgets[row["group"]])
    assert set(rows[("cls", "int2-view+zstd5")]["method_loss_rel_error"]) == {"class_kd_t2", "bcd_cls"}
    assert rows[("cls", "int2-view+zstd5")]["method_loss_rel_error"]["class_kd_t2"] > 0


def test_choose_codecs_tries_edge_prediction_on_box_targets_only():
    # 5 classes: an edge-grouped ('b') codec cannot apply to cls and must not be tried there
    specs = [TargetSpec("cls/p3", (5, 6, 6), "fp32"), TargetSpec("box/p3", (4 * 5, 6, 6), "fp32")]
    rng = np.random.default_rng(0)
    sample = [{s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs} for _ in range(2)]
    result = choose_codecs(sample, specs, candidates=["int6-view-dbhw+zstd5", "int6-view-dchw+zstd5"])
    tried = {(r["group"], r["codec"]) for r in result["rows"]}
    assert ("box", "int6-view-dbhw+zstd5") in tried and ("cls", "int6-view-dbhw+zstd5") not in tried
    assert ("cls", "int6-view-dchw+zstd5") in tried


def test_class_kd_hand_computed_and_zero_when_equal():
    teacher = np.zeros((2, 1, 1), np.float32)  # two classes, uniform teacher at one point
    student = np.array([[[2 * math.log(3.0)]], [[0.0]]], np.float32)  # softmax(s / 2) = (3/4, 1/4)
    expected = 4.0 * 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert class_kd(student, teacher) == pytest.approx(expected, rel=1e-6)
    assert class_kd(teacher, teacher) == 0.0


def test_fgd_attention_mse_hand_computed():
    teacher = np.array([[[1.0, 0.0]], [[0.0, 0.0]]], np.float32)  # C=2, H=1, W=2
    student = np.zeros_like(teacher)
    temperature = 0.5
    # spatial: 2 * softmax([0.5, 0] / T); channel: 2 * softmax([0.5, 0] / T); only (c=0, w=0) differs, by 1
    weight = 2 * math.exp(1) / (math.exp(1) + 1)
    assert fgd_attention_mse(student, teacher, temperature) == pytest.approx(weight * weight * 1.0 / 4, rel=1e-9)
    assert fgd_attention_mse(teacher, teacher, temperature) == 0.0


def test_method_losses_are_reported_per_target_and_group_and_merge_without_sharing(specs, make_targets):
    coarse = [TargetSpec(s.name, s.shape, "int4-view+zstd5") for s in specs]
    report = measure_fidelity(_sample(coarse, make_targets), coarse)
    for name, row in report.items():
        methods = row["method_loss_rel_error"]
        group = name.split("/")[0]
        assert set(methods) == {"cls": {"class_kd_t2", "bcd_cls"}, "box": {"bcd_giou"}, "fpn": {"fgd_attention_mse", "hgd_rms_mse"}}.get(group, set())
        assert all(error > 0 for error in methods.values())
    groups = group_summary(report)
    assert groups["cls"]["method_loss_rel_error"]["class_kd_t2"] > 0
    assert set(groups["box"]["method_loss_rel_error"]) == {"bcd_giou"}
    stats = {name: row for name, row in report.items()}
    merged = FidelityAccumulator()
    merged.merge(stats)
    merged.merge(stats)  # two equal parts: the same relative errors, the inputs untouched
    twice = merged.report()
    for name, row in report.items():
        assert twice[name]["method_loss_rel_error"] == pytest.approx(row["method_loss_rel_error"])
        assert stats[name]["methods"] == row["methods"]


def test_bcd_and_hgd_columns_equal_the_trainers_losses():
    """The report's numpy BCD and HGD terms against `student_trainer.losses` on the same values."""
    import torch

    from student_trainer.losses.bcd import aligned_giou, bcd_cls_loss
    from student_trainer.losses.hgd import channel_rms_normalize
    from detcore.outputs import distance_to_boxes, distribution_to_distance

    rng = np.random.default_rng(3)
    teacher_cls, student_cls = rng.normal(-3, 2, (2, 5, 4, 6)).astype(np.float32)
    flat = lambda x: torch.from_numpy(x.reshape(x.shape[0], -1).T.copy())  # noqa: E731  [K, H, W] -> [N, K]
    points = 4 * 6
    expected = float(bcd_cls_loss(flat(student_cls), flat(teacher_cls), None, float(points)))
    assert bcd_cls(student_cls, teacher_cls) == pytest.approx(expected, rel=1e-5)
    assert bcd_cls(teacher_cls, teacher_cls) == 0.0
    reg_max = 7
    teacher_box, student_box = rng.normal(0, 2, (2, 4 * (reg_max + 1), 4, 6)).astype(np.float32)
    anchors = torch.from_numpy(rng.uniform(0, 50, (points, 2)).astype(np.float32))
    stride = 8.0
    boxes = [distance_to_boxes(anchors, distribution_to_distance(flat(x), reg_max) * stride) for x in (student_box, teacher_box)]
    expected = float((1 - aligned_giou(*boxes)).mean())
    assert bcd_giou(student_box, teacher_box) == pytest.approx(expected, rel=1e-5)
    assert bcd_giou(teacher_box, teacher_box) == pytest.approx(0.0, abs=1e-12)
    teacher_fpn, student_fpn = rng.normal(0, 1, (2, 16, 4, 6)).astype(np.float32)
    normalized = [channel_rms_normalize(torch.from_numpy(x)[None]) for x in (student_fpn, teacher_fpn)]
    expected = float((normalized[0] - normalized[1]).pow(2).mean())
    assert hgd_rms_mse(student_fpn, teacher_fpn) == pytest.approx(expected, rel=1e-5)
