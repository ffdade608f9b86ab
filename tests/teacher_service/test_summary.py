"""`teacher_service.summary`: which side bound the job.
"""

from __future__ import annotations

from teacher_service.precompute import PrecomputeSummary


def _summary(**fields) -> PrecomputeSummary:
    base = dict(store="s.zarr", views_planned=64, views_skipped=0, views_stored=64, views_failed=0, views_left=0,
                num_parts=2, bytes_written=1 << 20, seconds=30.0, ray_init_seconds=3.0, decode_seconds=4.0,
                forward_seconds=10.0, encode_seconds=1.0, write_seconds=20.0, stage_slots=1, num_actors=1)
    return PrecomputeSummary(**{**base, **fields})


def test_summary_says_which_side_bound_the_job():
    # one stage slot: 24 worker-s of decode + write outweigh the teacher's 11 s
    stage_bound = _summary()
    assert stage_bound.bottleneck.startswith("decode + write on the CPU: 24.0 worker-s over 1 task slot(s), >= 24.0 s")
    assert "the teacher's 11.0 s per actor" in stage_bound.bottleneck and "--codec" in stage_bound.bottleneck
    assert any(line.strip().startswith("bound by") and "decode + write" in line for line in stage_bound.format().splitlines())
    # the same work over 15 slots (a GPU node's other cores): the teacher binds
    teacher_bound = _summary(stage_slots=15)
    assert teacher_bound.bottleneck == "the teacher: 11.0 s per actor, against >= 1.6 s of decode + write per task slot (15)"
    # two actors halve the teacher's side
    assert _summary(stage_slots=8, num_actors=2).bottleneck.startswith("the teacher: 5.5 s per actor, against >= 3.0 s")
    # nothing ran (all views committed before): no verdict
    assert _summary(views_stored=0, stage_slots=0).bottleneck == "-"
    # decode, not the codecs, dominating the CPU side: no codec advice
    decode_bound = _summary(decode_seconds=20.0, write_seconds=4.0)
    assert decode_bound.bottleneck.startswith("decode + write on the CPU") and "--codec" not in decode_bound.bottleneck
    assert stage_bound.to_dict()["bound_by"] == stage_bound.bottleneck
