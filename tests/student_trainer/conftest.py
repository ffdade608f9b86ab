"""Fixtures of the student-trainer tests (the loss tests need none of them)."""

import pytest
import torch


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Synthetic data, a gfl_tiny teacher and two stores (default codecs, fp32), built once."""
    from student_fixtures import build_world

    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("student_world"))

