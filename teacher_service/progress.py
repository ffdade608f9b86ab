"""The precompute job's progress: a tqdm bar and a callback, fed from the `ProgressCounter` actor."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

logger = logging.getLogger("teacher_service.precompute")  # the job's logger, whichever module logs


class ProgressPoller:
    """Polls the `ProgressCounter` actor from a daemon thread and drives a tqdm bar."""

    def __init__(self, counter, total: int, show: bool, on_progress: Callable[[int, int, int], None] | None) -> None:
        from tqdm.auto import tqdm

        self.counter = counter
        self.total = total
        self.on_progress = on_progress
        self.bar = tqdm(total=total, unit="view", desc="precompute", disable=not show, dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="precompute-progress", daemon=True)
        self.seen = 0

    def _poll(self) -> None:
        import ray

        stored, failed, _ = ray.get(self.counter.get.remote(), timeout=10)
        done = stored + failed
        if done > self.seen:
            self.bar.update(done - self.seen)
            self.seen = done
        self.bar.set_postfix(failed=failed, refresh=False)
        if self.on_progress is not None:
            self.on_progress(stored, failed, self.total)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self._poll()
            except Exception as error:  # progress is cosmetic; never let it end the job
                logger.debug("progress poll failed: %s", error)

    def __enter__(self) -> "ProgressPoller":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if exc[0] is None:
            try:
                self._poll()
            except Exception as error:
                logger.debug("final progress poll failed: %s", error)
        self.bar.close()
