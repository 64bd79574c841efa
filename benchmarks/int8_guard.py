"""The guarded INT8 path against fp32, end to end, in one run: what ``export --int8`` makes the predictor serve.

For a model directory whose INT8 export passed its gate with the guard (``pneumoscan export --int8``):

1. end to end as ``predict`` runs a folder (JPEG files -> decode -> checks -> preprocess -> forward -> gate,
   ``Predictor.predict_files``) at ``--batch``: fp32, INT8 with its guard (images near a boundary run again in
   fp32), and INT8 alone (the same graph with every margin 0), alternating in each of ``--repeats`` rounds;
2. the graphs' bare forwards (ONNX Runtime, ``logits`` + ``features``) at the same batch: the ceiling;
3. single-image latency, JPEG bytes to the verdict (``Predictor.predict_bytes``), fp32 and guarded INT8;
4. identical verdicts of each INT8 path against fp32 on the timed images, and the share the guard sent back;
5. writes ``benchmarks/results/NAME.json`` with the CPU's instruction-set flags and every ratio to fp32.

    .venv/bin/python benchmarks/int8_guard.py runs/soup-int8 --data ../shared/data/chest_xray --name int8-guard
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pneumoscan.bench import percentiles, time_calls, write_result
from pneumoscan.data.splits import validation_set
from pneumoscan.nets.modeldir import CONFIG_NAME, int8_file, read_config
from pneumoscan.predict import Predictor
from pneumoscan.runtime import cpu_count, ort_session

RESULTS = Path(__file__).resolve().parent / "results"


def alone_copy(model: Path, tmp: Path) -> Path:
    """The model directory with every guard margin 0: the same INT8 graph answering every image alone."""
    d = Path(shutil.copytree(model, tmp / "alone", symlinks=True))
    conf = read_config(d)
    conf["onnx"]["int8"]["guard"]["margins"] = {k: 0.0 for k in conf["onnx"]["int8"]["guard"]["margins"]}
    (d / CONFIG_NAME).write_text(json.dumps(conf))
    return d


def end_to_end(pred: Predictor, files: list[str], batch: int) -> float:
    t = time.perf_counter()
    preds, _ = pred.predict_files(files, batch_size=batch)
    return len(preds) / (time.perf_counter() - t)


def bare(path: Path, x: np.ndarray, threads: int, batches: int) -> float:
    s = ort_session(path, threads=threads)
    names = [o.name for o in s.get_outputs() if o.name in ("logits", "features")]
    s.run(names, {"input": x})
    t = time.perf_counter()
    for _ in range(batches):
        s.run(names, {"input": x})
    return batches * len(x) / (time.perf_counter() - t)


def guarded_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every guarded-INT8 benchmark takes (this one and ``int8_bound.py``)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model", type=Path, help="model directory with a guarded INT8 export that passed its gate")
    ap.add_argument("--data", default=None, help="the training folder the model's manifest points into")
    ap.add_argument("--images", type=int, default=512, help="validation images timed end to end (default 512)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=cpu_count())
    ap.add_argument("--name", default=name)
    return ap


def guarded_config(model: Path) -> dict | None:
    """The model's config.json, or None (and one line on stderr) when it has no guarded INT8 export that passed."""
    conf = read_config(model)
    if int8_file(conf) and conf["onnx"]["int8"].get("guard"):
        return conf
    print(f"{model} has no guarded INT8 export that passed its gate; run 'pneumoscan export --model {model} --int8 "
          "--data DATA' first", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = guarded_parser(__doc__, "int8-guard")
    ap.add_argument("--latency-iters", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    conf = guarded_config(args.model)
    if conf is None:
        return 2
    val = validation_set(args.data, conf, args.model)
    files = val.paths[: args.images]
    with tempfile.TemporaryDirectory(prefix="pneumoscan-guard-bench-") as tmp:
        preds = {"fp32": Predictor(args.model, backend="onnx", precision="fp32", threads=args.threads),
                 "int8_guarded": Predictor(args.model, backend="onnx", precision="int8", threads=args.threads),
                 "int8_alone": Predictor(alone_copy(args.model, Path(tmp)), backend="onnx", precision="int8",
                                         threads=args.threads)}
        verdicts = {k: [p.verdict for p in pr.predict_files(files, batch_size=args.batch)[0]] for k, pr in preds.items()}
        sent = preds["int8_guarded"].rechecked
        pre = preds["fp32"].pre
        x = np.stack([pre.array(preds["fp32"].decode(f).pixels) for f in files[: args.batch]])
        rounds: dict[str, list[float]] = {k: [] for k in [*preds, "bare_fp32", "bare_int8"]}
        for r in range(args.repeats):
            for k, pr in preds.items():
                rounds[k].append(end_to_end(pr, files, args.batch))
            rounds["bare_fp32"].append(bare(args.model / conf["onnx"]["file"], x, args.threads, 4))
            rounds["bare_int8"].append(bare(args.model / int8_file(conf), x, args.threads, 4))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rounds.items()), flush=True)
        med = {k: round(statistics.median(v), 1) for k, v in rounds.items()}
        jpegs = [Path(p).read_bytes() for p in files[:64]]
        lat = {}
        for k in ("fp32", "int8_guarded"):
            it = iter(range(10 ** 9))
            pr = preds[k]
            lat[k] = percentiles(time_calls(lambda pr=pr, it=it: pr.predict_bytes(jpegs[next(it) % len(jpegs)]),
                                            args.latency_iters, 10))
    same = {k: float(np.mean([a == b for a, b in zip(verdicts[k], verdicts["fp32"])])) for k in ("int8_guarded", "int8_alone")}
    doc = {"model": conf.get("model_id"), "images": len(files), "batch": args.batch, "threads": args.threads,
           "repeats": args.repeats, "images_per_s_median": med, "images_per_s_rounds": rounds,
           "ratios_to_fp32_end_to_end": {k: round(med[k] / med["fp32"], 2) for k in ("int8_guarded", "int8_alone")},
           "bare_int8_vs_bare_fp32": round(med["bare_int8"] / med["bare_fp32"], 2),
           "end_to_end_vs_bare_fp32": round(med["fp32"] / med["bare_fp32"], 2),
           "identical_verdicts_vs_fp32": same, "guard_sent_to_fp32": sent["fp32"] / max(sent["images"], 1),
           "gate": conf["onnx"]["int8"]["gate"], "single_image_latency": lat}
    path = write_result(args.name, doc, args.out)
    print(f"medians (img/s): {med}\nratios to fp32: {doc['ratios_to_fp32_end_to_end']}; identical verdicts {same}; "
          f"sent to fp32 {doc['guard_sent_to_fp32']:.1%}\nlatency p50 ms: fp32 {lat['fp32']['p50_ms']}, guarded "
          f"{lat['int8_guarded']['p50_ms']}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
