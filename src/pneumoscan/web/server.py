"""The HTTP server: uvicorn, plus the connection bounds it does not have on its own.

Why this is written here rather than configured: uvicorn (0.54) has no header-read timeout (its
keep-alive timer starts only after a response and any byte cancels it, so a client trickling
headers at 1 B/s, or connecting and sending nothing, holds a connection for ever), and its
``limit_concurrency`` answers 503 without ``Retry-After`` and closes with the request body unread,
which clients see as a connection reset. :class:`BoundedH11Protocol` is uvicorn's own h11
protocol with three additions:

- a **header deadline**: from the moment a connection waits for a request (opened, or its last
  response sent) the next request's headers must be complete within ``header_timeout_s``; this
  also bounds an idle connection and the time spent dropping the unread rest of a refused body;
- a **cap on connections**: past ``max_connections`` a connection gets 503 + ``Retry-After``
  (after its body is read, a bounded amount, so that the client sees the status) and is closed;
- a **cap on dropped bytes**: the rest of a refused body is read and dropped (that is what keeps
  early 413/503 refusals from turning into resets) up to ``linger_bytes``, then the connection closes.

Body time, body size and bytes held across requests are bounded in the app
(:class:`pneumoscan.web.limits.BodyLimitMiddleware`), so they hold under any ASGI server.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServeConfig
from .problems import send_problem

log = logging.getLogger(__name__)

LINGER_BYTES = 64 * 2**20  # most bytes of a refused body read and dropped before the connection closes


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection cap and bounded lingering.

    The bounds are class attributes; :func:`protocol_class` makes a subclass for one config.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 128
    linger_bytes: int = LINGER_BYTES

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._dropped = 0
        if len(self.connections) > self.max_connections:
            log.warning("%d connections open (limit %d): answering 503", len(self.connections), self.max_connections)
            self.app = self._over_capacity
        self._sync()

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._dropping():  # the rest of a body whose request was already answered
            self._dropped += len(data)
            if self._dropped > self.linger_bytes:
                log.info("closing a connection after dropping %d bytes of a refused body", self._dropped)
                self._close()
                return
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._dropped = 0
        self._sync()

    # -- the header deadline ----------------------------------------------------------------------

    def _busy(self) -> bool:
        """A request's headers are in and its response is not finished: the app has it."""
        return self.cycle is not None and not self.cycle.response_complete

    def _dropping(self) -> bool:
        return self.cycle is not None and self.cycle.response_complete and self.conn.their_state is h11.SEND_BODY

    def _sync(self) -> None:
        """Arm the deadline while waiting for a request's headers; disarm while the app has one."""
        if self.transport.is_closing() or self._busy():
            self._cancel()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self._busy() and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request within %g s", self.client, self.header_timeout_s)
            self._close()

    def _close(self) -> None:
        self._cancel()
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # mid-request: nothing more to say
            pass
        self.transport.close()

    # -- over the connection cap ------------------------------------------------------------------

    async def _over_capacity(self, scope, receive, send) -> None:
        """503 + Retry-After once the (bounded) body is read, then close: the client sees the status."""
        deadline = time.monotonic() + self.header_timeout_s
        received, more = 0, True
        try:
            while more and received <= self.linger_bytes:
                msg = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
                if msg["type"] == "http.disconnect":
                    return
                received += len(msg.get("body", b""))
                more = msg.get("more_body", False)
        except asyncio.TimeoutError:
            pass
        await send_problem(send, 503, "server busy: too many open connections; retry shortly", "busy_connections",
                           scope.get("path"), retry_after=1, close=True)


def protocol_class(cfg: ServeConfig) -> type[BoundedH11Protocol]:
    """:class:`BoundedH11Protocol` with ``cfg``'s bounds."""
    return type("ServeProtocol", (BoundedH11Protocol,), {
        "header_timeout_s": cfg.header_timeout_s, "max_connections": cfg.max_connections})


def uvicorn_config(app, cfg: ServeConfig, **overrides) -> uvicorn.Config:
    """The uvicorn settings of ``pneumoscan serve`` (one process; the bounds of :func:`protocol_class`)."""
    opts = dict(host=cfg.host, port=cfg.port, http=protocol_class(cfg), lifespan="on", log_level="info",
                access_log=cfg.access_log, server_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=5)
    return uvicorn.Config(app, **{**opts, **overrides})


def address(cfg: ServeConfig) -> str:
    """``host:port``, the host in brackets when it is an IPv6 address (as in a URL)."""
    return f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"


def bind(cfg: ServeConfig) -> socket.socket:
    """The listening socket for ``cfg.host``:``cfg.port``, bound before anything else starts (uvicorn's own
    binding, ``uvicorn.Config.bind_socket``, comes after the model has begun loading and ends in a log line and
    exit code 3): a port in use, an address this machine does not have or a privileged port is one line."""
    from ..errors import PneumoscanError

    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET  # uvicorn's rule
    where = address(cfg)
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except (socket.gaierror, UnicodeError) as e:  # a host name that does not resolve
        sock.close()
        raise PneumoscanError(f"cannot listen on {where}: --host {cfg.host!r} is not an address or a name this "
                              f"machine resolves ({e}); use 127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: f"port {cfg.port} is in use by another program; stop it or choose another --port",
               errno.EADDRNOTAVAIL: f"{cfg.host} is not an address of this machine; use --host 127.0.0.1 (this "
                                    "machine only) or 0.0.0.0 (every interface)",
               errno.EACCES: f"port {cfg.port} needs administrator rights; choose a --port above 1023, e.g. 8000"}
        raise PneumoscanError(f"cannot listen on {where}: " + why.get(
            e.errno, f"{e.strerror or e}; check --host and --port")) from None
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, sock: socket.socket | None = None) -> None:
    """Run the service on ``sock`` (default: :func:`bind`) until interrupted (what ``pneumoscan serve`` does
    after checking the model and binding)."""
    from .app import create_app

    sock = sock if sock is not None else bind(cfg)
    uvicorn.Server(uvicorn_config(create_app(cfg), cfg)).run(sockets=[sock])
