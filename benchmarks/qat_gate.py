"""The export's INT8 gate for a model and for its quantisation-aware copy, side by side, on the real INT8 graphs.

For each model directory given (each with an fp32 export and, for the copy, its own calibration):
ONNX Runtime's static QDQ graph is made as ``pneumoscan export --int8`` makes it (256 training images,
min-max) and the export's gate is run on the model's validation split, whether it passes or not (the
export itself writes nothing when it fails). The copy's ``config.json["qat"]`` record (the emulated
agreement before and after distillation) is put beside its gate. Writes
``benchmarks/results/qat-gate.json``.

    .venv/bin/python benchmarks/qat_gate.py src/pneumoscan/models/default runs/qat-soup --data ../shared/data/chest_xray
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan.bench import write_result
from pneumoscan.export.config import QuantizeConfig
from pneumoscan.export.int8 import _arrays, plan_int8, quantize_and_gate
from pneumoscan.nets.modeldir import read_config
from pneumoscan.preprocess import Preprocess, PreprocessConfig

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model: Path, data: str | None, cfg: QuantizeConfig, tmp: Path) -> dict:
    conf = read_config(model)
    if not (conf.get("onnx") or {}).get("file"):
        raise SystemExit(f"{model} has no ONNX export; run: pneumoscan export --model {model}")
    plan = plan_int8(model, data, cfg)
    pre = Preprocess(PreprocessConfig.from_dict(conf["preprocess"]))
    batches = [x for _, x in _arrays(plan.calibration, pre, pre.cfg.size)]
    dst = tmp / f"{model.name}.int8.onnx"
    t = time.perf_counter()
    g, _ = quantize_and_gate(model, conf, dst, batches, plan.val, cfg)
    return {"model": str(model), "model_id": conf.get("model_id"), "quantise_and_gate_seconds": round(time.perf_counter() - t, 1),
            "calibration": (conf.get("calibration") or {}).get("temperature"), "threshold": conf.get("threshold"),
            "val_metrics": conf.get("val_metrics"), "gate": g, "qat": conf.get("qat")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="model directories with an fp32 export (teacher, then copies)")
    ap.add_argument("--data", default=None, help="training folder the models were trained on (calibration and gate)")
    ap.add_argument("--name", default="qat-gate", help="result file name (default qat-gate)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cfg = QuantizeConfig()
    with tempfile.TemporaryDirectory(prefix="pneumoscan-qat-gate-") as tmp:
        rows = [measure(m, args.data, cfg, Path(tmp)) for m in args.models]
    for r in rows:
        g = r["gate"]
        print(f"{r['model_id']}: identical verdicts {g['agreement']:.2%} of {g['images']}, AUC {g['auc_int8']:.4f} vs "
              f"fp32 {g['auc_fp32']:.4f}; passed {g['passed']}")
    path = write_result(args.name, {"quantize_config": {"calibration": cfg.calibration, "images": cfg.calibration_images},
                                    "models": rows}, args.out)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
