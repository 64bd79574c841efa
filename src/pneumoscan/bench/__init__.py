"""Benchmarks of the pipeline's speed: ``pneumoscan bench extract|latency|pipeline|gpu|all``.

Each sub-benchmark writes one JSON file (machine, CPU model, cores, library versions, threads
and its figures) under ``benchmarks/results/`` and returns a one-line summary for the CLI.
Timings are medians of repeats where repeats are cheap; CPU seconds per image are recorded
next to wall time because they stay meaningful on a machine shared with other work.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..io import file_digest

log = logging.getLogger(__name__)

BENCHES = ("extract", "latency", "pipeline", "gpu")


def default_results_dir() -> Path:
    """``benchmarks/results`` of the source checkout when there is one, else of the current folder."""
    repo = Path(__file__).resolve().parents[3]
    if (repo / "benchmarks").is_dir() and (repo / "pyproject.toml").is_file():
        return repo / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Where the figures were measured: CPU, cores, load, memory and library versions."""
    import torch

    from ..runtime import SHOWN_FLAGS, cpu_count, cpu_flags, int8_ready

    flags = cpu_flags()
    info = {"host": platform.node(), "platform": platform.platform(), "cpu_model": cpu_model(),
            "cpu_flags": [f for f in SHOWN_FLAGS if f in flags], "int8_instructions": int8_ready(flags),
            "cores": cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        pass
    versions = {}
    for mod in ("torch", "timm", "onnxruntime", "numpy", "PIL", "cv2"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("openvino", "nncf"):  # not imported: only their versions
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, figures: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` atomically with the machine description; returns the path."""
    from ..io import atomic_write_json

    out = Path(out_dir) if out_dir else default_results_dir()
    doc = {"benchmark": name, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "pneumoscan bench " + " ".join(sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv[1:]
                                                     else sys.argv[1:]),
           "machine": machine_info(), **figures}
    path = out / f"{name}.json"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return path


def result_file(out: str | os.PathLike | None, default_name: str) -> Path:
    """Where a benchmark script writes its JSON: ``out`` as a file, or ``default_name`` inside ``out`` when it is a
    folder (an existing one, or one given with a trailing slash), or inside the results folder when ``out`` is
    None. Checked before any timing starts (:func:`pneumoscan.io.check_writable`): a path that cannot be
    written is a :class:`~pneumoscan.errors.PneumoscanError`, not a traceback after minutes of work."""
    from ..io import check_writable

    if out is None:
        return check_writable(default_results_dir() / default_name, "file")
    path = Path(out)
    if path.is_dir() or str(out).endswith(os.sep):
        path = path / default_name
    return check_writable(path, "file")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (decoding workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _hwm_bytes() -> int:
    """This process's own peak resident memory (VmHWM; ru_maxrss would inherit the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryPeak:
    """Peak memory of this process plus its children (decoding workers), sampled every ``every`` s.

    Children count with their unique memory (USS): the pages they share with the parent after
    fork are counted once, in the parent. Use as a context manager; ``mb`` is the peak.
    """

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, None

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for c in me.children(recursive=True):
            try:
                total += c.memory_full_info().uss
            except (psutil.Error, OSError):
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> "MemoryPeak":
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample(), _hwm_bytes())

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def percentiles(ms: Sequence[float]) -> dict:
    a = np.asarray(ms, float)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2), "n": int(a.size)}


def time_calls(fn: Callable[[], object], iters: int, warmup: int = 5) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def gemm_gflops(seconds: float = 3.0, n: int = 2048, threads: int | None = None) -> float:
    """Sustained fp32 matrix-multiply rate (GFLOP/s) with ``threads`` torch threads: the compute bound."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up
        rates = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(rates) < 3:
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        return round(float(np.median(rates)), 1)
    finally:
        torch.set_num_threads(old)


def count_flops(net, size: int) -> int:
    """Forward FLOPs of one ``size x size`` image, counted by torch's FlopCounterMode (2 per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net.eval()(x)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Sample:
    """What :func:`pneumoscan.features.extract.extract_features` needs from a manifest row."""

    path: str
    sha1: str


def file_sha1(path: str | os.PathLike) -> str:
    return file_digest(path, "sha1")


def make_images(folder: str | os.PathLike, n: int, px: int = 224, rgb: bool = True, seed: int = 0,
                quality: int = 90) -> list[Sample]:
    """``n`` synthetic X-ray-like JPEGs (smooth shapes plus noise, distinct bytes) of ``px`` a side."""
    import cv2
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    lung = lambda cx: np.exp(-((xx - cx) ** 2 + (yy - 0.5) ** 2) / 0.05)  # noqa: E731
    base = 90 + 80 * lung(0.3) + 80 * lung(0.7)
    out = []
    for i in range(n):
        noise = cv2.GaussianBlur(rng.normal(0, 25, (px, px)).astype(np.float32), (0, 0), max(1.0, px / 300))
        a = np.clip(base * rng.uniform(0.8, 1.2) + noise, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L")
        if rgb:  # the bundled data is RGB JPEG with gray content
            im = im.convert("RGB")
        p = folder / f"img{i:05d}.jpeg"
        im.save(p, quality=quality)
        out.append(Sample(str(p), file_sha1(p)))
    return out


def dataset_samples(root: str | os.PathLike, limit: int | None = None) -> list[Sample]:
    """JPEG/PNG files under ``root`` (sorted, every k-th to keep the class mix when limited)."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if limit and limit < len(files):
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, limit)]
    return [Sample(str(p), file_sha1(p)) for p in files]


def shared_data_dir() -> Path | None:
    """The real training split beside the checkout (``../shared/data/chest_xray/train``), if present."""
    env = os.environ.get("PNEUMOSCAN_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data" / "chest_xray"
    return root / "train" if (root / "train").is_dir() else None
