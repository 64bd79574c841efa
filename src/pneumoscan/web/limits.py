"""Bounds of the service: a worker pool with a bounded queue, request-body limits, security headers.

- request bodies are counted as they arrive (:class:`BodyLimitMiddleware`): over the limit is a
  413 before the body is held in memory, whatever ``Content-Length`` says or if it is absent;
- inference runs on a fixed pool of threads with a bounded queue (:class:`Limiter`): past the
  queue a request is refused at once with 503 + ``Retry-After``; past its deadline it gets 503;
- client file names are only ever shown (sanitised), never used as paths.
"""
from __future__ import annotations

import math
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from fastapi.responses import JSONResponse

from ..errors import PneumoscanError

API_PATHS = ("/api/predict", "/api/explain")  # the POST endpoints that take an upload


class BusyError(Exception):
    """The queue is full: the request is refused without waiting."""


class DeadlineError(Exception):
    """The request did not finish within its deadline."""


class Limiter:
    """A fixed pool of worker threads with a bounded number of pending jobs.

    ``submit`` is thread-safe and never blocks: it raises :class:`BusyError` when
    ``workers + queue`` jobs are already pending. A job whose deadline passed while it waited
    is dropped without running.
    """

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise PneumoscanError(f"workers ({workers}) must be >= 1 and queue ({queue}) >= 0")
        self.workers = workers
        self.capacity = workers + queue
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pneumoscan-infer")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def full(self) -> bool:
        return self._pending >= self.capacity

    def submit(self, fn: Callable[..., Any], *args: Any, deadline: float = math.inf) -> Future:
        """Run ``fn(*args)`` on a worker; ``deadline`` is a ``time.monotonic()`` value."""
        with self._lock:
            if self._pending >= self.capacity:
                raise BusyError(f"{self._pending} requests are already in progress or queued")
            self._pending += 1

        def job() -> Any:
            if time.monotonic() > deadline:
                raise DeadlineError("deadline passed while queued")
            return fn(*args)

        try:
            fut = self._pool.submit(job)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _f: self._release())  # also runs when cancelled before start
        return fut

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def safe_name(name: str | None) -> str:
    """A client file name made safe to show in messages (never used as a path)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._ ()+-]", "_", base).strip(" .")[:80]
    return base or "upload"


async def _send_json(send: Callable, status: int, detail: str, extra_headers: list | None = None) -> None:
    body = JSONResponse({"detail": detail}).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """ASGI middleware: 413 once a body passes ``max_bytes`` (counted), 503 when the queue is full.

    A declared ``Content-Length`` over the limit is refused before anything is received. The
    bytes actually received are counted too, so a lying or absent length is caught as soon as
    the limit is crossed; whatever the app was doing with the partial body is discarded.
    """

    def __init__(self, app, max_bytes: int, limiter: Limiter | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limiter = limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit_msg = f"upload larger than the limit of {self.max_bytes / 2**20:g} MiB; send a smaller image"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if n > self.max_bytes:
                await _send_json(send, 413, limit_msg)
                return
        if self.limiter is not None and scope["path"] in API_PATHS and self.limiter.full():
            await _send_json(send, 503, "server busy: too many requests queued; retry shortly",
                             [(b"retry-after", b"1")])
            return
        received = 0
        too_large = False
        started = False

        async def counting_receive():
            nonlocal received, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge()
            return msg

        async def guarded_send(msg):
            nonlocal started
            if too_large:  # the app's reaction to the cut-off body (e.g. a 400) is replaced by the 413
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _send_json(send, 413, limit_msg)


class SecurityHeadersMiddleware:
    """Headers that keep browsers from sniffing types or framing the page."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *self.HEADERS]}
            await send(msg)

        await self.app(scope, receive, add_headers)


PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
