"""Speed of the heat maps: occlusion (224 px, patch 16, stride 8 = 729 occluded copies) and Grad-CAM.

Targets (issue 4, EfficientNet-Lite0 on a 2-core CPU): occlusion <= 5 s, Grad-CAM <= 0.5 s.
Writes ``benchmarks/results/explain-<date>-<cpus>cpu.json`` with the machine, library versions,
thread count, load average and the median of each timing (wall clock and process CPU time; on a
shared machine CPU time / threads is the better guess of the wall time on a quiet one).

    .venv/bin/python benchmarks/explain.py                 # Lite0 architecture, random weights
    .venv/bin/python benchmarks/explain.py --model /path/to/model_dir --repeats 5

Weights do not change the speed, so without ``--model`` a Lite0 model directory with random
weights is built in a temporary folder (no download); the input is a synthetic image.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscan.bench import result_file
from pneumoscan.data.imaging import XRay
from pneumoscan.errors import PneumoscanError
from pneumoscan.explain.explainer import Explainer
from pneumoscan.explain.figures import explain_overlay_png
from pneumoscan.predict import Predictor


def lite0_model_dir(root: Path) -> Path:
    """A Lite0 model directory with random weights (speed does not depend on the weights)."""
    from pneumoscan.nets.backbones import create_backbone, default_preprocess
    from pneumoscan.nets.checkpoint import save_model
    from pneumoscan.nets.heads import Head, PneumoNet

    backbone, wid = create_backbone("efficientnet_lite0", pretrained=False)
    net = PneumoNet(backbone, Head(backbone.num_features, 3, 0.2)).eval()
    cfg = {"name": "bench-lite0", "kind": "single", "backbone": "efficientnet_lite0", "weights_source": wid,
           "preprocess": default_preprocess("efficientnet_lite0").to_dict(),
           "head": {"in_features": backbone.num_features, "dropout": 0.2}, "threshold": 0.5}
    return save_model(root / "lite0", net, cfg)


def synthetic_xray(side: int = 224, seed: int = 0) -> XRay:
    """A chest-like synthetic image: two dark 'lungs' on a brighter body (not a dataset image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    body = 170 - 80 * (((xx - 0.3) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1) \
        - 80 * (((xx - 0.7) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    px = np.clip(body + rng.normal(0, 12, (side, side)), 0, 255).astype(np.uint8)
    return XRay(px, format="png", mode="L", size=(side, side))


def summarize(wall: list[float], cpu: list[float]) -> dict:
    threads = torch.get_num_threads()
    return {"median_wall_s": round(statistics.median(wall), 3), "min_wall_s": round(min(wall), 3),
            "median_cpu_s": round(statistics.median(cpu), 3),
            "cpu_s_per_thread": round(statistics.median(cpu) / threads, 3),
            "runs_wall_s": [round(w, 3) for w in wall]}


def timed(fn, repeats: int) -> dict:
    """Median wall and process-CPU seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return summarize(wall, cpu)


def versions() -> dict:
    import captum
    import onnxruntime
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "captum": captum.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg_1_5_15_before": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: Lite0 with random weights)")
    ap.add_argument("--repeats", type=int, default=3, help="timed occlusion runs (Grad-CAM runs 5x as many)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--engines", default="incremental,onnx",
                    help="occlusion engines to time, comma-separated (runs alternate between them)")
    ap.add_argument("--out", default=None, help="result JSON, or a folder for the default name "
                                                "(default: benchmarks/results/explain-<date>-<cpus>cpu.json)")
    args = ap.parse_args(argv)
    try:  # checked before minutes of timing
        out = result_file(args.out, f"explain-{dt.date.today().isoformat()}-{machine()['usable_cpus']}cpu.json")
    except PneumoscanError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"benchmark": "explain", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
            "versions": versions(), "torch_threads": torch.get_num_threads(),
            "targets": {"occlusion_s": 5.0, "gradcam_s": 0.5}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else lite0_model_dir(Path(tmp))
        pred = Predictor(model_dir)
        x = synthetic_xray(pred.prep_cfg.size)
        info["model"] = {"dir": str(args.model or "random-weight Lite0"), "id": pred.model_id,
                         "backbone": pred.config.get("backbone"), "size": pred.prep_cfg.size}
        results = {}
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        explainers = {}
        for engine in engines:
            ex = Explainer(pred, patch=16, stride=8, batch_size=64, engine=engine)
            t = time.perf_counter()
            if ex.incremental() is None:  # one-time: graph export (cached on disk) and sessions
                ex.occlusion_forward()
            setup = time.perf_counter() - t
            ex(x, ("occlusion",))  # warm-up
            explainers[engine] = ex
            results[f"occlusion_{engine}"] = {"copies": ex.occlusion.n_copies(pred.prep_cfg.size),
                                              "one_time_setup_s": round(setup, 2), "runs": []}
        for _ in range(args.repeats):  # alternate, so that a drift of the machine's speed hits every engine
            for engine, ex in explainers.items():
                t, c = time.perf_counter(), time.process_time()
                ex(x, ("occlusion",))
                results[f"occlusion_{engine}"]["runs"].append((time.perf_counter() - t, time.process_time() - c))
        for engine in engines:
            r = results[f"occlusion_{engine}"]
            runs = r.pop("runs")
            r.update(summarize([w for w, _ in runs], [c for _, c in runs]))
            print(engine, r, flush=True)
        if len(engines) > 1:
            base = results[f"occlusion_{engines[-1]}"]["median_wall_s"]
            for engine in engines[:-1]:
                results[f"occlusion_{engine}"][f"speedup_vs_{engines[-1]}"] = round(
                    base / results[f"occlusion_{engine}"]["median_wall_s"], 2)
        from pneumoscan.bench import gemm_gflops
        info["gemm_gflops_now"] = gemm_gflops(2.0, threads=torch.get_num_threads())
        ex = Explainer(pred)
        results["gradcam"] = timed(lambda: ex(x, ("gradcam",)), 5 * args.repeats)
        print("gradcam", results["gradcam"], flush=True)
        results["explain_overlay_png_gradcam"] = timed(lambda: explain_overlay_png(pred, x, "gradcam"),
                                                       5 * args.repeats)
        print("overlay png", results["explain_overlay_png_gradcam"], flush=True)
    info["results"] = results
    info["machine"]["loadavg_1_5_15_after"] = list(os.getloadavg())
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
