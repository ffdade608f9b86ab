"""Parity: every loss computed from stored targets equals the loss from the in-process teacher.

One batch of stored views, rendered by the trainer's dataset; the same student; the same
recipes. With an fp32 store the two must agree to float rounding. With the store's
default (lossy) codecs, every decoded target must lie within its codec's stated
elementwise error ``b = TargetCodec.error_bound`` of the teacher's output, and every
loss within the error that targets off by at most ``b`` can cause: to first order
``|L(t + e) - L(t)| <= sum_i |dL/dt_i| * b_i``, with the derivative taken through the
whole loss (its internal ``detach`` calls switched off, so that weights computed from
the teacher count too), and a factor 1.5 for the second-order rest.
"""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TERMS = {
    "ld_main": ("box", "cls"), "ld_vlr": ("box",), "ld_kd": ("cls",), "ld_im": ("fpn",),
    "bcd_cls": ("cls",), "bcd_iou": ("box", "cls"), "fgd": ("fpn",), "hgd": ("fpn", "backbone"),
}


def _batch(world, store):
    from detcore.coco import CocoDataset
    from student_trainer.config import parse_losses
    from student_trainer.data import StoreViewDataset, collate_train
    from student_trainer.distill import needed_target_names
    from student_trainer.sources import StoreSource
    from student_fixtures import run_config

    config = run_config(world, world.root / "unused", losses="all,ld_im", store=str(store))
    assert config.losses.enabled == parse_losses("all")[:3] + ("ld_im",) + parse_losses("all")[3:]
    names = needed_target_names(config.losses, config.student.strides)
    source = StoreSource(str(store), names)
    stored = source.stored_views()
    views = [v for v, _ in stored]
    dataset = StoreViewDataset(
        CocoDataset(world.annotations, world.images), views, expected_hashes={v.key: h for v, h in stored},
        target_reader=source.worker_reader(),
    )
    # one view of each of two images, one of them flipped: the renders the teacher saw
    picks = [i for i, v in enumerate(views) if v.key in {(1, 0), (2, 1)}]
    batch = collate_train([dataset[i] for i in picks])
    assert not batch["failures"] and batch["targets"] is not None
    return config, names, source, batch


def _model(config, source):
    from detcore.models.gfl import build_detector
    from student_trainer.distill import DistillationModel

    torch.manual_seed(0)
    student = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    return DistillationModel(student, config.losses, (64, 64), {s.name: s.shape[0] for s in source.specs})


def _losses(config, names, source, batch, targets):
    model = _model(config, source)
    with torch.no_grad():
        terms, _ = model(batch["images"], batch["gt_boxes"], batch["gt_labels"], source.outputs(targets))
    return {k: float(v) for k, v in terms.items()}


def _first_order_bounds(config, source, batch, targets, bounds, monkeypatch):
    """sum_i |dL/dt_i| * b_i per term, at the teacher's targets."""
    model = _model(config, source)
    leaves = {name: t.clone().requires_grad_(True) for name, t in targets.items()}
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "detach", lambda self: self)
        terms, _ = model(batch["images"], batch["gt_boxes"], batch["gt_labels"], source.outputs(leaves))
        out = {}
        for term in TERMS:
            grads = torch.autograd.grad(terms[term], list(leaves.values()), retain_graph=True, allow_unused=True)
            out[term] = sum(
                float((g.abs() * bounds[name]).sum()) for name, g in zip(leaves, grads) if g is not None
            )
    return out


@pytest.fixture(scope="module")
def teacher_targets(world):
    from student_trainer.sources import InProcessTeacherSource

    _, names, _, batch = _batch(world, world.store_fp32)
    teacher = InProcessTeacherSource(str(world.teacher), names)
    return teacher.get(batch["views"], images=batch["images"])


def test_fp32_store_gives_the_teachers_losses(world, teacher_targets):
    config, names, source, batch = _batch(world, world.store_fp32)
    for name in names:
        torch.testing.assert_close(batch["targets"][name], teacher_targets[name], rtol=1e-4, atol=1e-5, msg=name)
    from_store = _losses(config, names, source, batch, batch["targets"])
    from_teacher = _losses(config, names, source, batch, teacher_targets)
    assert set(TERMS) <= set(from_store)
    for term in TERMS:
        assert from_teacher[term] > 0, term
        assert from_store[term] == pytest.approx(from_teacher[term], rel=1e-4, abs=1e-7), term


def test_default_codecs_stay_within_their_stated_error(world, teacher_targets, monkeypatch):
    config, names, source, batch = _batch(world, world.store)
    bounds = {}
    specs = {spec.name: spec for spec in source.specs}
    for name in names:
        codec = specs[name].target_codec
        assert codec.name != "fp32"
        stored, exact = batch["targets"][name].numpy(), teacher_targets[name].numpy()
        per_view = []
        for view in range(exact.shape[0]):
            _, scale, _ = codec.encode(exact[view])
            # the stated bound, plus float32 noise between the store's batch-of-8 teacher forward and this one
            bound = codec.error_bound(exact[view], scale) + 1e-5 * np.abs(exact[view]) + 1e-5
            assert np.all(np.abs(stored[view] - exact[view]) <= bound), name
            per_view.append(bound)
        bounds[name] = torch.from_numpy(np.stack(per_view))

    from_store = _losses(config, names, source, batch, batch["targets"])
    from_teacher = _losses(config, names, source, batch, teacher_targets)
    first_order = _first_order_bounds(config, source, batch, teacher_targets, bounds, monkeypatch)
    for term in TERMS:
        difference = abs(from_store[term] - from_teacher[term])
        assert difference <= 1.5 * first_order[term] + 1e-9, (term, difference, first_order[term])
        assert first_order[term] < abs(from_teacher[term]), term  # a bound below the loss itself: not vacuous
    # the codecs are lossy: the losses do differ from the teacher's
    assert sum(from_store[t] != from_teacher[t] for t in TERMS) >= len(TERMS) - 1
