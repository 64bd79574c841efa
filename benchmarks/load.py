"""Load benchmark of `pneumoscan serve`: N concurrent clients send M images over loopback.

For each backend (ONNX Runtime, PyTorch eager) it starts the real server in a subprocess on a
free 127.0.0.1 port, waits for /readyz, then measures

  1. single-request latency (one client, sequential): client-side and server-side (elapsed_ms);
  2. throughput and p50/p95/p99 latency with --clients concurrent clients sending --requests
     images in total, and the error count (any non-200);
  3. the server's RSS before and after (psutil), i.e. memory growth over the run.

Results go to benchmarks/results/load-<backend>-<clients>c-<requests>.json (or --out) and a table
is printed. Loopback only; request counts are bounded.

    python benchmarks/load.py --model /tmp/model1-copy --clients 8 --requests 5000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"
MAX_REQUESTS = 20_000  # hard bound per phase


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
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(a, q)) if a else float("nan")


async def run_clients(url: str, images: list[tuple[str, bytes]], clients: int, total: int) -> dict:
    lat, server_ms, errors = [], [], {}
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one_client() -> None:
            for i in counter:
                name, data = images[i % len(images)]
                t = time.perf_counter()
                try:
                    r = await client.post("/api/predict", files={"file": (name, data, "image/jpeg")})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = (time.perf_counter() - t) * 1e3
                if code == 200:
                    lat.append(dt)
                    server_ms.append(r.json()["elapsed_ms"])
                else:
                    errors[str(code)] = errors.get(str(code), 0) + 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": total, "ok": len(lat), "errors": sum(errors.values()), "error_codes": errors,
            "wall_s": round(wall, 3), "throughput_rps": round(len(lat) / wall, 2),
            "latency_ms": {"p50": round(pct(lat, 50), 2), "p95": round(pct(lat, 95), 2), "p99": round(pct(lat, 99), 2),
                           "max": round(max(lat), 2) if lat else None},
            "server_ms": {"p50": round(pct(server_ms, 50), 2), "p95": round(pct(server_ms, 95), 2),
                          "p99": round(pct(server_ms, 99), 2)}}


def bench_backend(args, backend: str, images) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pneumoscan", "-q", "serve", "--model", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--backend", backend, "--no-access-log", "--workers", str(args.workers),
           "--threads", str(args.threads), "--queue", str(max(16, args.clients * 2))]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc = psutil.Process(server.pid)
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 600:
                raise SystemExit("server not ready after 600 s")
            time.sleep(0.25)
        startup_s = time.perf_counter() - t0
        rss_ready = rss_mb(proc)
        single = asyncio.run(run_clients(url, images, 1, args.single))
        rss_before = rss_mb(proc)
        concurrent = asyncio.run(run_clients(url, images, args.clients, args.requests))
        rss_after = rss_mb(proc)
        return {"backend": backend, "startup_s": round(startup_s, 2), "single": single, "concurrent": concurrent,
                "rss_mb": {"ready": round(rss_ready, 1), "before": round(rss_before, 1), "after": round(rss_after, 1),
                           "growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2)}}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (export it first: pneumoscan export --model DIR)")
    ap.add_argument("--backends", default="onnx,torch", help="comma-separated: onnx, torch (default both)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--requests", type=int, default=5000, help="requests in the concurrent phase (default 5000)")
    ap.add_argument("--single", type=int, default=200, help="sequential single-client requests (default 200)")
    ap.add_argument("--images", type=Path, default=DATA if DATA.is_dir() else None,
                    help="folder of JPEGs to send (default: the 224-px training images, else synthetic)")
    ap.add_argument("--workers", type=int, default=2, help="server inference threads (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per inference (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/load-....json)")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.single <= MAX_REQUESTS or not 1 <= args.clients <= 64:
        ap.error(f"--requests/--single must be 1..{MAX_REQUESTS}, --clients 1..64")
    images = load_images(args.images, 64)
    results = [bench_backend(args, b.strip(), images) for b in args.backends.split(",")]
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
              "settings": {"model": str(args.model), "clients": args.clients, "requests": args.requests,
                           "single": args.single, "workers": args.workers, "threads": args.threads,
                           "images": f"{len(images)} x {'training JPEGs' if args.images else 'synthetic 224-px JPEGs'}"},
              "results": results}
    out = args.out or REPO / "benchmarks" / "results" / f"load-{args.clients}c-{args.requests}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'backend':<8} {'single p50 (server)':>20} {'rps':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'errors':>7} "
          f"{'RSS MB before->after':>22}")
    for r in results:
        c, s, m = r["concurrent"], r["single"], r["rss_mb"]
        print(f"{r['backend']:<8} {s['latency_ms']['p50']:>9.1f} ({s['server_ms']['p50']:>5.1f} ms) {c['throughput_rps']:>8.1f} "
              f"{c['latency_ms']['p50']:>8.1f} {c['latency_ms']['p95']:>8.1f} {c['latency_ms']['p99']:>8.1f} {c['errors']:>7} "
              f"{m['before']:>10.0f} -> {m['after']:<6.0f} ({m['growth_pct']:+.1f} %)")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
