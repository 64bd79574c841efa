"""The INT8 copy of an export: ONNX Runtime's static quantiser, kept only if it passes a gate on validation.

:func:`export_int8` writes ``model.int8.onnx`` next to a model directory's fp32 ``model.onnx``:

1. the activation ranges are calibrated on a seeded sample of the model's *training* split
   (never the images the gate scores), decoded and preprocessed exactly as served;
2. a QDQ graph is made: u8 activations, s8 weights with one scale per output channel, the ``cam``
   branch left in fp32 (it is not on the decision path). The weights span -127..127 where the CPU
   has VNNI-class instructions, which compute that exactly, and -64..64 elsewhere, where ONNX
   Runtime's AVX2 kernels would saturate full-range sums (:func:`pneumoscan.runtime.weight_range`):
   the gate then measures what the served graph computes. It is made by
   ``onnxruntime.quantization.quantize_static`` (default; min-max, percentile or entropy calibration)
   or NNCF's post-training quantisation with fast bias correction. On the shipped ensemble NNCF
   keeps more verdicts identical (97.5 % vs 95.6 %), but ONNX Runtime fuses only a few of its
   convolutions into integer kernels (11 of 49 on Lite0) and runs the rest as fp32 convolutions of
   dequantised tensors, slower than fp32 (0.4x); ONNX Runtime's own graph runs 2.3x fp32
   (``benchmarks/int8.py``, README);
3. the guard is fitted on the calibration images (:class:`~pneumoscan.uncertainty.Int8Guard`): for each
   boundary a verdict can cross (the pneumonia threshold, bacterial against viral, the edges of the
   conformal set that make "uncertain: refer", the out-of-scope threshold) the ``guard_quantile``
   quantile of INT8's error on the image's distance to it. The predictor runs INT8 and sends back to
   the fp32 graph the images that lie within those margins of a boundary: far from every boundary
   INT8's error cannot change the verdict, near one fp32 answers. The out-of-scope gate's threshold
   is mapped to INT8 for that: quantisation noise adds to the squared feature distances, so INT8
   scores lie higher; the mean increase on the calibration images is added (:func:`int8_ood_threshold`);
4. the gate runs the fp32 graph and the served path (the INT8 graph with its guard) on the model's
   validation split: the normal-vs-pneumonia AUC may fall at most ``max_auc_drop`` below fp32's and
   at least ``min_agreement`` of the verdicts (the class, "uncertain: refer", or out of scope) must
   be identical; INT8 alone and the share of images the guard sends to fp32 are recorded beside
   it. Only then is the file kept (written atomically), its SHA-256 put in
   ``config.json["files"]`` and the gate's figures and the guard's margins in
   ``config.json["onnx"]["int8"]``; a model that fails gets :class:`Int8GateError` (one line with the
   figures) and nothing is written. A model whose guard sends too many images to fp32 to gain speed
   can be made quantisation-aware first (``pneumoscan qat``, :mod:`pneumoscan.train.qat`: a copy
   distilled from it under this quantiser's scheme, emulated) and exported again.

Torch-free: it reads the exported graph, never the PyTorch weights (NNCF is imported only when chosen).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..data.imaging import load_xray
from ..data.splits import EvalSet, calibration_sample, check_present, load_manifest, sample_path, validation_set
from ..errors import ImageError, ModelError
from ..io import atomic_path, atomic_write_json, file_digest
from ..labels import DEFAULT_THRESHOLD, LABELS, pneumonia_score, softmax
from ..metrics import _safe_auc
from ..nets.modeldir import CONFIG_NAME, INT8_NAME, has_onnx, int8_file, onnx_name, read_config, verify_file  # noqa: F401
from ..preprocess import Preprocess, PreprocessConfig
from ..runtime import INT8_FLAGS, cpu_count, int8_ready, memory_available, ort_session, weight_range
from ..uncertainty import (
    UNCERTAIN,
    Int8Guard,
    OODScorer,
    boundary_distances,
    calibrated_decision,
    decided_sets,
    decision_settings,
    model_calibration,
    ood_threshold,
    set_verdict,
    temperature_scale,
)
from .config import QuantizeConfig

log = logging.getLogger(__name__)

FEATURES = "features"  # the pooled features the out-of-scope gate reads
DECISION_OUTPUTS = ("logits", FEATURES)  # quantised; anything else (the cam branch) stays fp32
BATCH = 32  # images per gate / calibration batch


class Int8GateError(ModelError):
    """The INT8 graph differs too much from fp32 on the validation split: it was not kept."""


@dataclass
class Int8Plan:
    """What an INT8 export will read, checked before any work: validation and calibration images."""

    val: EvalSet  # the gate's images (the model's validation split)
    calibration: list[str]  # training-split images the activation ranges are fitted on
    train_images: int  # size of the training split the sample was drawn from


def plan_int8(model_dir: str | os.PathLike, data: str | os.PathLike | None, cfg: QuantizeConfig = QuantizeConfig()) -> Int8Plan:
    """The images an INT8 export needs, checked to be on this machine (:class:`DataError` otherwise)."""
    d = Path(model_dir)
    conf = read_config(d)
    val = validation_set(data, conf, d, can_force=False)  # the gate never runs on the model's training images
    check_present(val.paths, val.source)
    m = load_manifest(data, conf, d)
    train = [sample_path(m, s) for s in m.subset("train")]
    if not train:
        raise ModelError(f"{val.source} has no training split to calibrate on; pass --data with the training folder")
    cal = [train[i] for i in calibration_sample(len(train), cfg.calibration_images, cfg.seed)]
    check_present(cal, val.source)
    if has_onnx(d) and cfg.quantiser == "onnxruntime" and cfg.calibration in HISTOGRAM_CALIBRATIONS:
        import onnx

        check_calibration_memory(onnx.load(str(d / (onnx_name(conf) or "model.onnx"))), len(cal), cfg)
    return Int8Plan(val=val, calibration=cal, train_images=len(train))


def _arrays(paths: Sequence[str], pre: Preprocess, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices of the decodable paths, their preprocessed batch) in batches of :data:`BATCH`."""
    for start in range(0, len(paths), BATCH):
        idx, xs = [], []
        for i in range(start, min(start + BATCH, len(paths))):
            try:
                xs.append(pre.array(load_xray(paths[i], size_hint=size, colour=False).pixels))
                idx.append(i)
            except ImageError as e:
                log.warning("skipped %s: %s", paths[i], e)
        if xs:
            yield np.array(idx), np.stack(xs)


