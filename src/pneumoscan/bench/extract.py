"""Extraction throughput: decode + preprocess + frozen-backbone forward, end to end, in images/s.

Every variant (engine x decoding workers) runs in a fresh Python process, so that thread pools,
peak memory and caches of one variant never leak into the next. The machine's sustained fp32
GEMM rate (same thread count) and the backbone's FLOPs (counted by torch) turn images/s into the
share of the compute bound that the pipeline reaches.
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import (
    MemoryPeak,
    Sample,
    count_flops,
    cpu_seconds,
    dataset_samples,
    gemm_gflops,
    make_images,
    shared_data_dir,
    time_calls,
    write_result,
)

log = logging.getLogger(__name__)

COMPARE = (("torch", 0), ("torch", 2), ("onnx", 0), ("onnx", 1), ("onnx", 2))  # (engine, workers) of --compare


BARE_BATCHES = 24  # timed batches of the bare-forward baseline


def bare_forward(path: Path, size: int, batch_size: int) -> float:
    """Images/s of ONNX Runtime's bare forward of ``path`` (the graph the extraction ran) on a ready
    float batch: no decoding, no preprocessing, no cache; from the median batch time."""
    import numpy as np

    from ..features.engines import OnnxEngine

    eng = OnnxEngine(path)
    x = np.random.default_rng(0).normal(size=(batch_size, 3, size, size)).astype(np.float32)
    ms = time_calls(lambda: eng.session.run(None, {eng.input: x}), BARE_BATCHES, warmup=1)
    return batch_size / (statistics.median(ms) / 1e3)


def run_variant(spec: dict) -> dict:
    """One timed extraction into a fresh cache (runs inside its own process)."""
    import torch

    from ..features.cache import FeatureCache
    from ..features.engines import ONNX_MIN_IMAGES, export_backbone_onnx
    from ..features.extract import extract_features
    from ..nets.backbones import create_backbone, default_preprocess

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    samples = [Sample(*s) for s in json.loads(Path(spec["samples"]).read_text())]
    backbone, size, engine = spec["backbone"], spec["size"], spec["engine"]
    net, wid = create_backbone(backbone, pretrained=spec["pretrained"])
    prep = default_preprocess(backbone, size)
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as cache_dir:
        export_s, graph = None, None
        if engine == "onnx" or (engine == "auto" and len(samples) >= ONNX_MIN_IMAGES):
            t = time.perf_counter()  # one-off cost, paid once per backbone and cache folder
            graph = export_backbone_onnx(net, prep.size, FeatureCache.for_key(cache_dir, backbone, wid, prep).root)
            export_s = round(time.perf_counter() - t, 2)
        c0, t0 = cpu_seconds(), time.perf_counter()
        with MemoryPeak() as mem:
            feats, ok, info = extract_features(samples, backbone, size=size, cache_dir=cache_dir, net=net,
                                               weights_id=wid, engine=engine, workers=spec["workers"],
                                               batch_size=spec["batch_size"], progress=False)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        # the baseline of the same run: the same graph's bare forward, in this process, right after
        bare = bare_forward(graph, prep.size, spec["batch_size"]) if graph is not None and info["engine"] == "onnx" else None
    n = int(ok.sum())
    return {"backbone": backbone, "size": prep.size, "engine": info["engine"], "workers": info.get("workers"),
            "batch_size": spec["batch_size"], "images": n, "failed": len(info["failed"]),
            "seconds": round(wall, 2), "images_per_s": round(n / wall, 1),
            "cpu_ms_per_image": round(1e3 * cpu / max(n, 1), 1), "peak_rss_mb": mem.mb,
            "export_s": export_s, "feature_dim": int(feats.shape[1]),
            "bare_forward_images_per_s": None if bare is None else round(bare, 1),
            "vs_bare_forward": None if bare is None else round(n / wall / bare, 3)}


def _spawn(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "pneumoscan.bench.extract", json.dumps(spec)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"extract variant {spec['engine']}/{spec['workers']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_figures(samples: list[Sample], size: int, big_px: int = 2000, n_big: int = 12) -> dict:
    """CPU ms per image for decode + resize: the bench images, and large JPEGs with/without draft."""
    from ..data.imaging import load_xray
    from ..preprocess import Preprocess, PreprocessConfig

    pp = Preprocess(PreprocessConfig(size=size))

    def per_image(paths, hint) -> float:
        pp.resize(load_xray(paths[0], size_hint=hint).pixels)  # warm-up
        t = time.process_time()
        for p in paths:
            pp.resize(load_xray(p, size_hint=hint).pixels)
        return round(1e3 * (time.process_time() - t) / len(paths), 2)

    out = {"bench_images_ms": per_image([s.path for s in samples[:64]], size)}
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-big-") as d:
        big = [s.path for s in make_images(d, n_big, big_px, rgb=False, seed=1)]
        out[f"jpeg_{big_px}px_draft_ms"] = per_image(big, size)
        out[f"jpeg_{big_px}px_full_decode_ms"] = per_image(big, None)
    out["draft_speedup"] = round(out[f"jpeg_{big_px}px_full_decode_ms"] / out[f"jpeg_{big_px}px_draft_ms"], 2)
    return out


def _median_run(spec: dict, repeats: int) -> dict:
    """``repeats`` fresh-process runs of one variant; the run with the median throughput, with
    every run's throughput and peak memory beside it (the machine's speed drifts between runs)."""
    runs = sorted((_spawn(spec) for _ in range(max(1, repeats))), key=lambda r: r["images_per_s"])
    r = dict(runs[len(runs) // 2])
    r["repeats"] = len(runs)
    r["runs_images_per_s"] = [x["images_per_s"] for x in runs]
    r["runs_vs_bare_forward"] = [x.get("vs_bare_forward") for x in runs]
    r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
    return r


def memory_scan(listing: Path, counts: list[int], backbone: str, size: int, batch_size: int, workers,
                pretrained: bool) -> list[dict]:
    """Peak memory of extraction (fresh process, empty cache) at growing image counts: features
    stream to disk batch by batch, so the peak must not grow with the count."""
    samples = json.loads(listing.read_text())
    out = []
    for n in counts:
        part = listing.with_name(f"samples-{n}.json")
        part.write_text(json.dumps(samples[:n]))
        r = _spawn({"samples": str(part), "backbone": backbone, "size": size, "engine": "auto", "workers": workers,
                    "batch_size": batch_size, "pretrained": pretrained})
        out.append({"images": r["images"], "peak_rss_mb": r["peak_rss_mb"], "images_per_s": r["images_per_s"]})
        log.info("memory scan %s", out[-1])
    return out


def run(backbones=("efficientnet_lite0",), sizes=(None,), images: int = 512, data: str | None = None,
        image_px: int = 224, compare: bool = False, batch_size: int = 64, workers: int | None = None,
        pretrained: bool = True, gemm_seconds: float = 3.0, big_px: int = 2000, out_dir=None,
        repeats: int = 3, memory_counts: list[int] | None = None) -> tuple[str, Path]:
    """Run the extraction benchmark; returns (one-line summary, JSON path).

    Each variant runs ``repeats`` times (the median run is reported); ``memory_counts`` adds a
    peak-memory scan over those image counts (the largest must not exceed the images available).
    """
    from ..nets.backbones import create_backbone, default_preprocess
    from ..runtime import cpu_count

    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as tmp:
        if data == "shared":
            data = str(shared_data_dir() or "")
            if not data:
                from ..errors import PneumoscanError
                raise PneumoscanError("--data shared: ../shared/data/chest_xray/train not found; pass a folder")
        wanted = max([images, *(memory_counts or [])])
        pool = dataset_samples(data, wanted) if data else make_images(Path(tmp) / "img", wanted, image_px)
        samples = pool[:images]
        source = {"data": str(data) if data else f"generated {image_px}px RGB JPEG", "images": len(samples)}
        listing = Path(tmp) / "samples.json"
        listing.write_text(json.dumps([[s.path, s.sha1] for s in samples]))
        pool_listing = Path(tmp) / "pool.json"
        pool_listing.write_text(json.dumps([[s.path, s.sha1] for s in pool]))
        gemm = gemm_gflops(gemm_seconds, threads=cpu_count())
        runs, lines = [], []
        for backbone in backbones:
            for size in sizes:
                net, _ = create_backbone(backbone, pretrained=pretrained)
                prep = default_preprocess(backbone, size)
                flops = count_flops(net, prep.size)
                del net
                variants = list(COMPARE) if compare else [("auto", workers)]
                for engine, w in variants:
                    spec = {"samples": str(listing), "backbone": backbone, "size": prep.size, "engine": engine,
                            "workers": w, "batch_size": batch_size, "pretrained": pretrained}
                    r = _median_run(spec, repeats)
                    r["requested"] = {"engine": engine, "workers": w}
                    r["gflop_per_image"] = round(flops / 1e9, 3)
                    r["achieved_gflops"] = round(flops * r["images_per_s"] / 1e9, 3)
                    r["compute_bound_images_per_s"] = round(gemm * 1e9 / flops, 1)
                    r["share_of_compute_bound"] = round(flops * r["images_per_s"] / 1e9 / gemm, 5)
                    runs.append(r)
                    log.info("extract %s", r)
                best = max((r for r in runs if r["backbone"] == backbone and r["size"] == prep.size),
                           key=lambda r: r["images_per_s"])
                lines.append(f"{backbone}@{prep.size}: {best['images_per_s']:.1f} img/s ({best['engine']}, "
                             f"{best['workers']} workers, {best['cpu_ms_per_image']} CPU ms/img) = "
                             f"{best['achieved_gflops']} GFLOP/s, {100 * best['share_of_compute_bound']:.0f}% of "
                             f"the {gemm} GFLOP/s fp32 GEMM bound ({best['compute_bound_images_per_s']} img/s)"
                             + ("" if best.get("vs_bare_forward") is None else
                                f", {100 * best['vs_bare_forward']:.0f}% of the graph's bare forward "
                                f"({best['bare_forward_images_per_s']} img/s)")
                             + f"; peak {best['peak_rss_mb']:.0f} MB")
        first_size = default_preprocess(backbones[0], sizes[0]).size
        decode = decode_figures(samples, first_size, big_px)
        figures = {"source": source, "gemm_gflops": gemm, "gemm_threads": cpu_count(), "runs": runs, "decode": decode}
        if memory_counts:
            counts = sorted({min(int(n), len(pool)) for n in memory_counts})
            figures["memory_scan"] = memory_scan(pool_listing, counts, backbones[0], first_size, batch_size,
                                                 workers, pretrained)
            scan = figures["memory_scan"]
            lines.append(f"peak memory {scan[0]['peak_rss_mb']:.0f} MB at {scan[0]['images']} images, "
                         f"{scan[-1]['peak_rss_mb']:.0f} MB at {scan[-1]['images']}")
    path = write_result("extract", figures, out_dir)
    line = "extract " + "; ".join(lines) + f"; JPEG draft decode {decode['draft_speedup']}x faster at {big_px} px"
    return line, path


if __name__ == "__main__":  # one variant, in its own process: prints its figures as JSON
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run_variant(json.loads(sys.argv[1]))))
