"""Ctrl-C and SIGTERM stop `distill precompute`: real subprocesses, signals to the process group.

The job runs with the ``stall-after-commit`` fault (`FAULT_ENV`): every write task holds
after committing its part, so the job cannot end by itself and the signal, sent once a
part is committed, is what ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from label_store import open_store
from label_store.maintenance import verify_store
from teacher_service.pipeline_stages import FAULT_ENV
from test_precompute import _write_dataset, _write_teacher

REPO = Path(__file__).resolve().parents[2]
NUM_VIEWS = 16  # 8 images x {original, flip}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt-data")
    annotations, images = _write_dataset(root)
    return {"annotations": annotations, "images": images, "teacher": _write_teacher(root / "teacher.pt")}


def _command(data, store: Path) -> list[str]:
    return [
        sys.executable, "-m", "distillery.cli", "precompute", "--annotations", str(data["annotations"]),
        "--images", str(data["images"]), "--teacher", str(data["teacher"]), "--store", str(store),
        "--batch-size", "4", "--views-per-part", "4", "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5",
        "--torch-threads", "1", "--num-cpus", "2", "--no-progress",
    ]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def ray_children(pid: int) -> dict[int, str]:
    """``{pid: name}`` of the GCS and raylet processes whose parent is ``pid`` (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid and name in ("gcs_server", "raylet"):
            found[int(entry.name)] = name
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_for_a_commit(process: subprocess.Popen, store: Path, deadline_s: float = 300) -> None:
    parts = store / "manifest" / "parts"
    deadline = time.monotonic() + deadline_s
    while not (parts.is_dir() and any(parts.glob("*.parquet"))):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_precompute_keeping_its_committed_parts(data, tmp_path, signum):
    store = tmp_path / "store.zarr"
    stall = tmp_path / "stall"
    stall.mkdir()
    # SIGINT starts out ignored, as in a background job of a non-interactive shell: the job
    # must still stop (Python's default KeyboardInterrupt is not installed then).
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if signum == signal.SIGINT else None
    process = subprocess.Popen(
        _command(data, store), env=_env(**{FAULT_ENV: f"stall-after-commit:{stall}"}), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ignore_sigint,
    )
    try:
        _wait_for_a_commit(process, store)
        ray_pids = ray_children(process.pid)
        assert sorted(ray_pids.values()) == ["gcs_server", "raylet"]
        sent = time.monotonic()
        os.killpg(process.pid, signum)
        output, _ = process.communicate(timeout=90)
        stop_seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, output[-3000:]
    assert stop_seconds < 60, stop_seconds
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

    resumed = subprocess.run(_command(data, store), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"already committed (skipped)  {len(committed)}" in resumed.stdout
    reader = open_store(str(store))
    assert committed < set(reader.keys()) and len(reader.keys()) == NUM_VIEWS
    assert parts < set(reader.parts)  # the interrupted run's parts stay as they were
    assert verify_store(str(store)).ok
