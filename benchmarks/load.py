"""Load benchmark of `pneumoscan serve`: asyncio clients at several concurrencies, then explanations.

It starts the real server (the default queue, pneumoscan's uvicorn protocol) in a subprocess on
a free 127.0.0.1 port, waits for /readyz (and, with --explain, for explanations to be ready), then

  1. single-request latency (one client, sequential): client-side and server-side (elapsed_ms);
  2. for each --clients level: N asyncio clients (aiohttp, or httpx with --client; one connection each) send
     --requests images; every outcome is counted: 200, 503 with and without Retry-After, other
     statuses, connection resets and timeouts (the target: refusals only as 503 + Retry-After);
  3. --big-uploads clients sending one ~19 MiB image each at once (bytes in flight are capped) and
     the RSS 5 s later (it must come back);
  4. with --explain: --explain-clients clients asking for explanations while --clients-during
     clients predict, to show that explanations cannot starve predictions;
  5. the server's RSS (psutil, the process and its children) at ready, after each phase, and the
     peak sampled every 50 ms; and whether torch was ever loaded in the server.

Results go to benchmarks/results/load-<clients>-<requests>.json (or --out) and a table is printed.
Loopback only; request counts and times are bounded.

    python benchmarks/load.py --clients 8,32,64 --requests 1000 --explain
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

try:  # the lighter client (the [test] extra); httpx remains for the first harness's figures
    import aiohttp
except ImportError:  # pragma: no cover
    aiohttp = None

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"
MAX_REQUESTS = 20_000  # hard bound per phase
PHASE_TIMEOUT_S = 600  # hard bound per phase
ATTEMPTS_PER_REQUEST = 50  # a phase gives up after this many attempts per 200 it was to collect
RESETS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ConnectError)

# The server exactly as `pneumoscan serve` builds it: the CLI's options, then pneumoscan.web.server.serve.
LAUNCH = """
import sys
from pneumoscan.cli.flags import build
from pneumoscan.cli.main import build_parser
from pneumoscan.predict import check_model
from pneumoscan.web.config import ServeConfig
from pneumoscan.web.server import serve
import dataclasses
cfg = build(ServeConfig, build_parser().parse_args(["serve", *sys.argv[1:]]))
serve(dataclasses.replace(cfg, model_dir=str(check_model(cfg.model_dir))))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(folder: Path | None, n: int) -> list[tuple[str, bytes]]:
    """Up to ``n`` JPEGs from ``folder`` (the 224-px training images), else synthetic 224-px JPEGs."""
    import io

    from PIL import Image

    files = sorted(folder.rglob("*.jpeg")) if folder and folder.is_dir() else []
    files = files[:: max(1, len(files) // n)][:n]  # spread over the classes
    if files:
        return [(f.name, f.read_bytes()) for f in files]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.normal(128, 40, (224, 224)).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append((f"synthetic-{i}.jpeg", buf.getvalue()))
    return out


def rss_mb(proc: psutil.Process) -> float:
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class PeakRSS:
    """The highest RSS of the server (and children) sampled every 50 ms while running."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.peak, self._stop = proc, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.proc))

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(a, q)) if a else float("nan")


class Reply:
    """What a client got back, whichever HTTP library sent the request."""

    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status_code, self.headers, self.body = status, {k.lower(): v for k, v in headers.items()}, body

    def json(self):
        return json.loads(self.body)


def outcome(r: Reply | None, e: Exception | None) -> str:
    if e is not None:
        if isinstance(e, (httpx.TimeoutException, asyncio.TimeoutError)):
            return "timeout"
        resets = RESETS + ((aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) if aiohttp else ())
        return "reset" if isinstance(e, resets) else type(e).__name__
    if r.status_code == 503:
        try:
            code = r.json()["code"]  # busy, busy_uploads, deadline, ...
        except (ValueError, KeyError):
            code = "?"
        return f"503+retry-after:{code}" if "retry-after" in r.headers else f"503-no-retry-after:{code}"
    return str(r.status_code)


class HttpxClients:
    """httpx.AsyncClient, one connection per client (the first harness: about 4 CPU-ms per request)."""

    def __init__(self, url: str, clients: int) -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=60)

    async def post(self, path: str, name: str, data: bytes) -> Reply:
        r = await self.client.post(path, files={"file": (name, data, "image/jpeg")})
        return Reply(r.status_code, r.headers, r.content)

    async def close(self) -> None:
        await self.client.aclose()


class AiohttpClients:
    """aiohttp.ClientSession, one connection per client: about 0.3 CPU-ms per request against httpx's 4,
    which matters when the clients share the server's cores."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                             timeout=aiohttp.ClientTimeout(total=60))

    async def post(self, path: str, name: str, data: bytes) -> Reply:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=name, content_type="image/jpeg")
        async with self.session.post(self.url + path, data=form) as r:
            return Reply(r.status, r.headers, await r.read())

    async def close(self) -> None:
        await self.session.close()


CLIENTS = {"aiohttp": AiohttpClients, "httpx": HttpxClients}
CLIENT = ["aiohttp"]  # the library every phase uses (--client)


async def clients_phase(url: str, images, clients: int, total: int, path: str = "/api/predict",
                        stop: asyncio.Event | None = None, polite: bool = False, library: str | None = None,
                        attempts: int | None = None) -> dict:
    """``clients`` asyncio clients, each on its own connection, sending requests until ``total`` of them
    were answered 200 (or until ``stop`` is set, or after ``attempts`` attempts, by default
    ``ATTEMPTS_PER_REQUEST * total``);
    latencies of the 200s and a count of every outcome. ``polite`` clients wait the ``Retry-After`` of
    a 503 before their next request; the others retry at once (a fast client then sends many refused
    attempts per served request: counting attempts instead would end the phase early).
    ``library``: the HTTP client ("aiohttp" or "httpx"; default --client); the CPU seconds this process
    spent go in the result (the clients share the server's cores)."""
    library = library or CLIENT[0]
    lat, server_ms, outcomes = [], [], Counter()
    counter = iter(range(attempts or ATTEMPTS_PER_REQUEST * total))
    client = CLIENTS[library](url, clients)
    try:
        async def one_client() -> None:
            for i in counter:
                if (stop is not None and stop.is_set()) or len(lat) >= total:
                    return
                name, data = images[i % len(images)]
                t = time.perf_counter()
                r = e = None
                try:
                    r = await client.post(path, name, data)
                except Exception as exc:  # every failure is an outcome, counted by kind
                    e = exc
                dt = (time.perf_counter() - t) * 1e3
                outcomes[outcome(r, e)] += 1
                if polite and r is not None and r.status_code == 503 and "retry-after" in r.headers:
                    await asyncio.sleep(float(r.headers["retry-after"]))
                if r is not None and r.status_code == 200:
                    lat.append(dt)
                    if path == "/api/predict":
                        server_ms.append(r.json()["elapsed_ms"])
        c0, t0 = sum(os.times()[:2]), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))), PHASE_TIMEOUT_S)
        wall, cpu = time.perf_counter() - t0, sum(os.times()[:2]) - c0
    finally:
        await client.close()
    return {"clients": clients, "path": path, "client": library, "requests": sum(outcomes.values()), "ok": len(lat),
            "outcomes": dict(sorted(outcomes.items())), "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 2), "client_cpu_s": round(cpu, 2),
            "latency_ms": {"p50": round(pct(lat, 50), 1), "p95": round(pct(lat, 95), 1), "p99": round(pct(lat, 99), 1),
                           "max": round(max(lat), 1) if lat else None},
            "server_ms": {"p50": round(pct(server_ms, 50), 2), "p95": round(pct(server_ms, 95), 2)} if server_ms else None}


