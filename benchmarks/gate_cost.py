"""What knowing when not to answer costs: one image, JPEG bytes to a verdict, with and without the gate.

Times, on the same images in one run and interleaved: (a) decode + preprocess + the network (ONNX
Runtime) alone; (b) the whole ``Predictor.predict_xray`` with the image checks, the upside-down check,
the out-of-distribution score on the pooled features, temperature and the conformal set. Writes
``benchmarks/results/gate-cost.json``.

    python benchmarks/gate_cost.py --model DIR --data ../shared/data/chest_xray [--n 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a calibrated model directory (pneumoscan calibrate)")
    ap.add_argument("--data", required=True, help="training folder: its validation split is timed")
    ap.add_argument("--n", type=int, default=200, help="images (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gate-cost.json"))
    args = ap.parse_args()
    from pneumoscan.bench import result_file
    from pneumoscan.errors import PneumoscanError

    try:  # checked before the timing
        out_path = result_file(args.out, "gate-cost.json")
    except PneumoscanError as e:
        ap.error(str(e))

    from pneumoscan.data.splits import validation_set
    from pneumoscan.predict import Predictor

    pred = Predictor(args.model, backend="onnx", threads=args.threads)
    if pred.ood is None:
        raise SystemExit(f"{args.model} has no learned gate; run pneumoscan calibrate on it first")
    ev = validation_set(args.data, pred.config, pred.model_dir)
    paths = ev.paths[:: max(1, len(ev.paths) // args.n)][: args.n]
    blobs = [Path(p).read_bytes() for p in paths]
    logits = pred.outputs[:1]

    def bare(b: bytes) -> None:  # decode + preprocess + network, no gate, no features, no sets
        x = pred.decode(b, "x")
        pred._session.run(logits, {"input": pred.pre.array(x.pixels)[None]})

    def gated(b: bytes) -> None:
        pred.predict_xray(pred.decode(b, "x"), "x")

    for b in blobs[:10]:  # warm up both paths
        bare(b)
        gated(b)
    t_bare, t_gate = [], []
    for b in blobs:  # interleaved: the machine's drift hits both alike
        t = time.perf_counter()
        bare(b)
        t_bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        gated(b)
        t_gate.append(time.perf_counter() - t)
    a, g = float(np.median(t_bare)) * 1e3, float(np.median(t_gate)) * 1e3
    out = {"model": pred.model_id, "n": len(blobs), "threads": args.threads, "machine": platform.processor() or
           platform.machine(), "median_ms_network_only": round(a, 3), "median_ms_with_gate": round(g, 3),
           "overhead": round(g / a - 1, 4), "target": "overhead < 0.10"}
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
