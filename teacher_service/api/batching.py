"""Dynamic batching of teacher forward passes across concurrent requests.

Requests submit their views; one asyncio task collects them into batches of at most
``max_batch`` views and runs ``run_batch`` in a single worker thread (one forward pass at a
time: the teacher owns the device). A partial batch waits for more views at most
``max_wait_s`` after its oldest view, and only while other requests have *announced* views
they are still decoding (`announce` / `retract`): a lone request at low load does not pay
the wait, and under load views pile up during the forward pass and batch by themselves. The queue is bounded: a submission that would take the number of waiting views
above ``max_queue`` is refused at once with `Overloaded` (HTTP 503 + Retry-After); nothing
ever waits in an unbounded queue. A request whose client went away has its views skipped.

A request's views are admitted all together or not at all, so a request is never half
computed because of overload.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from teacher_service.api.problems import Overloaded, RequestProblem

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchFailedError(RuntimeError):
    """The forward pass of the batch holding this request's views raised."""


@dataclass(slots=True)
class _Pending:
    item: Any
    """What ``run_batch`` receives for this view."""
    future: asyncio.Future
    """Resolved with this view's result (or the batch's error)."""
    enqueued: float = field(default_factory=time.monotonic)
    """Admission time; the batch deadline counts from the oldest view's."""


class DynamicBatcher(Generic[T, R]):
    """Collects items from concurrent callers into batches for one worker thread.

    Args:
        run_batch: ``list[T] -> list[R]`` (same length and order), run in the worker thread.
        max_batch: most items per call of ``run_batch``.
        max_wait_s: longest wait after the oldest waiting item before a partial batch runs.
        max_queue: most items admitted and not yet taken into a batch.
        min_retry_after_s: smallest Retry-After of an overload answer.
        on_batch: called in the event loop after each batch with ``(size, seconds)``.
        on_depth: called in the event loop whenever the number of waiting items changes.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        min_retry_after_s: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                "DynamicBatcher(max_batch=, max_queue=, max_wait_s=) expects positive sizes and a "
                f"non-negative wait. Got {max_batch}, {max_queue}, {max_wait_s}."
            )
        self._run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self._min_retry_after_s = int(min_retry_after_s)
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()  # binds to the loop on first wait (Python >= 3.10)
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_batch_s = 0.0
        self._closed = False
        self._announced = 0

    # lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the collecting task in the running event loop."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="teacher-batcher")

    async def close(self) -> None:
        """Stop collecting; waiting callers get a 503 'not-ready' problem."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(RequestProblem("not-ready", "The endpoint is shutting down."))
        self._notify_depth()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # submission ----------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def retry_after_s(self) -> int:
        """Seconds until the waiting items have probably been served."""
        batches_ahead = len(self._pending) / self.max_batch + 1
        return max(self._min_retry_after_s, math.ceil(batches_ahead * self._last_batch_s))

    def check_capacity(self, num_items: int) -> None:
        """Raise `Overloaded` if ``num_items`` more items would not be admitted now."""
        if self._closed or self._task is None:
            raise RequestProblem("not-ready", "The teacher is not loaded yet (or the endpoint is shutting down).")
        if len(self._pending) + num_items > self.max_queue:
            raise Overloaded(
                f"DynamicBatcher expects at most {self.max_queue} waiting views. Got {len(self._pending)} waiting "
                f"and {num_items} more in this request; retry later.",
                self.retry_after_s(),
            )

    def announce(self, num_items: int) -> None:
        """``num_items`` views are being received or prepared and will be submitted (or retracted) soon."""
        self._announced += num_items

    def retract(self, num_items: int) -> None:
        """Undo `announce` (call it right before `submit`, or when preparing failed)."""
        self._announced -= num_items
        self._wakeup.set()

    def announcement(self, num_items: int = 1) -> "Announcement":
        """`announce` now, as an object whose `Announcement.retract` undoes it exactly once."""
        return Announcement(self, num_items)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Admit all ``items`` (or none: `Overloaded`) and wait for their results, in order."""
        if len(items) == 0:
            return []
        self.check_capacity(len(items))
        loop = asyncio.get_running_loop()
        pendings = [_Pending(item, loop.create_future()) for item in items]
        self._pending.extend(pendings)
        self._notify_depth()
        self._wakeup.set()
        # Cancellation of this coroutine (client gone) cancels the futures; the worker skips them.
        results = await asyncio.gather(*(p.future for p in pendings), return_exceptions=True)
        for result in results:
            if isinstance(result, RequestProblem):
                raise result
            if isinstance(result, BaseException):
                raise BatchFailedError(f"The teacher forward pass failed: {type(result).__name__}: {result}") from result
        return list(results)

    # worker --------------------------------------------------------------------------
    def _notify_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._pending))

    def _drop_cancelled_head(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    def _live_count(self) -> int:
        return sum(1 for p in self._pending if not p.future.done())

    async def _collect(self) -> list[_Pending]:
        while True:
            self._drop_cancelled_head()
            if self._pending:
                break
            self._notify_depth()
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].enqueued + self.max_wait_s
        while self._live_count() < self.max_batch and self._announced > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                break
        batch: list[_Pending] = []
        while self._pending and len(batch) < self.max_batch:
            pending = self._pending.popleft()
            if not pending.future.done():
                batch.append(pending)
        self._notify_depth()
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch expects to return {len(batch)} results. Got {len(results)}.")
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RequestProblem("not-ready", "The endpoint is shutting down."))
                raise
            except Exception as error:  # one failed batch fails its requests, never the server
                logger.exception("teacher forward failed for a batch of %d views", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
            else:
                for pending, result in zip(batch, results):
                    if not pending.future.done():
                        pending.future.set_result(result)
            elapsed = time.perf_counter() - started
            self._last_batch_s = elapsed
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)


class Announcement:
    """Views a request will submit soon (see `DynamicBatcher.announce`); retracted once."""

    def __init__(self, batcher: DynamicBatcher, num_items: int) -> None:
        self._batcher = batcher
        self._count = 0
        self.add(num_items)

    def add(self, num_items: int) -> None:
        self._batcher.announce(num_items)
        self._count += num_items

    def retract(self) -> None:
        if self._count:
            self._batcher.retract(self._count)
            self._count = 0
