"""Wall time of the whole frozen pipeline through the real CLI: data index -> extract -> train ->
evaluate, first with an empty feature cache (cold), then again with the cache filled (cached)."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from . import MemoryPeak, cpu_seconds, shared_data_dir, write_result

log = logging.getLogger(__name__)


def _subset(root: Path, limit: int, dest: Path) -> Path:
    """A folder of symbolic links to every k-th image under ``root`` (the class mix is kept)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    for i in np.linspace(0, len(files) - 1, min(limit, len(files))).astype(int):
        link = dest / files[i].relative_to(root.parent)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(files[i])
    return dest / root.name


def _stages(data: Path, cache: Path, work: Path, extra: list[str], train_args: list[str]) -> dict:
    """Run the four CLI commands in this process, timing each (seconds)."""
    from ..cli import main

    manifest, model, report = work / "manifest.csv", work / "model", work / "report"
    steps = {
        "index": ["data", "index", str(data), "--out", str(manifest)],
        "extract": ["extract", str(manifest), "--cache", str(cache), *extra],
        "train": ["train", str(manifest), "--out", str(model), "--cache", str(cache), *extra, *train_args],
        "evaluate": ["evaluate", "--data", str(data), "--model", str(model), "--out", str(report), "--cache", str(cache)],
    }
    out = {}
    for name, argv in steps.items():
        t = time.perf_counter()
        rc = main(["-q", *argv])
        out[name] = round(time.perf_counter() - t, 1)
        if rc != 0:
            raise RuntimeError(f"pneumoscan {' '.join(argv)} exited {rc}")
    out["total"] = round(sum(out.values()), 1)
    return out


def run(data: str | None = None, limit: int | None = None, runs: tuple[str, ...] = ("cold", "cached"),
        extra: list[str] | None = None, train_args: list[str] | None = None, out_dir=None) -> tuple[str, Path]:
    """Run the pipeline benchmark; returns (one-line summary, JSON path)."""
    from ..errors import PneumoscanError

    root = Path(data) if data else shared_data_dir()
    if root is None or not root.is_dir():
        raise PneumoscanError("pipeline benchmark needs the data: pass --data DIR (e.g. ../shared/data/chest_xray/train)")
    os.environ["PNEUMOSCAN_PROGRESS"] = "0"
    res: dict = {"data": str(root), "limit": limit, "extra_args": extra or []}
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-pipe-") as tmp:
        tmp = Path(tmp)
        if limit:
            root = _subset(root, limit, tmp / "subset")
        res["images"] = sum(1 for p in root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        cache = tmp / "cache"  # fresh: the first run is cache-cold
        mem = MemoryPeak(every=0.5).__enter__()
        for kind in runs:
            work = tmp / kind
            work.mkdir()
            c0 = cpu_seconds()
            res[kind] = _stages(root, cache, work, extra or [], train_args or [])
            res[kind]["cpu_s"] = round(cpu_seconds() - c0, 1)
            log.info("pipeline %s: %s", kind, res[kind])
        mem.__exit__(None, None, None)
    res["peak_rss_mb"] = mem.mb
    path = write_result("pipeline", res, out_dir)
    parts = [f"{k} {res[k]['total']} s (" + ", ".join(f"{s} {res[k][s]}" for s in ("index", "extract", "train", "evaluate"))
             + ")" for k in runs]
    return f"pipeline {res['images']} images: " + "; ".join(parts) + f"; peak {res['peak_rss_mb']:.0f} MB", path
