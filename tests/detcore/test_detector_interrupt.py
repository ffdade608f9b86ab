"""Ctrl-C and SIGTERM stop `distill detector train` with ``last.pt`` at the interruption; re-running resumes it."""

import signal
import subprocess
import sys

import pytest
import torch

from process_signals import distill_env, frozen_signal, start_distill
from test_detector_train import make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ITERS = 40


def _step(path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["training"]["step"])
    except Exception:  # absent, or caught between write and rename
        return 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_detector_training_with_a_checkpoint_and_the_command_resumes(tmp_path, signum):
    annotations, images = make_dataset(tmp_path / "data", [(64, 64), (48, 64), (64, 40), (64, 64)])
    out = tmp_path / "run"
    args = ["detector", "train", "--annotations", annotations, "--images", images, "--arch", "gfl_tiny",
            "--out", str(out), "--iters", str(ITERS), "--batch-size", "2", "--canvas", "64", "--num-workers", "1",
            "--checkpoint-every", "3", "--threads", "1", "--no-progress"]
    # A worker process gets the group's signal too: it must leave the stop to the main process.
    process = start_distill(args)
    output = frozen_signal(process, lambda: _step(out / "last.pt") >= 3, signum)
    stopped_at = _step(out / "last.pt")
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, output[-3000:]
    assert f"interrupted by {name}: {out / 'last.pt'} holds step {stopped_at}/{ITERS}" in output, output[-3000:]
    assert 3 <= stopped_at < ITERS and not (out / "final.pt").exists()

    resumed = subprocess.run([sys.executable, "-m", "distillery.cli", *args], env=distill_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming gfl_tiny from {out / 'last.pt'} at step {stopped_at}/{ITERS}." in resumed.stderr
    assert f"trained gfl_tiny for {ITERS} steps" in resumed.stdout
    assert (out / "final.pt").exists()