async def explain_phase(url: str, images, explain_clients: int, predict_clients: int, predictions: int) -> dict:
    """Predictions with and without explanations running at the same time."""
    stop = asyncio.Event()
    alone = await clients_phase(url, images, predict_clients, predictions)
    explaining = asyncio.ensure_future(clients_phase(url, images, explain_clients, MAX_REQUESTS, "/api/explain", stop,
                                                     polite=True))
    await asyncio.sleep(1.0)
    during = await clients_phase(url, images, predict_clients, predictions)
    stop.set()
    return {"predict_alone": alone, "predict_during_explanations": during, "explanations": await explaining}


def big_image(mib: float) -> tuple[str, bytes]:
    """A PNG of about ``mib`` MiB: noise, which does not compress (about 1 MiB per mega-pixel)."""
    import io

    from PIL import Image

    side = int((mib * 2**20) ** 0.5)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side), dtype=np.uint8)).save(buf, "PNG",
                                                                                                 compress_level=1)
    return f"big-{side}px.png", buf.getvalue()


async def big_phase(url: str, n: int, mib: float, proc: psutil.Process) -> dict:
    """``n`` clients each uploading one ~``mib`` MiB image at once; outcomes and RSS before / after."""
    name, data = big_image(mib)
    before = rss_mb(proc)
    res = await clients_phase(url, [(name, data)], n, n, attempts=n)  # one attempt each, all at once
    await asyncio.sleep(5)
    res.update(upload_mib=round(len(data) / 2**20, 1), rss_before=round(before, 1), rss_after_5s=round(rss_mb(proc), 1))
    return res


