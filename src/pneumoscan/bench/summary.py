"""``benchmarks/results/SUMMARY.md``: the latest figures of each JSON result against the targets."""
from __future__ import annotations

import json
from pathlib import Path

from . import default_results_dir


def _load(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _latest(folder: Path, pattern: str) -> dict | None:
    docs = []
    for path in folder.glob(pattern):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return max(docs, key=lambda d: d.get("date", ""), default=None)


def _machine(doc: dict) -> str:
    m = doc["machine"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['cores']} cores"
    return f"{where}, load {m.get('load_avg_1m')}, {doc['when'][:10]}"


def _rows(folder: Path) -> list[tuple[str, str, str, str, str]]:
    """(figure, target, measured, met?, machine) rows, one per target with a result."""
    rows = []

    def add(doc, figure, target, value, ok):
        rows.append((figure, target, value, "yes" if ok else "**no**", _machine(doc)))

    ex = _load(folder, "extract")
    if ex:
        lite = [r for r in ex["runs"] if r["backbone"] == "efficientnet_lite0" and r["size"] == 224]
        if lite:
            best = max(lite, key=lambda r: r["images_per_s"])
            add(ex, "Lite0 @224 extraction, end to end", ">= 60 img/s",
                f"{best['images_per_s']} img/s ({best['engine']}, {best['workers']} workers; "
                f"{best['cpu_ms_per_image']} CPU ms/img; {100 * best['share_of_compute_bound']:.0f}% of "
                f"{ex['gemm_gflops']} GFLOP/s GEMM)", best["images_per_s"] >= 60)
            scan = ex.get("memory_scan")
            if scan:
                lo, hi = scan[0], scan[-1]
                flat = hi["peak_rss_mb"] <= 1.1 * lo["peak_rss_mb"] + 64
                add(ex, f"peak extraction memory, {lo['images']} -> {hi['images']} images", "<= 2 GB, flat",
                    " -> ".join(f"{r['peak_rss_mb']:.0f}" for r in scan) + " MB",
                    max(r["peak_rss_mb"] for r in scan) <= 2048 and flat)
            else:
                peak = max(r["peak_rss_mb"] for r in lite)
                add(ex, f"peak extraction memory ({best['images']} images)", "<= 2 GB", f"{peak:.0f} MB", peak <= 2048)
    pipe = _load(folder, "pipeline")
    if pipe:
        n = pipe["images"]
        for kind, limit in (("cold", 180), ("cached", 20)):
            if kind in pipe:
                add(pipe, f"pipeline index to report, {n} images, {kind}", f"<= {limit} s",
                    f"{pipe[kind]['total']} s (extract {pipe[kind]['extract']}, evaluate {pipe[kind]['evaluate']})",
                    pipe[kind]["total"] <= limit and n >= 5216)
        add(pipe, f"peak memory, whole pipeline ({n} images)", "<= 2 GB", f"{pipe['peak_rss_mb']:.0f} MB",
            pipe["peak_rss_mb"] <= 2048)
    lat = _load(folder, "latency")
    if lat:
        o = lat["onnx_end_to_end"]
        add(lat, "single-image latency, ONNX Runtime (JPEG to probabilities)", "p50 <= 15 ms",
            f"p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms (PyTorch p50 {lat['torch_end_to_end']['p50_ms']} ms)",
            o["p50_ms"] <= 15)
    explain = _latest(folder, "explain-*.json")
    if explain:
        res, when = explain["results"], explain["date"]
        doc = {"machine": {"cpu_model": explain["machine"]["cpu"], "cores": explain["machine"]["usable_cpus"],
                           "load_avg_1m": round(explain["machine"]["loadavg_1_5_15_before"][0], 2)}, "when": when}
        occ = res.get("occlusion_incremental") or res.get("occlusion_onnx")
        if occ:
            how = "incremental" if "occlusion_incremental" in res else "Captum over ONNX Runtime"
            other = res.get("occlusion_onnx") if "occlusion_incremental" in res else None
            extra = f"; Captum over ONNX Runtime {other['median_wall_s']} s" if other else ""
            add(doc, f"occlusion, 224 px, patch 16, stride 8 ({occ['copies']} copies)", "<= 5 s",
                f"{occ['median_wall_s']} s ({how}{extra})", occ["median_wall_s"] <= 5)
        if "gradcam" in res:
            add(doc, "Grad-CAM, one 224-px image", "<= 0.5 s", f"{res['gradcam']['median_wall_s']} s",
                res["gradcam"]["median_wall_s"] <= 0.5)
    gpu = _load(folder, "gpu")
    if gpu:
        best = max(gpu["forward_bf16"].values())
        add(gpu, "Lite0 @224 inference on the GPU, bf16", ">= 15,000 img/s",
            f"{best:.0f} img/s (end to end {gpu['extract_end_to_end']['images_per_s']:.0f} img/s)", best >= 15000)
    return rows


def write_summary(out_dir=None) -> Path:
    """Rewrite SUMMARY.md from the JSON files in ``out_dir``; returns its path."""
    from ..io import atomic_write_bytes

    folder = Path(out_dir) if out_dir else default_results_dir()
    lines = ["# Benchmark summary", "",
             "Written by `pneumoscan bench`; each figure's JSON beside this file holds the machine, versions",
             "and every variant. A shared or loaded machine gives lower figures: see each row's load.", "",
             "| figure | target | measured | met | machine |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in _rows(folder)]
    path = folder / "SUMMARY.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
