"""INT8 vs fp32, ONNX Runtime vs OpenVINO, eager PyTorch as the floor: one model's graph, one run, ratios.

For a model directory with an fp32 export (default: a copy of the shipped model, exported here):

1. makes the INT8 graphs the export would make (``pneumoscan.export.int8.quantize_and_gate``: NNCF with fast
   bias correction, and ONNX Runtime's min-max quantiser), calibrated on 256 training images, and runs the
   export's gate on the validation split for each (the figures that decide whether the export keeps it);
2. times, alternating between variants in each of ``--repeats`` rounds (a drift of the machine hits all):
   - eager PyTorch (channels_last, ``inference_mode``) of the same network: baseline 1;
   - ONNX Runtime's bare forward of the fp32 graph (``logits`` + ``features``): baseline 2;
   - the INT8 graphs in ONNX Runtime; the fp32 and both INT8 graphs in OpenVINO's CPU runtime, and the fp32 graph
     computed in bfloat16 by OpenVINO where the CPU has the instructions (with its class agreement with ONNX
     Runtime's fp32 on the validation split);
   - end to end, as pneumoscan extracts (JPEG files -> decode -> preprocess -> forward, ``Predictor.arrays``),
     fp32 and INT8 (ONNX Runtime's quantiser, the export's default);
   all at batch ``--batch`` on ``--threads`` threads, images/s, median over rounds;
3. single-image latency, JPEG bytes to probabilities (``Predictor.predict_bytes``), fp32 and INT8, p50/p99;
   and fp32 with ONNX Runtime running the ensemble's members side by side (parallel execution mode);
4. writes ``benchmarks/results/int8.json``: every figure with its ratio to both baselines of this run,
   the CPU's instruction-set flags, versions.

    /work/exclusive.sh .venv/bin/python benchmarks/int8.py --model /tmp/model-copy --data ../shared/data/chest_xray
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pneumoscan.bench import percentiles, time_calls, write_result
from pneumoscan.export.config import QuantizeConfig
from pneumoscan.export.int8 import _arrays, plan_int8, quantize_and_gate
from pneumoscan.labels import softmax
from pneumoscan.nets.modeldir import PACKAGE_MODEL, read_config
from pneumoscan.preprocess import Preprocess, PreprocessConfig
from pneumoscan.runtime import cpu_count, ort_session, weight_range

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUTS = ["logits", "features"]


def fp32_copy(model: Path | None, tmp: Path) -> Path:
    """The model directory to measure: ``model`` as given, or the shipped model copied and exported (a minute)."""
    if model is not None:
        return model
    from pneumoscan.export.onnx import export_onnx

    d = Path(shutil.copytree(PACKAGE_MODEL, tmp / "model"))
    for p in d.iterdir():
        p.chmod(0o644)
    export_onnx(d)
    return d


def ort_runner(path: Path, threads: int, parallel: bool = False):
    if not parallel:
        s = ort_session(path, threads=threads)
    else:  # members side by side: one intra-op thread each, two inter-op threads
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.inter_op_num_threads, so.intra_op_num_threads = threads, 1
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs() if o.name in OUTPUTS]
    return lambda x: s.run(names, {"input": x})


def openvino_runner(path: Path, threads: int, precision: str = "f32"):
    """OpenVINO's CPU runtime on ``path``; ``precision`` "bf16" lets it compute in bfloat16 where the CPU has
    the instructions (AVX-512 BF16, AMX), "f32" keeps fp32 arithmetic."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    outs = [o for o in compiled.outputs if o.get_any_name() in OUTPUTS]

    def run(x):
        res = request.infer({"input": x})  # one inference, every output (not one inference per output)
        return [res[o] for o in outs]
    return run


