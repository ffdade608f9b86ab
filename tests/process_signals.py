"""Run a `distill` command in a process group of its own and signal the group, as a terminal's Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def distill_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def start_distill(args: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """``python -m distillery.cli ARGS`` as the leader of a new process group (stdout and stderr merged)."""
    return subprocess.Popen(
        [sys.executable, "-m", "distillery.cli", *args], env=env or distill_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def wait_until(process: subprocess.Popen, condition: Callable[[], bool], timeout_s: float = 300) -> None:
    """Poll ``condition`` until it holds; fail if the process ends or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the command ended ({process.returncode}) first:\n{process.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.1)


def stop_group(process: subprocess.Popen, signum: int, timeout_s: float = 90) -> tuple[str, float]:
    """Send ``signum`` to the process group; its output and the seconds until it ended."""
    sent = time.monotonic()
    os.killpg(process.pid, signum)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return output, time.monotonic() - sent


def frozen_signal(process: subprocess.Popen, condition: Callable[[], bool], signum: int, timeout_s: float = 300) -> str:
    """Wait for ``condition``, freeze the group (SIGSTOP), check it again, queue ``signum``, resume it.

    For commands that could otherwise finish between the check and the signal. Returns the
    group's output once it ended (SIGKILL after 90 s).
    """
    wait_until(process, condition, timeout_s)
    os.killpg(process.pid, signal.SIGSTOP)
    assert process.poll() is None and condition()
    os.killpg(process.pid, signum)
    os.killpg(process.pid, signal.SIGCONT)
    try:
        return process.communicate(timeout=90)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def child_processes(pid: int, names: tuple[str, ...]) -> dict[int, str]:
    """``{pid: name}`` of the processes named in ``names`` whose parent is ``pid`` (from /proc)."""
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
        if ppid == pid and name in names:
            found[int(entry.name)] = name
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
