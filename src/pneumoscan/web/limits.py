"""Bounds of the service: worker pools with bounded queues, request-body limits, Host and security headers.

- request bodies are counted as they arrive (:class:`BodyLimitMiddleware`): over the limit is a
  413 before the body is held in memory, whatever ``Content-Length`` says or if it is absent;
  all bodies together are capped in bytes (:class:`InFlight`) and in time (a 408);
- inference runs on fixed pools of threads with bounded queues (:class:`Limiter`; one for
  predictions, one for explanations): past the queue a request is refused at once with 503 +
  ``Retry-After``; past its deadline it gets 503;
- only the Host names the server is meant to answer to are served (:class:`TrustedHostsMiddleware`);
- client file names are only ever shown (sanitised), never used as paths.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
import unicodedata
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import PneumoscanError
from .problems import send_problem

log = logging.getLogger(__name__)


class BusyError(Exception):
    """The queue is full: the request is refused without waiting."""


class DeadlineError(Exception):
    """The request did not finish within its deadline."""


class Admission:
    """The bound on pending jobs that the :class:`Limiter` and the batcher share: at most ``workers + queue``
    submitted and not finished; one more is refused with :class:`BusyError` at once. Subclasses call
    :meth:`_admit` with ``self._lock`` held and :meth:`_release` when a job finishes.

    The service's event loop may first wait for a free slot (:meth:`room`, HAProxy's ``timeout queue``):
    a request that finds the bound reached is held up to ``--queue-wait-ms`` and goes ahead as soon as a
    job finishes, else it is refused. A refusal therefore costs a client at least that long, so clients
    that retry at once (ignoring ``Retry-After``) cannot turn the service into a loop of refusals."""

    def __init__(self, workers: int, queue: int, name: str) -> None:
        self.name = name  # what the jobs are, for messages ("predictions", "explanations")
        self.workers = workers
        self.capacity = workers + queue
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()  # held by room(), oldest first

    @property
    def pending(self) -> int:
        return self._pending

    def full(self) -> bool:
        return self._pending >= self.capacity

    def _admit(self) -> None:
        if self._pending >= self.capacity:
            raise BusyError(f"{self._pending} requests are already in progress or queued")
        self._pending += 1

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
        self._wake()

    async def room(self, wait_s: float) -> bool:
        """True when a slot is free now or becomes free within ``wait_s`` seconds (the oldest waiter is
        woken first); False when the bound is still reached after that. Event-loop only."""
        if not self.full():
            return True
        if wait_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:
            if self._pending < self.capacity:  # a job finished since full(): no wake-up would come for this waiter
                return True
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], wait_s)
            return True
        except asyncio.TimeoutError:
            return not self.full()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        """Wake the oldest waiter of :meth:`room` if a slot is free (any thread)."""
        with self._lock:
            if not self._waiters or self._pending >= self.capacity:
                return
            loop, fut = self._waiters.popleft()
        try:
            loop.call_soon_threadsafe(self._woken, fut)
        except RuntimeError:  # the server's loop has closed (shutting down): nobody is waiting any more
            pass

    def _woken(self, fut: asyncio.Future) -> None:
        if fut.done():  # its wait timed out just now: the slot goes to the next waiter
            self._wake()
        else:
            fut.set_result(None)


class Limiter(Admission):
    """A fixed pool of worker threads with a bounded number of pending jobs.

    ``submit`` is thread-safe and never blocks: it raises :class:`BusyError` when
    ``workers + queue`` jobs are already pending. A job whose deadline passed while it waited
    is dropped without running.
    """

    def __init__(self, workers: int, queue: int, name: str = "requests") -> None:
        if workers < 1 or queue < 0:
            raise PneumoscanError(f"workers ({workers}) must be >= 1 and queue ({queue}) >= 0")
        super().__init__(workers, queue, name)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"pneumoscan-{name}")

    def submit(self, fn: Callable[..., Any], *args: Any, deadline: float = math.inf) -> Future:
        """Run ``fn(*args)`` on a worker; ``deadline`` is a ``time.monotonic()`` value."""
        with self._lock:
            self._admit()

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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


NAME_CHARS = 80  # longest file name shown in a message (the middle is elided)


def safe_name(name: str | None) -> str:
    """A client file name made safe to show in messages (never used as a path).

    The last path component, NFC-normalised; letters and digits of every script are kept
    (``Röntgen_胸部.dcm`` stays readable), control, format (bidi overrides) and path characters
    become ``_``, and a long name keeps its start and its extension around an ellipsis.
    """
    base = unicodedata.normalize("NFC", re.split(r"[\\/]", name or "")[-1])
    keep = "._ ()+-,#@'"
    base = "".join(c if (c.isalnum() or c in keep or unicodedata.category(c) in ("Mn", "Mc")) else "_"
                   for c in base).strip(" .")
    if len(base) > NAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        ext = dot + ext if dot and len(ext) <= 8 else ""
        base = base[:NAME_CHARS - len(ext) - 1].rstrip(" .") + "\u2026" + ext
    return base or "upload"


class InFlight:
    """Bytes of request bodies held at once, across requests (event-loop only: no lock needed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0

    def reserve(self, n: int) -> bool:
        if n > 0 and self.held + n > self.capacity:
            return False
        self.held += max(0, n)
        return True

    def release(self, n: int) -> None:
        self.held -= n


class _Refused(Exception):
    """Raised from inside ``receive`` when the body is refused part-way; the middleware answers."""

    def __init__(self, status: int, detail: str, code: str, retry_after: int | None = None, close: bool = False):
        super().__init__(detail)
        self.status, self.detail, self.code, self.retry_after, self.close = status, detail, code, retry_after, close


class BodyLimitMiddleware:
    """ASGI middleware bounding every request body: size, bytes in flight, time, and a full queue.

    - a declared ``Content-Length`` over ``max_bytes`` is a 413 before anything is received, and
      the bytes actually received are counted too (a lying or absent length is caught as soon as
      the limit is crossed; whatever the app was doing with the partial body is discarded);
    - all requests together hold at most ``inflight.capacity`` body bytes (declared lengths are
      reserved up front, chunked bodies as they arrive): past that, 503 + ``Retry-After``;
    - an upload path whose :class:`Limiter` is full is held up to ``queue_wait_s`` for a slot
      (:meth:`Admission.room`), then, if still full, a 503 + ``Retry-After`` before the body is read;
    - the whole body must arrive within ``body_timeout_s`` (a body sent at 1 B/s is a 408).

    Refusals sent before the body was read keep the connection open (no ``Connection: close``):
    the server reads and drops the rest of the body, so clients see the status, not a reset.
    """

    def __init__(self, app, max_bytes: int, limiters: dict[str, Admission] | None = None,
                 inflight: InFlight | None = None, body_timeout_s: float = 60.0, queue_wait_s: float = 0.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limiters = limiters or {}
        self.inflight = inflight or InFlight(8 * max_bytes)
        self.body_timeout_s = body_timeout_s
        self.queue_wait_s = queue_wait_s  # how long a request that finds its queue full is held for a slot

    def _limit_msg(self) -> str:
        return f"upload larger than the limit of {self.max_bytes / 2**20:g} MiB; send a smaller image"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        n = 0
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await send_problem(send, 400, "invalid Content-Length header", "bad_request", path, close=True)
                return
            if n > self.max_bytes:
                await send_problem(send, 413, self._limit_msg(), "upload_too_large", path)
                return
        limiter = self.limiters.get(path)
        if limiter is not None and not await limiter.room(self.queue_wait_s):
            await send_problem(send, 503, f"server busy: too many {limiter.name} queued; retry shortly", "busy",
                               path, retry_after=1)
            return
        if not self.inflight.reserve(n):
            await send_problem(send, 503, self._inflight_msg(), "busy_uploads", path, retry_after=2)
            return
        reserved = n
        try:
            reserved = await self._guarded(scope, receive, send, reserved)
        finally:
            self.inflight.release(reserved)

    def _inflight_msg(self) -> str:
        return (f"server busy: {self.inflight.capacity / 2**20:g} MiB of uploads are already being received; "
                "retry shortly")

    async def _guarded(self, scope, receive, send, reserved: int) -> int:
        """Run the app with a counting, timed ``receive``; returns the bytes reserved in the end."""
        deadline = time.monotonic() + self.body_timeout_s
        received = 0
        refused: _Refused | None = None
        started = False

        async def counting_receive():
            nonlocal received, refused, reserved
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                refused = _Refused(408, f"request body not received within {self.body_timeout_s:g} s; "
                                        "check the connection and retry", "body_timeout", close=True)
                raise refused from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    refused = _Refused(413, self._limit_msg(), "upload_too_large")
                    raise refused
                if received > reserved:  # a chunked (or under-declared) body: reserve as it comes
                    if not self.inflight.reserve(received - reserved):
                        refused = _Refused(503, self._inflight_msg(), "busy_uploads", retry_after=2)
                        raise refused
                    reserved = received
            return msg

        async def guarded_send(msg):
            nonlocal started
            if refused is not None:  # the app's reaction to the cut-off body (e.g. a 400) is replaced
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            r = refused
            await send_problem(send, r.status, r.detail, r.code, scope["path"], retry_after=r.retry_after, close=r.close)
        return reserved


def host_name(header: str | None) -> str | None:
    """The host of a Host header, lower case, without port or IPv6 brackets (``[::1]:8000`` -> ``::1``)."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        return value[1:value.index("]")] if "]" in value else None
    return (value.rsplit(":", 1)[0] if value.count(":") == 1 else value) or None


class TrustedHostsMiddleware(TrustedHostMiddleware):
    """Starlette's Host allow-list (DNS-rebinding guard), refusing with problem details.

    Starlette's own middleware answers a plain-text 400; this keeps its pattern rules and their
    validation (exact names, ``*.domain``, ``*``) and answers in the one error schema.
    """

    def __init__(self, app, allowed_hosts: list[str]) -> None:
        super().__init__(app, allowed_hosts=allowed_hosts, www_redirect=False)

    def allows(self, scope) -> bool:
        if self.allow_any:
            return True
        host = host_name(Headers(scope=scope).get("host"))
        return bool(host) and any(host == p.strip("[]") or (p.startswith("*.") and host.endswith(p[1:]))
                                  for p in self.allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allows(scope):
            await self.app(scope, receive, send)
            return
        log.warning("refused Host header %r (allowed: %s)", Headers(scope=scope).get("host"),
                    ", ".join(self.allowed_hosts))
        await send_problem(send, 400, "this server does not answer to that Host name (see --allowed-hosts)",
                           "untrusted_host", scope["path"])


class SecurityHeadersMiddleware:
    """Headers that keep browsers from sniffing types or framing the page; a CSP on the API docs too.

    The docs pages (Swagger UI, ReDoc, served from the package by fastapi-offline) get a policy
    that lets only this server's scripts, styles and images load: ReDoc's bundle links a logo on
    a CDN, which the browser then never requests.
    """

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer")]

    def __init__(self, app, docs_paths: tuple[str, ...] = ("/docs", "/redoc")) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(b"content-security-policy", DOCS_CSP.encode())] if scope["path"] in self.docs_paths else []

        async def add_headers(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *self.HEADERS, *extra]}
            await send(msg)

        await self.app(scope, receive, add_headers)


PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'")  # the docs pages start their bundles with an inline script
