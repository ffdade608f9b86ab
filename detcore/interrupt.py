"""Ctrl-C and SIGTERM as a request to stop: the one handler of every long-running command.

SIGINT (Ctrl-C: the terminal sends it to its whole foreground process group) and SIGTERM
(`docker stop`, a scheduler's preemption) become a recorded `StopRequest`. The command
stops at its next safe point with its work resumable (committed store parts, ``last.pt``)
and exits ``128 + signal``: 130 for SIGINT, 143 for SIGTERM (`Interrupted.exit_code`).

The handlers are installed explicitly rather than relying on Python's default: a process
started in the background of a non-interactive shell inherits SIGINT *ignored*, and Ray
replaces the driver's SIGTERM handler in ``ray.init``; so a command enters `StopRequest`
after starting Ray.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals a `StopRequest` turns into a stop."""


def exit_code_for(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 130 (SIGINT), 143 (SIGTERM)."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """A command stopped for a signal; `distillery.cli.main` exits with `exit_code`.

    Args:
        signum: the signal that stopped the command.
        message: what was kept and how to resume (printed after ``interrupted by SIGINT:``).
    """

    def __init__(self, signum: int, message: str = "re-run the same command to resume") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.message = message

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum)

    def report(self) -> int:
        """Print what was kept (stderr) and return the exit code: the end of every stopped command."""
        print(f"interrupted by {self.signal_name}: {self.message}", file=sys.stderr)
        return self.exit_code


class StopRequest:
    """Context manager: while active, SIGINT and SIGTERM request a stop; the previous handlers come back on exit.

    Args:
        raise_at_once: raise `Interrupted` from the handler at the first signal, for a
            command blocked in a call that cleans up after a KeyboardInterrupt itself (a Ray
            Data job); otherwise the first signal only sets `signum` and the command checks
            `requested` between steps. A second signal always raises (a forced stop).

    Outside the main thread (a Ray Train worker) it installs nothing: signals reach only
    the main thread, whose owner handles them.
    """

    def __init__(self, *, raise_at_once: bool = False) -> None:
        self.raise_at_once = raise_at_once
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def raise_if_requested(self, message: str = "re-run the same command to resume") -> None:
        if self.signum is not None:
            raise Interrupted(self.signum, message)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.raise_at_once or not first:
            raise Interrupted(signum)

    def install(self) -> "StopRequest":
        """Take over SIGINT and SIGTERM (main thread only); `restore` gives them back."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def ignore_stop_signals(*_: Any) -> None:
    """For worker processes of a command (DataLoader ``worker_init_fn``): leave SIGINT and
    SIGTERM to the main process, which stops them with itself; a worker killed by the
    signal would otherwise fail the main process's next batch."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)




@contextmanager
def stop_signals_blocked_for_children() -> Iterator[None]:
    """Processes started inside (a local Ray cluster's GCS and raylet) begin with SIGINT and
    SIGTERM blocked: a signal sent to the terminal's process group then reaches the command,
    which shuts them down itself, rather than killing them under the running job (Ray exits
    the driver at once when its raylet dies). Ray blocks SIGINT for them already."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


__all__ = [
    "Interrupted", "STOP_SIGNALS", "StopRequest", "exit_code_for", "ignore_stop_signals",
    "stop_signals_blocked_for_children",
]
