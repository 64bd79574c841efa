"""The real server under hostile and heavy clients (#13): refusals arrive as status codes, never as
resets; slow and idle connections are closed; connections are capped. uvicorn on 127.0.0.1 in a
thread with pneumoscan's protocol (:mod:`pneumoscan.web.server`); every run is bounded."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter

import httpx
import pytest

pytestmark = pytest.mark.slow

BIG = b"\xff\xd8\xff" + b"\0" * (21 * 2**20)  # over the default 20 MiB limit


def _post_all(url: str, data: bytes, n: int) -> Counter:
    """``n`` concurrent uploads from one asyncio client; status codes, or the exception's name."""
    async def main():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as c:
            async def one():
                try:
                    r = await c.post(url + "/api/predict", files={"file": ("x.jpg", data, "image/jpeg")})
                    return f"{r.status_code} retry-after={r.headers.get('retry-after')} {r.json()['code']}"
                except httpx.HTTPError as e:
                    return type(e).__name__
            return await asyncio.gather(*[one() for _ in range(n)])
    return Counter(asyncio.run(main()))


def test_early_413_reaches_async_sync_and_curl_clients(live):
    with live() as (url, _):
        assert _post_all(url, BIG, 7) == {"413 retry-after=None upload_too_large": 7}  # was 7 x ReadError
        r = httpx.post(url + "/api/predict", files={"file": ("x.jpg", BIG, "image/jpeg")}, timeout=30)
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-F", "file=@-;filename=x.jpg",
                                  url + "/api/predict"], input=BIG, capture_output=True, timeout=30)
            assert out.stdout == b"413"
        assert httpx.get(url + "/healthz").status_code == 200


def test_busy_503_reaches_every_client_with_retry_after(live):
    with live(workers=1, queue=0) as (url, app):
        gate = threading.Event()
        held = app.state.service.limiter.submit(gate.wait)  # the only worker is busy
        try:
            got = _post_all(url, b"\xff\xd8\xff" + b"\0" * 2**21, 48)  # 2 MiB each: refused before the body is read
        finally:
            gate.set()
            held.result(5)
        assert got == {"503 retry-after=1 busy": 48}  # was 48 x ReadError, no Retry-After


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` while we send ``trickle`` a byte every 0.1 s; None if open."""
    sock.settimeout(0.1)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        try:
            if i < len(trickle):
                sock.send(trickle[i:i + 1])
                i += 1
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:  # reset while sending
            return time.monotonic() - t0
    return None


def test_slow_and_idle_connections_are_closed(live):
    head = b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
    with live(header_timeout_s=1.0, body_timeout_s=1.5) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        idle, headers, body = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
        try:
            assert (_closed_within(idle, 4) or 99) < 2.5  # connected, sent nothing
            assert (_closed_within(headers, 4, head * 10) or 99) < 2.5  # headers at 10 B/s
            body.sendall(head + b"Content-Length: 100000\r\n\r\n")
            assert (_closed_within(body, 5, b"x" * 100) or 99) < 3.5  # body at 10 B/s
        finally:
            for s in (idle, headers, body):
                s.close()
        assert httpx.get(url + "/healthz").status_code == 200


def test_connections_are_capped_with_retry_after(live):
    with live(max_connections=4, header_timeout_s=30) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        hold = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            r = httpx.get(url + "/healthz", timeout=5)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["code"] == "busy_connections"
        finally:
            for s in hold:
                s.close()
        time.sleep(0.3)
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("library", ["aiohttp", "httpx"])
def test_the_load_benchmark_counts_answers_and_classifies_refusals(live, library):
    """benchmarks/load.py's clients: a level runs until its answers are in; refusals are counted by kind;
    a phase that only meets refusals stops after its attempts."""
    import importlib.util
    from pathlib import Path

    from .test_app import jpeg

    spec = importlib.util.spec_from_file_location("load_bench", Path(__file__).parents[2] / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    images = [("x.jpg", jpeg())]
    with live(workers=1, queue=0, queue_wait_ms=0) as (url, app):
        r = asyncio.run(load.clients_phase(url, images, 3, 12, library=library))
        assert r["ok"] >= 12 and r["outcomes"].get("200", 0) == r["ok"] and r["client"] == library
        assert r["requests"] == sum(r["outcomes"].values()) and r["client_cpu_s"] >= 0
        gate = threading.Event()
        held = app.state.service.limiter.submit(gate.wait)  # the only worker is busy: everything is refused
        try:
            r = asyncio.run(load.clients_phase(url, images, 3, 5, library=library, attempts=9))
        finally:
            gate.set()
            held.result(5)
        assert r["ok"] == 0 and r["outcomes"] == {"503+retry-after:busy": 9}
