"""Fixtures of the student-trainer tests (the loss tests need none of them)."""

import pytest
import torch


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Synthetic data, a gfl_tiny teacher and two stores (default codecs, fp32), built once."""
    from student_fixtures import build_world

    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("student_world"))


@pytest.fixture
def one_thread():
    """One torch thread: the 2-core CI machine is shared, and two threads contend badly there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
