"""Suite-wide settings: quiet, local Ray; small thread pools (the CI machine has 2 cores)."""

import os
import tempfile

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="distillery-ray-"))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)