def _decision_nodes(model) -> set[str]:
    """Names of the nodes that the ``logits`` and ``features`` outputs depend on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    todo = [o.name for o in model.graph.output if o.name in DECISION_OUTPUTS]
    seen: set[str] = set()
    while todo:
        n = producer.get(todo.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        todo += list(n.input)
    return seen


HISTOGRAM_CALIBRATIONS = ("percentile", "entropy")  # ONNX Runtime keeps every activation of every image for these
MEMORY_SHARE = 0.8  # of the memory available, what the calibration may take


def activation_bytes(model) -> int:
    """Bytes of all intermediate fp32 tensors of one image through ``model`` (an onnx ModelProto):
    what ONNX Runtime's histogram calibrators hold per calibration image."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    m = shape_inference.infer_shapes(m)
    total = 0
    for vi in [*m.graph.value_info, *m.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims) and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            total += int(np.prod(dims)) * 4
    return total


def check_calibration_memory(model, images: int, cfg: QuantizeConfig, available: int | None = None) -> None:
    """Refuse, before the work, a histogram calibration (percentile, entropy) whose activations would not fit:
    ONNX Runtime keeps all of them for all images (512 images of Lite0 at 224 px: about 31 GiB)."""
    if cfg.quantiser != "onnxruntime" or cfg.calibration not in HISTOGRAM_CALIBRATIONS:
        return
    avail = memory_available() if available is None else available
    per = activation_bytes(model)
    need, budget = per * images, MEMORY_SHARE * avail
    if need > budget:
        fit = int(budget // per) if per else 0
        raise ModelError(f"--calibration {cfg.calibration} holds every activation of all {images} calibration images "
                         f"in memory (about {need / 2**30:.1f} GiB; {avail / 2**30:.1f} GiB available): use "
                         f"--calibration-images {fit} or fewer, or --calibration minmax")


def quantize_graph(src: str | os.PathLike, dst: str | os.PathLike, batches: Sequence[np.ndarray],
                   cfg: QuantizeConfig = QuantizeConfig()) -> None:
    """Static QDQ quantisation of ``src`` into ``dst``, activation ranges from ``batches`` (normalised inputs),
    by the quantiser ``cfg.quantiser`` names; nodes off the decision path stay fp32."""
    import onnx

    model = onnx.load(str(src))
    check_calibration_memory(model, sum(len(b) for b in batches), cfg)
    keep = _decision_nodes(model)
    fp32 = [n.name for n in model.graph.node if n.name not in keep]
    reduced = weight_range(cfg.weight_range)[0] == "reduced"
    if cfg.quantiser == "nncf":
        _nncf(model, dst, batches, fp32, reduced)
    else:
        _onnxruntime(src, dst, batches, fp32, cfg, reduced)


def _nncf(model, dst: str | os.PathLike, batches: Sequence[np.ndarray], fp32: list[str], reduced: bool) -> None:
    """NNCF's post-training quantisation of the ONNX graph (its ONNX backend), with fast bias correction:
    closer to fp32 than ONNX Runtime's min-max, but a graph ONNX Runtime runs slower than fp32 (see above).
    ``reduced``: 7-bit weights in every convolution and matrix product (NNCF's overflow fix); else in the
    first layer only (NNCF's default)."""
    try:
        import nncf
    except ImportError:
        raise ModelError("--quantiser nncf needs NNCF (pip install 'pneumoscan[int8]' or pip install nncf); "
                         "or use --quantiser onnxruntime") from None
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    images = [x[i:i + 1] for x in batches for i in range(len(x))]
    preset = nncf.QuantizationPreset.MIXED  # s8 symmetric weights, u8 asymmetric activations (what VNNI computes)
    fix = OverflowFix.ENABLE if reduced else OverflowFix.FIRST_LAYER
    q = nncf.quantize(model, nncf.Dataset(images, lambda x: {"input": np.ascontiguousarray(x, np.float32)}),
                      preset=preset, subset_size=len(images), fast_bias_correction=True,
                      ignored_scope=nncf.IgnoredScope(names=fp32, validate=False),
                      advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix))
    onnx.save(q, str(dst))


