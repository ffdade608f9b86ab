"""Ctrl-C and SIGTERM stop `distill precompute`: real subprocesses, signals to the process group.

The job runs with the ``stall-after-commit`` fault (`FAULT_ENV`): every write task holds
after committing its part, so the job cannot end by itself and the signal, sent once a
part is committed, is what ends it.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from label_store import open_store
from label_store.maintenance import verify_store
from process_signals import child_processes, distill_env, running, start_distill, stop_group, wait_until
from teacher_service.pipeline_stages import FAULT_ENV
from precompute_fixtures import _write_dataset, _write_teacher

NUM_VIEWS = 16  # 8 images x {original, flip}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt-data")
    annotations, images = _write_dataset(root)
    return {"annotations": annotations, "images": images, "teacher": _write_teacher(root / "teacher.pt")}


def _args(data, store) -> list[str]:
    return [
        "precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"]),
        "--teacher", str(data["teacher"]), "--store", str(store), "--batch-size", "4", "--views-per-part", "4",
        "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5", "--torch-threads", "1", "--num-cpus", "2", "--no-progress",
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_precompute_keeping_its_committed_parts(data, tmp_path, signum):
    store = tmp_path / "store.zarr"
    stall = tmp_path / "stall"
    stall.mkdir()
    # SIGINT starts out ignored, as in a background job of a non-interactive shell: the job
    # must still stop (Python's default KeyboardInterrupt is not installed then).
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if signum == signal.SIGINT else None
    process = start_distill(_args(data, store), distill_env(**{FAULT_ENV: f"stall-after-commit:{stall}"}),
                            preexec_fn=ignore_sigint)
    parts_dir = store / "manifest" / "parts"
    wait_until(process, lambda: parts_dir.is_dir() and any(parts_dir.glob("[!.]*.parquet")))
    ray_pids = child_processes(process.pid, ("gcs_server", "raylet"))
    assert sorted(ray_pids.values()) == ["gcs_server", "raylet"]
    output, stop_seconds = stop_group(process, signum)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, output[-3000:]
    assert stop_seconds < 30, stop_seconds  # within seconds, with room for a busy machine
    assert f"interrupted by {name}: " in output and "re-run the same command to resume" in output
    assert not [pid for pid in ray_pids if running(pid)], "the job's Ray processes outlived it"

    report = verify_store(str(store))
    assert report.ok and report.parts >= 1
    reader = open_store(str(store))
    committed, parts = set(reader.keys()), set(reader.parts)
    assert 4 <= len(committed) < NUM_VIEWS
    assert f"stored                       {len(committed)} in {report.parts} part(s)" in output
    assert f"left for a later run         {NUM_VIEWS - len(committed)}" in output
    if signum == signal.SIGTERM:
        return

    resumed = subprocess.run([sys.executable, "-m", "distillery.cli", *_args(data, store)], env=distill_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"already committed (skipped)  {len(committed)}" in resumed.stdout
    reader = open_store(str(store))
    assert committed < set(reader.keys()) and len(reader.keys()) == NUM_VIEWS
    assert parts < set(reader.parts)  # the interrupted run's parts stay as they were
    assert verify_store(str(store)).ok
