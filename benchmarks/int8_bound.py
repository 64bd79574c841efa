"""How fast guarded INT8 can be end to end on this machine: each stage's wall and CPU time, and the bound they set.

``int8_guard.py`` measures the served paths end to end; this one takes them apart, on the same validation images and
in one run, to say what ratio to fp32 is reachable at all:

1. outside the network, per image (one thread, as ``Predictor.predict_files`` runs it): decode, the image checks,
   resize with the intensity step, normalisation;
2. the bare forwards (``logits`` + ``features``) at ``--batch``, fp32 and INT8, wall and CPU milliseconds per image
   (CPU time counts every intra-op thread: on a machine whose cores the forward already fills, work moved beside
   it costs as much as work done after it), and fp32 at the guard's re-run size (the rows it sends back);
3. the share the guard sends back to fp32 on these images;
4. end to end, ``predict_files`` as served (stages one after the other) and with the next batch decoded on a second
   thread while the network runs (a prefetch), fp32 and guarded INT8, alternating in each of ``--repeats`` rounds;
5. the bounds: stages one after the other, (F32 + O) / (F8 + g F32' + O) with wall times; everything overlapped,
   the same with CPU times (the cores never idle); both also for INT8 alone (g = 0).

    .venv/bin/python benchmarks/int8_bound.py runs/qat10f --data ../shared/data/chest_xray --name int8-bound
"""
from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from int8_guard import guarded_config, guarded_parser  # this folder is on sys.path

from pneumoscan.bench import result_file, write_result
from pneumoscan.data.splits import validation_set
from pneumoscan.nets.modeldir import int8_file
from pneumoscan.predict import Predictor
from pneumoscan.runtime import ort_session


