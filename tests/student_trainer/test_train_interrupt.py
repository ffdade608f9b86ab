"""Ctrl-C and SIGTERM stop `distill train` with ``last.pt`` at the interrupted step; re-running resumes it."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from process_signals import distill_env, frozen_signal, start_distill
from test_cli import _args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ITERS = 30


def _logged_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except ValueError:  # a line being written
            break
    return steps


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_with_a_checkpoint_and_the_command_resumes(world, tmp_path, signum):
    out = tmp_path / "run"
    # No periodic checkpoint before the end (epoch ends still write one): last.pt at the
    # stop is the interruption's. One DataLoader worker, which gets the group's signal too.
    args = _args(world, out, "--losses", "ld", "--iters", str(ITERS), "--checkpoint-every", "1000", "--log-every", "1")
    args[args.index("--num-workers") + 1] = "1"
    process = start_distill(args)
    output = frozen_signal(process, lambda: len(_logged_steps(out)) >= 3, signum)
    assert process.returncode == 128 + signum, output[-3000:]
    stopped_at = int(torch.load(out / "last.pt", weights_only=True)["training"]["step"])
    assert stopped_at == _logged_steps(out)[-1] and 3 <= stopped_at < ITERS
    name = signal.Signals(signum).name
    assert f"interrupted by {name}: {out / 'last.pt'} holds step {stopped_at}/{ITERS}" in output
    assert not (out / "final.pt").exists()

    resumed = subprocess.run([sys.executable, "-m", "distillery.cli", *args], env=distill_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming gfl_tiny from {out / 'last.pt'} at step {stopped_at}/{ITERS}" in resumed.stderr
    assert _logged_steps(out) == list(range(1, ITERS + 1))  # no step lost, none twice