def _onnxruntime(src, dst: str | os.PathLike, batches: Sequence[np.ndarray], fp32: list[str],
                 cfg: QuantizeConfig, reduced: bool) -> None:
    """onnxruntime.quantization.quantize_static: u8 activations, s8 (per-channel) weights, QDQ;
    ``reduced``: weights -64..64 (``reduce_range``)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": np.ascontiguousarray(x, np.float32)}

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.calibration]
    with tempfile.TemporaryDirectory(prefix="pneumoscan-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # shapes + basic fusions first
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantiser logs one INFO line per rescaled bias to the root logger
        try:
            _quantize_static(prepared, dst, Reader(), fp32, method, cfg, reduced)
        finally:
            root.setLevel(level)


def _quantize_static(prepared: Path, dst, reader, fp32: list[str], method, cfg: QuantizeConfig, reduced: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                    reduce_range=reduced, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    nodes_to_exclude=fp32, extra_options={"CalibPercentile": cfg.percentile},
                    calibration_providers=["CPUExecutionProvider"])


def _verdicts(p: np.ndarray, feats: np.ndarray | None, conf: dict, ood: OODScorer | None,
              threshold: float | None, sets: bool = False) -> np.ndarray:
    """What a user would be told per image: the decided class index, or -1 when the learned gate stops it; with
    ``sets`` and conformal sets, :data:`REFER` for "uncertain: refer"."""
    k = calibrated_decision(p, conf)
    qhat = (conf.get("conformal") or {}).get("qhat")
    if sets and qhat is not None:  # the sets the predictor shows (the decided class always in its set)
        psets = decided_sets(temperature_scale(p, *model_calibration(conf)), float(conf.get("threshold", DEFAULT_THRESHOLD)),
                             qhat, conf["conformal"].get("method", "lac"))
        refer = np.array([set_verdict(LABELS[i], s) == UNCERTAIN for i, s in zip(k, psets)], bool)
        k = np.where(refer, REFER, k)
    if ood is not None and feats is not None:
        k = np.where(ood.score(feats) > threshold, -1, k)
    return k


REFER = len(LABELS)  # the verdict code of "uncertain: refer" in _verdicts


def _distances(p: np.ndarray, feats: np.ndarray | None, conf: dict, ood: OODScorer | None,
               threshold: float | None) -> np.ndarray:
    """:func:`boundary_distances` of raw probabilities ``p`` under the model's calibration, threshold and sets."""
    c = conf.get("conformal") or {}
    return boundary_distances(temperature_scale(p, *model_calibration(conf)), float(conf.get("threshold", DEFAULT_THRESHOLD)),
                              c.get("qhat"), c.get("method", "lac"),
                              None if ood is None or feats is None else ood.score(feats), threshold)


