"""Suite-wide settings: quiet, local Ray; small thread pools (the CI machine has 2 cores)."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_OWN_RAY_TMPDIR = None
if "RAY_TMPDIR" not in os.environ:
    _OWN_RAY_TMPDIR = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="distillery-ray-")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# As `distill` sets it (distillery/cli.py): numpy's BLAS on one thread per process, so the
# DataLoader workers the tests fork do not start a spinning BLAS pool each.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)


def pytest_unconfigure(config):
    # Every test stops the Ray instances it started; what they left on disk goes with the run.
    if _OWN_RAY_TMPDIR is not None:
        shutil.rmtree(_OWN_RAY_TMPDIR, ignore_errors=True)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on the shared 2-core machine, spinning OpenMP threads of parallel tests slow each other ~4x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