def torch_runner(model: Path, threads: int):
    import torch

    from pneumoscan.nets.checkpoint import load_model

    torch.set_num_threads(threads)
    net = load_model(model).net.eval().to(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode():
            return net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    return run


def same_class(fn, ref, paths: list[str], pre: Preprocess, batch: int) -> dict:
    """How closely ``fn`` follows ``ref`` on ``paths``: the share of images with the same arg-max class, and the
    mean and largest absolute change of a softmax probability (raw logits, before any calibration)."""
    from pneumoscan.data.imaging import load_xray

    a, b = [], []
    for i in range(0, len(paths), batch):
        x = np.stack([pre.array(load_xray(p, size_hint=pre.cfg.size, colour=False).pixels) for p in paths[i:i + batch]])
        a.append(np.asarray(fn(x)[0]))
        b.append(np.asarray(ref(x)[0]))
    pa, pb = softmax(np.concatenate(a)), softmax(np.concatenate(b))
    d = np.abs(pa - pb)
    return {"images": len(pa), "same_class": float((pa.argmax(1) == pb.argmax(1)).mean()),
            "mean_abs_prob_diff": float(d.mean()), "max_abs_prob_diff": float(d.max())}


def throughput(fn, x: np.ndarray, batches: int) -> float:
    fn(x)  # warm
    t = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return batches * len(x) / (time.perf_counter() - t)


def end_to_end(model: Path, precision: str, files: list[str], batch: int, threads: int, flags) -> float:
    from pneumoscan.predict import Predictor

    pred = Predictor(model, backend="onnx", precision=precision, threads=threads, cpu_flags=flags)
    pred.arrays(files[:batch], batch_size=batch)  # warm
    t = time.perf_counter()
    probs, _, _, _ = pred.arrays(files, batch_size=batch, features=True)
    return len(probs) / (time.perf_counter() - t)


def latency(model: Path, precision: str, jpegs: list[bytes], iters: int, threads: int, flags) -> dict:
    from pneumoscan.predict import Predictor

    pred = Predictor(model, backend="onnx", precision=precision, threads=threads, cpu_flags=flags)
    it = iter(range(10 ** 9))
    return percentiles(time_calls(lambda: pred.predict_bytes(jpegs[next(it) % len(jpegs)]), iters, 10))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory with an fp32 export (default: the "
                                                               "shipped model, copied and exported)")
    ap.add_argument("--data", default=None, help="training folder the model was trained on (calibration and gate)")
    ap.add_argument("--threads", type=int, default=cpu_count(), help="threads of every engine (default: the cores)")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the throughput figures (default 64)")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per variant and round (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, alternating variants (default 3)")
    ap.add_argument("--latency-iters", type=int, default=200, help="single-image calls per latency figure")
    ap.add_argument("--e2e-images", type=int, default=512, help="images of the end-to-end figures (default 512)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pneumoscan-int8-bench-") as tmp:
        tmp = Path(tmp)
        model = fp32_copy(args.model, tmp)
        conf = read_config(model)
        plan = plan_int8(model, args.data, QuantizeConfig())
        pre = Preprocess(PreprocessConfig.from_dict(conf["preprocess"]))
        size = pre.cfg.size
        cal = [x for _, x in _arrays(plan.calibration, pre, size)]
        graphs, gates, made = {"fp32": model / conf["onnx"]["file"]}, {}, {}
        for name, q in (("int8_ort", QuantizeConfig(quantiser="onnxruntime")), ("int8_nncf", QuantizeConfig(quantiser="nncf"))):
            graphs[name] = tmp / f"{name}.onnx"
            t = time.perf_counter()
            gates[name], _ = quantize_and_gate(model, conf, graphs[name], cal, plan.val, q)
            made[name] = round(time.perf_counter() - t, 1)
            print(f"{name}: quantised and gated in {made[name]} s; gate {gates[name]}", flush=True)
        # the Predictor runs the INT8 copy only from a model directory whose gate passed: give it one here
        # (the export's default quantiser's graph; the JSON keeps what its gate said)
        int8_dir = _int8_dir(model, graphs["int8_ort"], gates["int8_ort"], tmp)
        x = np.concatenate(cal)[: args.batch]
        runners = {"torch_eager": torch_runner(model, args.threads),
                   "ort_fp32": ort_runner(graphs["fp32"], args.threads),
                   "ort_fp32_shipped_graph": ort_runner(PACKAGE_MODEL / "model.onnx", args.threads),
                   "ort_int8_nncf": ort_runner(graphs["int8_nncf"], args.threads),
                   "ort_int8_ort": ort_runner(graphs["int8_ort"], args.threads)}
        try:
            runners["openvino_fp32"] = openvino_runner(graphs["fp32"], args.threads)
            runners["openvino_int8_ort"] = openvino_runner(graphs["int8_ort"], args.threads)
            runners["openvino_int8_nncf"] = openvino_runner(graphs["int8_nncf"], args.threads)
            if "BF16" in __import__("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                runners["openvino_fp32_graph_bf16"] = openvino_runner(graphs["fp32"], args.threads, "bf16")
        except ImportError:
            print("openvino is not installed (pip install 'pneumoscan[bench]'): its figures are skipped")
        agreement = {k: same_class(runners[k], runners["ort_fp32"], plan.val.paths, pre, args.batch)
                     for k in runners if k.startswith("openvino_fp32_graph_")}  # reduced arithmetic, not quantised
        files = (plan.val.paths * 2)[: args.e2e_images]
        rounds: dict[str, list[float]] = {k: [] for k in [*runners, "e2e_fp32", "e2e_int8"]}
        vnni = None  # precision is passed explicitly below; the flags are only read for the log
        for r in range(args.repeats):
            for k, fn in runners.items():
                rounds[k].append(throughput(fn, x, args.batches if k != "torch_eager" else max(1, args.batches // 2)))
            rounds["e2e_fp32"].append(end_to_end(int8_dir, "fp32", files, args.batch, args.threads, vnni))
            rounds["e2e_int8"].append(end_to_end(int8_dir, "int8", files, args.batch, args.threads, vnni))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rounds.items()), flush=True)
        med = {k: round(statistics.median(v), 1) for k, v in rounds.items() if v}
        jpegs = [Path(p).read_bytes() for p in plan.val.paths[:64]]
        lat = {"fp32": latency(int8_dir, "fp32", jpegs, args.latency_iters, args.threads, vnni),
               "int8": latency(int8_dir, "int8", jpegs, args.latency_iters, args.threads, vnni)}
        par = ort_runner(graphs["fp32"], args.threads, parallel=True)
        one = ort_runner(graphs["fp32"], args.threads)
        x1 = x[:1]
        lat["forward_fp32_batch1"] = percentiles(time_calls(lambda: one(x1), args.latency_iters, 10))
        lat["forward_fp32_batch1_members_in_parallel"] = percentiles(time_calls(lambda: par(x1), args.latency_iters, 10))
        ratios = {k: {"vs_torch_eager": round(v / med["torch_eager"], 2), "vs_ort_fp32_forward": round(v / med["ort_fp32"], 2)}
                  for k, v in med.items()}
        ratios["e2e_int8_vs_e2e_fp32"] = round(med["e2e_int8"] / med["e2e_fp32"], 2)
        ratios["e2e_fp32_vs_its_forward"] = round(med["e2e_fp32"] / med["ort_fp32"], 2)
        ratios["e2e_int8_vs_its_forward"] = round(med["e2e_int8"] / med["ort_int8_ort"], 2)
        ratios["ort_int8_vs_ort_fp32_forward"] = round(med["ort_int8_ort"] / med["ort_fp32"], 2)
        doc = {"model": conf.get("model_id"), "members": len(conf.get("members") or [None]), "size": size,
               "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
               "calibration_images": len(plan.calibration), "quantise_and_gate_seconds": made,
               "gates": gates, "images_per_s_median": med, "images_per_s_rounds": rounds, "ratios": ratios,
               "single_image_latency": lat, "e2e_images": len(files), "agreement_with_ort_fp32": agreement}
        path = write_result("int8", doc, args.out)
    print(f"medians (img/s): {med}")
    print(f"ratios: {ratios}")
    print(f"latency p50 ms: fp32 {lat['fp32']['p50_ms']}, int8 {lat['int8']['p50_ms']}; written {path}")
    return 0


def _int8_dir(model: Path, int8: Path, g: dict, tmp: Path) -> Path:
    """A copy of the model directory recording ``int8`` as its INT8 export with gate ``g`` marked passed, so that
    the Predictor's INT8 path can be timed whatever the gate said (the JSON keeps what it said)."""
    from pneumoscan.io import atomic_write_json, file_digest
    from pneumoscan.nets.modeldir import CONFIG_NAME, INT8_NAME

    d = tmp / "timed"
    d.mkdir()
    for p in model.iterdir():
        if p.is_file() and p.name != INT8_NAME:
            (d / p.name).symlink_to(p.resolve())
    (d / INT8_NAME).symlink_to(int8)
    conf = read_config(model)
    conf["files"][INT8_NAME] = file_digest(int8)
    conf["onnx"]["int8"] = {"file": INT8_NAME, "source_sha256": conf["files"][conf["onnx"]["file"]],
                            "weights": weight_range(QuantizeConfig().weight_range)[0],
                            "ood_threshold": (g.get("ood_threshold") or {}).get("int8"), "gate": {**g, "passed": True}}
    (d / CONFIG_NAME).unlink()
    atomic_write_json(d / CONFIG_NAME, conf)
    return d


if __name__ == "__main__":
    sys.exit(main())