def int8_ood_threshold(s32: np.ndarray, s8: np.ndarray, threshold: float) -> float:
    """The out-of-scope threshold for INT8 features: fp32's ``threshold`` t as ``sqrt(t^2 + mean(s8^2 - s32^2))``,
    ``s32`` and ``s8`` the scores of the same images (the calibration images: training split, never the gate's)
    under fp32 and INT8. Quantisation noise adds to every squared Mahalanobis distance (on the shipped soup the
    INT8 scores of the validation images lay 1.2 above fp32's on average), so fp32's threshold would flag three
    times as many images."""
    shift = float(np.mean(np.asarray(s8, float) ** 2 - np.asarray(s32, float) ** 2))
    return float(np.sqrt(max(threshold * threshold + shift, 0.0)))


def _run(session, outs: list[str], batches: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, features or None) of ``session`` on ``batches``."""
    got = [session.run(outs, {"input": x}) for x in batches]
    p = np.concatenate([softmax(g[0]) for g in got])
    return p, (np.concatenate([g[1] for g in got]) if len(outs) > 1 else None)


def gate(model_dir: Path, conf: dict, int8_path: str | os.PathLike, val: EvalSet,
         cfg: QuantizeConfig = QuantizeConfig(), calibration: Sequence[np.ndarray] = ()) -> dict:
    """The fp32 and the served INT8 path side by side on the validation split: AUCs, verdict agreement, passed.

    With ``calibration`` (the batches the graph was calibrated on): a learned out-of-scope gate gets INT8's own
    threshold (:func:`int8_ood_threshold`, recorded as ``ood_threshold["int8"]``), and with ``cfg.guard_quantile``
    the :class:`~pneumoscan.uncertainty.Int8Guard` is fitted there (``guard``: its margins) and the served path
    is measured: INT8, and fp32 for the images the guard sends back (``guard.fp32_share``); INT8 alone is
    recorded beside it (``int8_alone``). Verdicts are what a user is told: the class, "uncertain: refer" where
    the model has conformal sets, or out of scope (``agreement``); ``class_agreement`` leaves the sets out."""
    pre = Preprocess(PreprocessConfig.from_dict(conf["preprocess"]))
    size = int(conf["preprocess"]["size"])
    fp32 = ort_session(verify_file(model_dir, onnx_name(conf), conf), threads=cpu_count())
    int8 = ort_session(int8_path, threads=cpu_count())
    outs = [o.name for o in fp32.get_outputs() if o.name in DECISION_OUTPUTS]
    # the learned out-of-scope gate, where the model has one and the graph gives its features
    scorer = (OODScorer.load(verify_file(model_dir, conf["ood"]["file"], conf))
              if conf.get("ood") and FEATURES in outs else None)
    t32 = t8 = ood_threshold(conf)
    guard = None
    if len(calibration):
        c32, c8 = _run(fp32, outs, calibration), _run(int8, outs, calibration)
        if scorer is not None:
            t8 = int8_ood_threshold(scorer.score(c32[1]), scorer.score(c8[1]), t32)
        if cfg.guard_quantile > 0:
            gap = t8 * t8 - t32 * t32 if scorer is not None else 0.0
            guard = Int8Guard.fit(_distances(*c32, conf, scorer, t32), _distances(*c8, conf, scorer, t8),
                                  cfg.guard_quantile, gap)
    parts = [(idx, _run(fp32, outs, [x]), _run(int8, outs, [x])) for idx, x in _arrays(val.paths, pre, size)]
    if not parts:
        raise ModelError(f"none of the {len(val)} validation images of {val.source} could be decoded")
    y = val.y[np.concatenate([i for i, _, _ in parts])]
    p32, p8 = (np.concatenate([part[k][0] for part in parts]) for k in (1, 2))
    f32, f8 = ((np.concatenate([part[k][1] for part in parts]) if len(outs) > 1 else None) for k in (1, 2))
    redo = np.zeros(len(y), bool)
    if guard is not None:  # what the predictor serves: fp32's answer where INT8's lies near a boundary
        redo = guard.needs_fp32(_distances(p8, f8, conf, scorer, t8))
    ps = np.where(redo[:, None], p32, p8)
    fs = None if f8 is None else np.where(redo[:, None], f32, f8)
    ts = t8 if guard is None else t32  # the guard's scope margin covers the gap between the two thresholds
    ypn = (y != 0).astype(int)
    auc32 = _safe_auc(ypn, pneumonia_score(p32))
    v32, c32 = _verdicts(p32, f32, conf, scorer, t32, sets=True), _verdicts(p32, f32, conf, scorer, t32)  # fp32's, once

    def figures(p, f, t) -> dict:
        auc8 = _safe_auc(ypn, pneumonia_score(p))
        v, c = _verdicts(p, f, conf, scorer, t, sets=True), _verdicts(p, f, conf, scorer, t)
        drop = auc32 - auc8 if np.isfinite(auc32) and np.isfinite(auc8) else None
        return {"auc_fp32": auc32 if np.isfinite(auc32) else None, "auc_int8": auc8 if np.isfinite(auc8) else None,
                "auc_drop": drop, "identical_verdicts": int((v32 == v).sum()), "agreement": float((v32 == v).mean()),
                "class_agreement": float((c32 == c).mean()),  # the class and the scope, sets left out
                "pneumonia_agreement": float(((c32 > 0) == (c > 0)).mean()),  # normal vs pneumonia only (context)
                "same_class": float((p32.argmax(1) == p.argmax(1)).mean()),
                "max_abs_prob_diff": float(np.abs(p32 - p).max()), "mean_abs_prob_diff": float(np.abs(p32 - p).mean()),
                **({"out_of_scope": {"fp32": int((c32 < 0).sum()), "int8": int((c < 0).sum())}} if scorer else {})}

    out = {"images": int(len(y)), "source": val.source, "split": val.split, "matches_model": val.matches_model,
           **figures(ps, fs, ts), "max_auc_drop": cfg.max_auc_drop, "min_agreement": cfg.min_agreement,
           "instruction_set": int8_ready() or f"none of {', '.join(INT8_FLAGS)}"}  # what computed the INT8 figures
    if guard is not None:
        out["guard"] = {"quantile": cfg.guard_quantile, "margins": guard.to_dict(), "fp32_share": float(redo.mean()),
                        "fp32_images": int(redo.sum())}
        out["int8_alone"] = figures(p8, f8, t8)
    if scorer is not None:
        out["ood_threshold"] = {"fp32": t32, "int8": t8}
    if f32 is not None:
        out["features_mean_rel_error"] = float((np.abs(f8 - f32).sum(1) / np.maximum(np.abs(f32).sum(1), 1e-12)).mean())
    drop = out["auc_drop"]
    out["passed"] = bool(out["agreement"] >= cfg.min_agreement and (drop is None or drop <= cfg.max_auc_drop))
    return out


def quantize_and_gate(model_dir: Path, conf: dict, dst: str | os.PathLike, batches: Sequence[np.ndarray], val: EvalSet,
                      cfg: QuantizeConfig = QuantizeConfig()) -> tuple[dict, float | None]:
    """Write the INT8 graph of the model's fp32 export to ``dst`` (calibrated on ``batches``) and run the gate on
    ``val``, with INT8's own out-of-scope threshold: (the gate's figures, that threshold or None). Writes nothing
    else."""
    quantize_graph(verify_file(model_dir, onnx_name(conf), conf), dst, batches, cfg)
    g = gate(model_dir, conf, dst, val, cfg, calibration=batches)
    return g, (g.get("ood_threshold") or {}).get("int8")


def gate_message(model_dir: Path, g: dict) -> str:
    """The one line that says why an INT8 copy was not kept."""
    auc = ("AUC not computable (one class)" if g["auc_drop"] is None else
           f"normal-vs-pneumonia AUC {g['auc_int8']:.4f} vs fp32 {g['auc_fp32']:.4f} (drop {g['auc_drop']:+.4f}, "
           f"allowed {g['max_auc_drop']:g})")
    guard = (f" with {g['guard']['fp32_share']:.1%} of the images run again in fp32 (--guard-quantile "
             f"{g['guard']['quantile']:g})" if "guard" in g else "")
    return (f"INT8 copy of {model_dir} failed the validation gate: {auc}, identical verdicts "
            f"{g['agreement']:.1%} of {g['images']}{guard} (needed {g['min_agreement']:.0%}); nothing was written, the "
            "fp32 export is unchanged (try a higher --guard-quantile, --calibration percentile, or a quantisation-aware "
            "copy: pneumoscan qat MODEL_DIR --out DIR)")


def export_int8(model_dir: str | os.PathLike, data: str | os.PathLike | None = None,
                cfg: QuantizeConfig = QuantizeConfig(), plan: Int8Plan | None = None,
                calibration: Sequence[np.ndarray] | None = None) -> dict:
    """Write ``model.int8.onnx`` if it passes the gate; returns the gate's figures (:class:`Int8GateError` if not).

    ``plan``: the images, checked already (:func:`plan_int8`); ``calibration``: preprocessed batches to
    calibrate on instead of the plan's training images (tests).
    """
    import onnxruntime

    d = Path(model_dir)
    conf = read_config(d)
    if not has_onnx(d):
        raise ModelError(f"{d} has no fp32 ONNX export to quantise; run 'pneumoscan export --model {d}' first")
    verify_file(d, onnx_name(conf), conf)  # a changed graph is refused before any image is decoded
    plan = plan or plan_int8(d, data, cfg)
    pre = Preprocess(PreprocessConfig.from_dict(conf["preprocess"]))
    t0 = time.perf_counter()
    batches = list(calibration) if calibration is not None else [x for _, x in _arrays(plan.calibration, pre,
                                                                                            pre.cfg.size)]
    weights, why = weight_range(cfg.weight_range)
    log.info("INT8 weights: %s range (%s)", weights, why)
    qat_range = _get_qat_range(conf)
    if qat_range is not None and qat_range != weights:
        log.warning("%s was made quantisation-aware for %s-range weights, but this export makes %s-range ones (%s); "
                    "its gate may be lower: pass --weight-range %s, or re-run pneumoscan qat with --weight-range %s",
                    d, qat_range, weights, why, qat_range, weights)
    with atomic_path(d / INT8_NAME) as tmp:
        g, t8 = quantize_and_gate(d, conf, tmp, batches, plan.val, cfg)
        t_quant = time.perf_counter() - t0
        if not g["passed"]:
            raise Int8GateError(gate_message(d, g))
        digest = file_digest(tmp)
    conf = read_config(d)  # re-read: keep anything written meanwhile
    conf["files"] = {**conf.get("files", {}), INT8_NAME: digest}
    conf["onnx"]["int8"] = {
        "file": INT8_NAME, "source_sha256": conf["files"][onnx_name(conf)], "format": "QDQ, u8 activations, s8 weights",
        "quantiser": _quantiser_version(cfg.quantiser), "onnxruntime": onnxruntime.__version__, **asdict(cfg),
        "calibrated_on": {"images": int(sum(len(b) for b in batches)), "split": "train", "of": plan.train_images,
                          "source": plan.val.source},
        "fp32_nodes": "the cam branch (not on the decision path)", "seconds": round(t_quant, 1),  # quantise and gate
        "weights": weights, "weights_why": why,  # reduced: exact on any CPU (see pneumoscan.runtime.weight_range)
        "ood_threshold": t8, "gate": g,
        # the predictor runs again in fp32 the images whose INT8 outputs lie within these margins of a boundary
        "guard": {"quantile": cfg.guard_quantile, "margins": g["guard"]["margins"]} if "guard" in g else None,
        "decision": decision_settings(conf),  # the gate and the guard hold for these (re-calibrating voids them)
    }
    atomic_write_json(d / CONFIG_NAME, conf)
    log.info("kept %s: AUC %s vs fp32 %s, %.2f %% identical verdicts", d / INT8_NAME, g["auc_int8"], g["auc_fp32"],
             100 * g["agreement"])
    return g


def _get_qat_range(conf: dict) -> str | None:
    """The weight range a quantisation-aware copy was trained for (None: not such a copy, or an older one)."""
    r = ((conf.get("qat") or {}).get("config") or {}).get("weight_range")
    return r if r in ("full", "reduced") else None


def _quantiser_version(name: str) -> str:
    if name == "nncf":
        import nncf

        return f"nncf {nncf.__version__} (post-training quantisation, fast bias correction)"
    import onnxruntime

    return f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}"