def clocks(fn, n: int) -> tuple[float, float]:
    """(wall ms, CPU ms of every thread of this process) per item of ``fn()``, which handles ``n`` items."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w) * 1e3 / n, (time.process_time() - c) * 1e3 / n


def bare(path: Path, x: np.ndarray, threads: int, batches: int) -> tuple[float, float]:
    s = ort_session(path, threads=threads, spinning=False)
    names = [o.name for o in s.get_outputs() if o.name in ("logits", "features")]
    s.run(names, {"input": x})
    return clocks(lambda: [s.run(names, {"input": x}) for _ in range(batches)], batches * len(x))


def prefetched(pred: Predictor, files: list[str], batch: int) -> int:
    """``predict_files`` with the next batch decoded, checked and normalised on a second thread while the network
    runs this one (the experiment: same steps, same order of results)."""
    size = pred.prep_cfg.size
    bufs = [np.empty((batch, 3, size, size), np.float32) for _ in range(2)]

    def prepare(k: int, chunk: list[str]):
        xs = [pred.decode(p, p) for p in chunk]
        screens = [pred.screen(x) for x in xs]
        arr = pred.pre.normalize_np(np.stack([pred.pre.resize(x.pixels) for x in xs]), out=bufs[k][:len(xs)])
        return chunk, arr, screens

    chunks = [files[i:i + batch] for i in range(0, len(files), batch)]
    n = 0
    with ThreadPoolExecutor(1) as ahead:
        fut = ahead.submit(prepare, 0, chunks[0])
        for j in range(len(chunks)):
            names, arr, screens = fut.result()
            if j + 1 < len(chunks):
                fut = ahead.submit(prepare, (j + 1) % 2, chunks[j + 1])
            probs, feats = pred.forward(arr, features=pred.ood is not None)
            scores = pred.ood.score(feats) if feats is not None else [None] * len(names)
            n += len([pred.result(nm, p, r, w, score=s) for nm, p, (r, w), s in zip(names, probs, screens, scores)])
    return n


def main(argv: list[str] | None = None) -> int:
    ap = guarded_parser(__doc__, "int8-bound")
    ap.add_argument("--out", default=None, help="a JSON file, or a folder for NAME.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    out = result_file(args.out, f"{args.name}.json")
    conf = guarded_config(args.model)
    if conf is None:
        return 2
    files = [str(p) for p in validation_set(args.data, conf, args.model).paths[: args.images]]
    preds = {k: Predictor(args.model, backend="onnx", precision=k, threads=args.threads) for k in ("fp32", "int8")}
    ref = preds["fp32"]
    for p in preds.values():
        p.predict_files(files[: args.batch], batch_size=args.batch)  # sessions warm
    before = dict(preds["int8"].rechecked)
    preds["int8"].predict_files(files, batch_size=args.batch)
    g = (preds["int8"].rechecked["fp32"] - before["fp32"]) / len(files)

    xs: list = []
    outside = {"decode": clocks(lambda: xs.extend(ref.decode(f, f) for f in files), len(files))[0],
               "checks": clocks(lambda: [ref.screen(x) for x in xs], len(files))[0]}
    rs: list = []
    outside["resize_intensity"] = clocks(lambda: rs.extend(ref.pre.resize(x.pixels) for x in xs), len(files))[0]
    buf = np.empty((args.batch, 3, ref.prep_cfg.size, ref.prep_cfg.size), np.float32)
    chunks = [rs[i:i + args.batch] for i in range(0, len(rs), args.batch)]
    outside["normalise"] = clocks(lambda: [ref.pre.normalize_np(np.stack(c), out=buf[:len(c)]) for c in chunks],
                                  len(files))[0]
    o = sum(outside.values())
    x = ref.pre.normalize_np(np.stack(rs[: args.batch]))
    sub = max(1, round(g * args.batch))
    f32 = bare(args.model / conf["onnx"]["file"], x, args.threads, 4)
    f8 = bare(args.model / int8_file(conf), x, args.threads, 4)
    f32_sub = bare(args.model / conf["onnx"]["file"], x[:sub], args.threads, max(4, 4 * args.batch // sub))

    rounds: dict[str, list[float]] = {k: [] for k in ("fp32", "int8_guarded", "fp32_prefetch", "int8_guarded_prefetch")}
    for r in range(args.repeats):
        for k, p in preds.items():
            name = "fp32" if k == "fp32" else "int8_guarded"
            rounds[name].append(clocks(lambda p=p: p.predict_files(files, batch_size=args.batch), len(files))[0])
            rounds[name + "_prefetch"].append(clocks(lambda p=p: prefetched(p, files, args.batch), len(files))[0])
        print(f"round {r + 1} (ms/img): " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items()), flush=True)
    med = {k: round(statistics.median(v), 3) for k, v in rounds.items()}

    def bound(f32_ms: float, f8_ms: float, sub_ms: float, share: float, outside_ms: float) -> float:
        return round((f32_ms + outside_ms) / (f8_ms + share * sub_ms + outside_ms), 2)

    doc = {"model": conf.get("model_id"), "images": len(files), "batch": args.batch, "threads": args.threads,
           "repeats": args.repeats, "guard_sent_to_fp32": round(g, 4), "guard_rerun_batch": sub,
           "outside_ms_per_image": {k: round(v, 3) for k, v in outside.items()}, "outside_total_ms": round(o, 3),
           "bare_ms_per_image": {"fp32": {"wall": round(f32[0], 3), "cpu": round(f32[1], 3)},
                                 "int8": {"wall": round(f8[0], 3), "cpu": round(f8[1], 3)},
                                 "fp32_at_rerun_batch": {"wall": round(f32_sub[0], 3), "cpu": round(f32_sub[1], 3)}},
           "end_to_end_ms_per_image_median": med, "end_to_end_ms_per_image_rounds": rounds,
           "ratio_to_fp32_measured": {"served": round(med["fp32"] / med["int8_guarded"], 2),
                                      "prefetch": round(med["fp32_prefetch"] / med["int8_guarded_prefetch"], 2)},
           "ratio_bounds": {
               "guarded_stages_in_turn": bound(f32[0], f8[0], f32_sub[0], g, o),
               "guarded_fully_overlapped": bound(f32[1], f8[1], f32_sub[1], g, o),
               "int8_alone_stages_in_turn": bound(f32[0], f8[0], 0.0, 0.0, o),
               "int8_alone_fully_overlapped": bound(f32[1], f8[1], 0.0, 0.0, o),
               "guarded_nothing_outside": bound(f32[0], f8[0], f32_sub[0], g, 0.0)}}
    path = write_result(out.stem, doc, out.parent)
    print(f"outside {o:.2f} ms/img {doc['outside_ms_per_image']}; bare ms/img {doc['bare_ms_per_image']}; guard sent "
          f"{g:.1%}\nend to end ms/img {med}\nratios measured {doc['ratio_to_fp32_measured']}; bounds "
          f"{doc['ratio_bounds']}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
