"""Dynamic batching of predictions: requests that arrive within a few milliseconds run as one forward pass.

This is the scheme of Triton's dynamic batcher (``max_batch_size``, ``max_queue_delay_microseconds``)
and TorchServe's (``batch_size``, ``max_batch_delay``), in one process:

- a request is *prepared* (decoded, checked, preprocessed) on one of ``workers`` threads, so that a bad
  image fails alone, before it ever joins a batch;
- each of ``runners`` inference threads takes every prepared request waiting (up to ``max_batch``),
  and while requests are still being prepared and the batch is not full it waits up to
  ``max_wait_ms`` for them; then it runs the batch. On a CPU a 224-px CNN is compute-bound already
  at batch 1, so batching buys less than on a GPU (one ``run`` per batch instead of per image);
  what matters more is one runner per core with one intra-op thread each, the layout the
  measurements favoured (README, "Speed and benchmarks");
- each request gets its own result from its own row (its gate, warnings and errors), and a failure
  while making one request's result fails only that request.

:class:`Batcher` keeps :class:`~pneumoscan.web.limits.Limiter`'s contract (``submit`` raises
:class:`BusyError` past ``workers + queue`` pending requests, a request whose deadline passed while
it waited is dropped with :class:`DeadlineError`, ``full()`` for the body middleware), so the
service's queue, deadline and 503 + ``Retry-After`` semantics are unchanged.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import PneumoscanError
from .limits import Admission, BusyError, DeadlineError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A prepared request: its normalised input (3 x S x S) and how to turn its row of the batch into a result."""

    x: np.ndarray
    finish: Callable[[np.ndarray, np.ndarray | None], Any]  # (probabilities, features or None) -> the result


class Batcher(Admission):
    """Prepare on ``workers`` threads, run prepared requests in batches of up to ``max_batch`` on ``runners`` threads.

    ``forward(batch) -> (probabilities, features or None)`` runs a stacked batch (N x 3 x S x S).
    """

    def __init__(self, forward: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]], workers: int,
                 queue: int, max_batch: int, max_wait_ms: float, name: str = "predictions", runners: int = 1) -> None:
        if workers < 1 or queue < 0 or max_batch < 1 or max_wait_ms < 0 or runners < 1:
            raise PneumoscanError(f"workers ({workers}) and max batch ({max_batch}) must be >= 1, queue ({queue}) "
                                  f"and max wait ({max_wait_ms} ms) >= 0")
        super().__init__(workers, queue, name)
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batches run, by size
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"pneumoscan-prepare-{name}")
        self._ready = threading.Condition(self._lock)
        self._waiting: collections.deque[tuple[Job, Future, float]] = collections.deque()  # prepared, not run
        self._preparing = 0  # being prepared now: worth waiting for
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"pneumoscan-batch-{name}-{i}", daemon=True)
                         for i in range(runners)]
        for t in self._threads:
            t.start()

    def submit(self, prepare: Callable[..., Job], *args: Any, deadline: float = math.inf) -> Future:
        """Prepare ``prepare(*args)`` on a worker; a :class:`Job` then runs in the next batch and the future
        holds its result (anything else is the result at once). ``deadline`` is a ``time.monotonic()`` value."""
        with self._lock:
            if self._closed:
                raise BusyError("the service is shutting down")
            self._admit()
            self._preparing += 1  # from now on it is worth waiting for (queued for a worker, or decoding)
        fut: Future = Future()
        fut.add_done_callback(lambda _f: self._release())
        try:
            self._pool.submit(self._prepare, fut, prepare, args, deadline)
        except BaseException as e:  # the pool is shut down
            self._prepared()
            fut.set_exception(BusyError(f"the service is shutting down ({e})"))
        return fut

    def _prepared(self) -> None:
        with self._ready:
            self._preparing -= 1
            self._ready.notify()

    def _prepare(self, fut: Future, prepare: Callable[..., Job], args: tuple, deadline: float) -> None:
        if not fut.set_running_or_notify_cancel():
            self._prepared()
            return
        if time.monotonic() > deadline:
            self._prepared()
            fut.set_exception(DeadlineError("deadline passed while queued"))
            return
        try:
            job = prepare(*args)
        except BaseException as e:  # the upload's own error (or a bug): this request only
            self._prepared()
            fut.set_exception(e)
            return
        with self._ready:
            self._preparing -= 1
            if isinstance(job, Job):
                self._waiting.append((job, fut, deadline))
            self._ready.notify()
        if not isinstance(job, Job):  # nothing to run on the model: the prepared value is the result
            fut.set_result(job)

    def _next_batch(self) -> list[tuple[Job, Future, float]] | None:
        """Block for the first prepared job; then take what waits, waiting up to ``max_wait`` for jobs still
        being prepared while the batch is not full. None when closed."""
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            until = time.monotonic() + self.max_wait_s
            while len(self._waiting) < self.max_batch and self._preparing > 0:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            return [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for job, fut, deadline in batch:
                if now > deadline:
                    fut.set_exception(DeadlineError("deadline passed while queued"))
                else:
                    live.append((job, fut))
            if live:
                self._run(live)

    def _run(self, live: list[tuple[Job, Future]]) -> None:
        with self._lock:
            self.batch_sizes[len(live)] += 1
        try:
            probs, feats = self.forward(np.stack([job.x for job, _ in live]))
        except BaseException as e:  # the model itself failed: every request of the batch gets the error
            log.error("a batch of %d %s failed: %s", len(live), self.name, e)
            for _, fut in live:
                fut.set_exception(e)
            return
        for i, (job, fut) in enumerate(live):
            try:
                fut.set_result(job.finish(probs[i], None if feats is None else feats[i]))
            except BaseException as e:
                fut.set_exception(e)

    def shutdown(self) -> None:
        """Stop taking requests; jobs not yet run are refused as busy."""
        with self._ready:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._ready.notify_all()
        for _, fut, _ in left:
            fut.set_exception(BusyError("the service is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)
