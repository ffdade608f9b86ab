"""`distill train`: flags -> run config -> exit codes; a killed run resumes when re-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(world, out, *extra):
    return ["train", "--store", str(world.store), "--annotations", str(world.annotations), "--images", str(world.images),
            "--student", "gfl_tiny", "--out", str(out), "--batch-size", "2", "--num-workers", "0", "--threads", "1",
            "--device", "cpu", "--no-progress", "--set", "student.fpn_channels=16", "--set", "student.head_channels=16",
            "--set", "schedule.tensorboard=false", *extra]


def test_help_lists_the_options():
    from distillery.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    text = action.choices["train"].format_help()
    for option in ("--store", "--losses", "--source", "--endpoint", "--teacher", "--ray-workers", "--address",
                   "--eval-every", "--config", "--set", "--strict-hash", "--photometric"):
        assert option in text


def test_train_command_runs_and_maps_errors_to_exit_codes(world, tmp_path):
    from distillery.cli import main

    out = tmp_path / "run"
    assert main(_args(world, out, "--losses", "ld,bcd", "--iters", "2", "--val-annotations", str(world.val_annotations),
                      "--val-images", str(world.val_images))) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["losses"] == ["ld_main", "ld_vlr", "ld_kd", "bcd"] and results["step"] == 2
    assert "AP" in results["coco"]
    assert main(_args(world, tmp_path / "bad", "--losses", "kd-ish", "--iters", "2")) == 2
    assert main(_args(world, tmp_path / "canvas", "--canvas", "96x96", "--iters", "2")) == 2
    assert main(_args(world, tmp_path / "set", "--set", "optim.nonsense=1")) == 2
    config_file = tmp_path / "run.yaml"
    config_file.write_text("losses:\n  enabled: [fgd]\noptim:\n  iters: 1\n")
    assert main(_args(world, tmp_path / "from_file", "--config", str(config_file))) == 0
    assert json.loads((tmp_path / "from_file" / "results.json").read_text())["losses"] == ["fgd"]


def test_progress_bar_follows_no_progress_and_tqdm_disable(world, tmp_path, capsys, caplog, monkeypatch):
    """A bar with the step lines under it, or (--no-progress, TQDM_DISABLE) no bar and the step lines logged."""
    import logging

    from distillery.cli import main

    def train(name, progress_flag):
        caplog.clear()
        args = [a for a in _args(world, tmp_path / name, "--iters", "1", "--log-every", "1") if a != "--no-progress"]
        with caplog.at_level(logging.INFO, logger="student_trainer"):
            assert main(args + ([progress_flag] if progress_flag else [])) == 0
        logged = any(r.getMessage().startswith("step 1/1 ") for r in caplog.records)
        return "train gfl_tiny" in capsys.readouterr().err, logged

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py sets it for the suite
    assert train("bar", None) == (True, False)
    assert train("flag", "--no-progress") == (False, True)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert train("env", None) == (False, True)


def test_a_killed_run_resumes_when_the_command_is_re_run(world, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "distillery.cli", *_args(world, out, "--losses", "ld", "--iters", "24",
                                                             "--checkpoint-every", "1", "--log-every", "1")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    step = 0
    try:
        while time.time() < deadline and step < 3:
            time.sleep(0.5)
            if (out / "last.pt").exists():
                try:
                    step = torch.load(out / "last.pt", weights_only=True)["training"]["step"]
                except Exception:  # caught between write and rename: read again
                    continue
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert step >= 3
    killed_at = torch.load(out / "last.pt", weights_only=True)["training"]["step"]
    assert not (out / "final.pt").exists()

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming gfl_tiny from {out / 'last.pt'} at step {killed_at}/24" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # no step lost, none logged twice
    assert json.loads((out / "results.json").read_text())["step"] == 24