def wait_ready(url: str, server: subprocess.Popen, explain: bool) -> dict:
    t0 = time.perf_counter()
    out: dict = {}
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            info = httpx.get(url + "/api/info", timeout=2).json()
            if info["ready"] and "ready_s" not in out:
                out["ready_s"] = round(time.perf_counter() - t0, 1)
            if info["ready"] and (not explain or info["explain_status"] in ("ready", "unavailable")):
                out["explain_ready_s"] = round(time.perf_counter() - t0, 1)
                out["explain_status"] = info["explain_status"]
                return out
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > 900:
            raise SystemExit("server not ready after 900 s")
        time.sleep(0.25)


def torch_loaded(pid: int) -> bool:
    """Whether the server process has torch's shared library mapped (it never should on ONNX)."""
    try:
        return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())
    except psutil.Error:
        return False


def bench(args, images) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", LAUNCH, "--host", "127.0.0.1", "--port", str(port), "--backend", args.backend,
           "--no-access-log", "--workers", str(args.workers)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += shlex.split(args.server_args)
    if args.model:
        cmd += ["--model", str(args.model)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc = psutil.Process(server.pid)
        startup = wait_ready(url, server, True)  # the one-time CAM re-export (a child process) done first
        rss = {"ready": round(rss_mb(proc), 1)}
        with PeakRSS(proc) as peak:
            single = asyncio.run(clients_phase(url, images, 1, args.single))
            levels = []
            for n in args.clients:
                levels.append(asyncio.run(clients_phase(url, images, n, args.requests, polite=args.polite)))
                rss[f"after_{n}_clients"] = round(rss_mb(proc), 1)
            big = asyncio.run(big_phase(url, args.big_uploads, args.big_mib, proc)) if args.big_uploads else None
            explained = None
            if args.explain:
                explained = asyncio.run(explain_phase(url, images, args.explain_clients, args.clients_during,
                                                      args.requests_during))
                rss["after_explanations"] = round(rss_mb(proc), 1)
        rss["peak"] = round(peak.peak, 1)
        return {"backend": args.backend, "startup": startup, "single": single, "levels": levels,
                "big_uploads": big, "explain": explained, "rss_mb": rss, "torch_loaded_in_server": torch_loaded(server.pid)}
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--clients", default="8,32,64", help="comma-separated concurrency levels (default 8,32,64)")
    ap.add_argument("--requests", type=int, default=1000, help="answered (200) requests per level (default 1000)")
    ap.add_argument("--polite", action="store_true", help="clients wait a 503's Retry-After (default: retry at once)")
    ap.add_argument("--single", type=int, default=100, help="sequential single-client requests (default 100)")
    ap.add_argument("--explain", action="store_true", help="also the explanation phase (waits for explanations)")
    ap.add_argument("--explain-clients", type=int, default=4, help="clients asking for explanations (default 4)")
    ap.add_argument("--clients-during", type=int, default=4, help="predicting clients in the explain phase (default 4)")
    ap.add_argument("--requests-during", type=int, default=300, help="predictions per explain sub-phase (default 300)")
    ap.add_argument("--big-uploads", type=int, default=40, help="clients uploading one big image at once (0: skip)")
    ap.add_argument("--big-mib", type=float, default=19.0, help="size of that image in MiB (default 19)")
    ap.add_argument("--images", type=Path, default=DATA if DATA.is_dir() else None,
                    help="folder of JPEGs to send (default: the 224-px training images, else synthetic)")
    ap.add_argument("--workers", type=int, default=2, help="server inference threads (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the server's default)")
    ap.add_argument("--server-args", default="", help="more 'pneumoscan serve' options, e.g. '--max-batch 8'")
    ap.add_argument("--client", default="aiohttp", choices=sorted(CLIENTS),
                    help="HTTP client library of the load (default aiohttp; httpx: the first harness, ~15x its CPU per request)")
    ap.add_argument("--tag", default="", help="suffix of the default JSON name (e.g. baseline)")
    ap.add_argument("--out", default=None,
                    help="JSON file, or a folder for the default name (default benchmarks/results/load-....json)")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.client == "aiohttp" and aiohttp is None:
        ap.error("--client aiohttp needs aiohttp (pip install aiohttp, or the [test] extra); or use --client httpx")
    CLIENT[0] = args.client
    bounded = [args.requests, args.single, args.requests_during]
    if not all(1 <= n <= MAX_REQUESTS for n in bounded) or not all(1 <= c <= 128 for c in args.clients):
        ap.error(f"request counts must be 1..{MAX_REQUESTS} and --clients 1..128")
    name = (f"load-{'-'.join(map(str, args.clients))}c-{args.requests}{'-polite' if args.polite else ''}"
            f"{'-' + args.tag if args.tag else ''}.json")
    try:  # where the JSON goes, checked before minutes of load (an older checkout on PYTHONPATH may lack the helper)
        from pneumoscan.bench import result_file
        from pneumoscan.errors import PneumoscanError
        out = result_file(args.out, name) if args.out else REPO / "benchmarks" / "results" / name
    except ImportError:
        out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
    except PneumoscanError as e:
        ap.error(str(e))
    images = load_images(args.images, 64)
    # a SIGTERM (kill, pkill, a CI timeout) ends the run through bench's finally, which stops the server: the
    # default handler ended only this process and left the server it started running, orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    result = bench(args, images)
    try:  # the instruction set, as every other benchmark records it (an older checkout on PYTHONPATH may lack it)
        from pneumoscan.bench import cpu_model
        from pneumoscan.runtime import SHOWN_FLAGS, cpu_flags
        cpu = {"cpu_model": cpu_model(), "cpu_flags": [f for f in SHOWN_FLAGS if f in cpu_flags()]}
    except ImportError:
        cpu = {}
    report = {"machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), **cpu,
                          "platform": platform.platform(), "python": platform.python_version(),
                          "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
              "settings": {"model": str(args.model or "shipped default"), "clients": args.clients,
                           "requests": args.requests, "single": args.single, "workers": args.workers,
                           "threads": args.threads, "server_args": args.server_args, "queue": "the server's default",
                           "explain": args.explain, "pythonpath": os.environ.get("PYTHONPATH"),
                           "clients_wait_retry_after": args.polite, "client": args.client,
                           "images": f"{len(images)} x {'training JPEGs' if args.images else 'synthetic 224-px JPEGs'}"},
              "result": result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'clients':>7} {'rps':>7} {'p50':>8} {'p95':>8} {'p99':>8}  outcomes")
    for lv in result["levels"]:
        lm = lv["latency_ms"]
        print(f"{lv['clients']:>7} {lv['throughput_rps']:>7.1f} {lm['p50']:>8.1f} {lm['p95']:>8.1f} "
              f"{lm['p99']:>8.1f}  {lv['outcomes']}")
    if result["big_uploads"]:
        b = result["big_uploads"]
        print(f"{b['clients']} x {b['upload_mib']} MiB at once: {b['outcomes']}; RSS {b['rss_before']} -> "
              f"{b['rss_after_5s']} MB 5 s later")
    if result["explain"]:
        e = result["explain"]
        print(f"predict p50 alone {e['predict_alone']['latency_ms']['p50']} ms, during explanations "
              f"{e['predict_during_explanations']['latency_ms']['p50']} ms; explanations {e['explanations']['outcomes']}")
    print(f"RSS MB {result['rss_mb']}; torch loaded in the server: {result['torch_loaded_in_server']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
