"""What folding TensorFlow-"SAME" padding into the convolutions buys ONNX Runtime (forward only).

Exports the Lite0 backbone twice with the TorchScript exporter: as timm builds it (padding
computed at run time, a ``Pad`` before each strided conv) and through
:func:`pneumoscan.nets.graph.export_fast` (constant padding folded into ``Conv``). Times both in
ONNX Runtime at several batch sizes, alternating between the two so that a drift of the machine's
speed hits both, and writes ``benchmarks/results/onnx-graph.json`` (median images/s per variant).

    .venv/bin/python benchmarks/onnx_graph.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pneumoscan.bench import write_result
from pneumoscan.nets.backbones import create_backbone
from pneumoscan.nets.graph import export_fast
from pneumoscan.runtime import cpu_count

RESULTS = Path(__file__).resolve().parent / "results"


def plain_export(net: torch.nn.Module, size: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, size, size),), buf, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def session(data: bytes):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = cpu_count()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=256, help="images per timed run")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    args = ap.parse_args(argv)
    net, _ = create_backbone("efficientnet_lite0", pretrained=False)  # speed does not depend on the weights
    net.eval()
    size = 224
    graphs = {"runtime_same_padding": plain_export(net, size), "folded_padding": export_fast(net, size)}
    ops = {k: dict(Counter(n.op_type for n in onnx.load_from_string(v).graph.node)) for k, v in graphs.items()}
    sessions = {k: session(v) for k, v in graphs.items()}
    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    outs = [s.run(None, {"input": x})[0] for s in sessions.values()]
    diff = float(np.abs(outs[0] - outs[1]).max())
    figures: dict = {"command": " ".join(["python benchmarks/onnx_graph.py", *sys.argv[1:]]), "ops": ops,
                     "max_abs_diff": diff, "images_per_run": args.images, "repeats": args.repeats,
                     "images_per_s": {}}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        batch = np.random.default_rng(1).normal(size=(bs, 3, size, size)).astype(np.float32)
        calls = max(1, args.images // bs)
        rates: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {"input": batch})  # warm-up
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                for _ in range(calls):
                    s.run(None, {"input": batch})
                rates[k].append(calls * bs / (time.perf_counter() - t))
        figures["images_per_s"][str(bs)] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        print(bs, figures["images_per_s"][str(bs)], flush=True)
    path = write_result("onnx-graph", figures, RESULTS)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
