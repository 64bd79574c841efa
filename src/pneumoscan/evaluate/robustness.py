"""Robustness report: how much each metric drops under synthetic acquisition shifts.

On the model's validation split (or all images of data without one) every image is decoded
once; each shift (contrast, gamma, blur, noise, lower resolution) is applied in memory to the
decoded 8-bit gray image, *before* the model's own preprocessing, and the shifted images are
scored in batches through :meth:`Predictor.probabilities`. This is a proxy for data the model
has not seen (another scanner, exposure or resolution), not a substitute for a real test set.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .. import INTENDED_USE
from ..data.imaging import load_xray
from ..data.splits import EvalSet, check_present, validation_set
from ..errors import DataError, ImageError, PneumoscanError
from ..io import atomic_write, atomic_write_json, atomic_write_text, json_safe
from ..metrics import compute_metrics
from ..nets.modeldir import has_onnx, read_config, resolve_model_dir
from ..plots import plot_bars
from ..predict import Predictor
from .config import RobustnessConfig

log = logging.getLogger(__name__)

ONNX_MIN_IMAGES = 128  # backend "auto" exports a model without ONNX only for at least this many images
KINDS = ("identity", "contrast", "gamma", "blur", "noise", "down_up", "up_from")


@dataclass(frozen=True)
class Shift:
    """One synthetic shift of a uint8 gray image; ``value`` is the factor, sigma or side in px."""

    kind: str  # one of KINDS
    value: float = 0.0  # contrast factor, gamma, blur sigma (px), noise sigma (0-255), or target side (px)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PneumoscanError(f"shift {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.kind != "identity" and not self.value > 0:
            raise PneumoscanError(f"shift {self.kind} needs a positive value (got {self.value})")

    @property
    def name(self) -> str:
        return "identity" if self.kind == "identity" else f"{self.kind} {self.value:g}"

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k, v = self.kind, self.value
        if k == "identity":
            return gray
        if k == "contrast":  # stretch around the image's mean brightness
            m = float(gray.mean())
            return _u8((gray.astype(np.float32) - m) * v + m)
        if k == "gamma":
            lut = np.clip(255.0 * (np.arange(256) / 255.0) ** v + 0.5, 0, 255).astype(np.uint8)
            return lut[gray]
        if k == "blur":
            return cv2.GaussianBlur(gray, (0, 0), sigmaX=v, sigmaY=v, borderType=cv2.BORDER_REFLECT)
        if k == "noise":
            return _u8(gray.astype(np.float32) + rng.normal(0.0, v, gray.shape).astype(np.float32))
        small = _shrink(gray, int(v))  # down_up / up_from: the detail of a `v` px image
        if k == "up_from":  # arrives at low resolution; the model's preprocessing upsamples it
            return small
        return cv2.resize(small, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)


def _shrink(gray: np.ndarray, side: int) -> np.ndarray:
    """Downscale (area) so that the shorter side is ``side`` px; smaller images are kept."""
    h, w = gray.shape
    s = side / min(h, w)
    if s >= 1.0:
        return gray
    return cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


DEFAULT_SHIFTS: tuple[Shift, ...] = (
    Shift("contrast", 0.6), Shift("contrast", 1.4),
    Shift("gamma", 0.6), Shift("gamma", 1.6),
    Shift("blur", 1), Shift("blur", 2),
    Shift("noise", 5), Shift("noise", 15),
    Shift("down_up", 128), Shift("up_from", 128),
)

# flat figures of the report: name -> (section of compute_metrics, key)
SUMMARY = {
    "accuracy_3class": ("three_class", "accuracy"),
    "macro_f1": ("three_class", "macro_f1"),
    "pneumonia_accuracy": ("normal_vs_pneumonia", "accuracy"),
    "sensitivity": ("normal_vs_pneumonia", "sensitivity"),
    "specificity": ("normal_vs_pneumonia", "specificity"),
    "pneumonia_auc": ("normal_vs_pneumonia", "auc"),
    "bv_accuracy": ("bacterial_vs_viral", "accuracy"),
    "bv_auc": ("bacterial_vs_viral", "auc"),
}
HEADERS = {"accuracy_3class": "3-class acc", "macro_f1": "macro F1", "pneumonia_accuracy": "N/P acc",
           "sensitivity": "sens", "specificity": "spec", "pneumonia_auc": "N/P AUC", "bv_accuracy": "B/V acc",
           "bv_auc": "B/V AUC"}


def summarize(m: dict) -> dict[str, float | None]:
    out = {}
    for name, (sec, key) in SUMMARY.items():
        v = m[sec][key]
        out[name] = None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)
    return out


def decode_all(paths: Sequence[str], size: int, progress: bool = False) -> tuple[list[np.ndarray], list[int], list]:
    """Decode every image once: (gray images, kept indices, [(path, error)]).

    Images much larger than the model input are first reduced (area) to a shorter side of
    ``2 * size`` so that a whole validation split fits in memory; shifts act on that image.
    """
    from tqdm.auto import tqdm

    images, kept, errors = [], [], []
    for i, p in enumerate(tqdm(paths, desc="decode", unit="img", disable=not progress)):
        try:
            g = load_xray(p, size_hint=size, colour=False).pixels
        except ImageError as e:
            errors.append((p, str(e)))
            continue
        images.append(_shrink(g, 2 * size))
        kept.append(i)
    return images, kept, errors


def shifted_probabilities(predictor: Predictor, images: Sequence[np.ndarray], shift: Shift, seed: int,
                          batch_size: int = 64) -> np.ndarray:
    """Probabilities of every image under ``shift`` (noise seeded by ``seed`` and the shift's name)."""
    rng = np.random.default_rng([seed, zlib.crc32(shift.name.encode())])
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([predictor.pre.array(shift(g, rng)) for g in images[start:start + batch_size]])
        out.append(predictor.probabilities(batch))
    return np.concatenate(out)


def robustness(data: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike | None = None,
               cfg: RobustnessConfig = RobustnessConfig(), *, shifts: Sequence[Shift] = DEFAULT_SHIFTS,
               progress: bool = False, predictor: Predictor | None = None) -> dict:
    """Score the model's validation split clean and under each shift; write the report to ``out``.

    Returns the ``robustness.json`` dictionary. ``drop`` is clean minus shifted (positive = worse).
    """
    t0 = time.time()
    d = predictor.model_dir if predictor is not None else resolve_model_dir(model)
    ev = validation_set(data, predictor.config if predictor is not None else read_config(d), d,
                        allow_unsplit=True)
    log.info("robustness on %r", ev)
    check_present(ev.paths, f"the {'validation split' if ev.split == 'val' else 'images'} of {ev.source}")
    pred = predictor or _predictor(d, cfg.backend, len(ev))
    try:
        return _run(pred, ev, out, shifts, cfg.seed, cfg.batch_size, cfg.n_boot, progress, t0)
    finally:
        if predictor is None:
            pred.close()


def _predictor(d: Path, backend: str, n_images: int) -> Predictor:
    """The requested engine; ``auto``: ONNX Runtime (about 4x faster than PyTorch eager for
    EfficientNet-Lite0 on a 2-core CPU) from the model's export, or, for at least
    ``ONNX_MIN_IMAGES`` images, from a parity-checked temporary export; else PyTorch."""
    if backend != "auto" or has_onnx(d):
        return Predictor(d, backend=backend)
    if n_images < ONNX_MIN_IMAGES:
        return Predictor(d, backend="torch")
    try:
        return Predictor(d, backend="onnx", export_missing=True)
    except (PneumoscanError, OSError) as e:
        log.warning("robustness runs in PyTorch (no ONNX Runtime export: %s)", e)
        return Predictor(d, backend="torch")


def _run(pred: Predictor, ev: EvalSet, out, shifts: Sequence[Shift], seed: int, batch_size: int, n_boot: int,
         progress: bool, t0: float) -> dict:
    images, kept, errors = decode_all(ev.paths, pred.prep_cfg.size, progress)
    if not images:
        raise DataError(f"none of the {len(ev)} images of {ev.source} could be decoded")
    y = ev.y[kept]
    conditions = [("clean", Shift("identity"))] + [(s.name, s) for s in shifts]
    rows = []
    clean = None
    for name, shift in conditions:
        t = time.time()
        probs = shifted_probabilities(pred, images, shift, seed, batch_size)
        m = compute_metrics(y, probs, pred.threshold, n_boot=n_boot, seed=seed)
        s = summarize(m)
        if clean is None:
            clean = s
        drop = {k: (None if s[k] is None or clean[k] is None else clean[k] - s[k]) for k in s}
        rows.append({"name": name, "kind": shift.kind, "value": shift.value, "summary": s, "drop": drop,
                     "metrics": m, "seconds": round(time.time() - t, 1)})
        log.info("%-14s 3-class acc %.3f  N/P AUC %s  (%.1f s)", name, s["accuracy_3class"],
                 "–" if s["pneumonia_auc"] is None else f"{s['pneumonia_auc']:.4f}", time.time() - t)
    report = _report(pred, ev, rows, errors, seed, n_boot, time.time() - t0)
    write_report(report, out)
    return report


def _report(pred: Predictor, ev: EvalSet, rows: list[dict], errors: list, seed: int, n_boot: int,
            seconds: float) -> dict:

    shifted = rows[1:]
    worst = {}
    for k in SUMMARY:
        cand = [(r["drop"][k], r["name"]) for r in shifted if r["drop"][k] is not None]
        if cand:
            d, n = max(cand)
            worst[k] = {"shift": n, "drop": d}
    return json_safe({
        "intended_use": INTENDED_USE,
        "model": {"id": pred.model_id, "dir": str(pred.model_dir), "backend": pred.backend,
                  "threshold": pred.threshold, "input_size": pred.prep_cfg.size},
        "data": {"source": ev.source, "split": ev.split, "n": len(ev) - len(errors), "failed_to_decode": len(errors),
                 "manifest_sha256": ev.manifest_sha256, "matches_model_manifest": ev.matches_model,
                 "in_model_training_split": ev.training_overlap},
        "seed": seed,
        "n_boot": n_boot,
        "metrics": list(SUMMARY),
        "conditions": rows,
        "worst_drop": worst,
        "seconds": round(seconds, 1),
    })


def write_report(report: dict, out: str | os.PathLike) -> Path:
    """robustness.json, robustness.csv, robustness.md and robustness.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "robustness.json", report)
    keys = report["metrics"]
    with atomic_write(out / "robustness.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "kind", "value", *keys, *[f"drop_{k}" for k in keys]])
        for r in report["conditions"]:
            w.writerow([r["name"], r["kind"], r["value"], *[_num(r["summary"][k]) for k in keys],
                        *[_num(r["drop"][k]) for k in keys]])
    names = [r["name"] for r in report["conditions"]]
    series = {HEADERS[k]: [r["summary"][k] if r["summary"][k] is not None else float("nan")
                           for r in report["conditions"]]
              for k in ("accuracy_3class", "sensitivity", "specificity", "pneumonia_auc", "bv_auc")}
    data = report["data"]
    what = ("the model's validation split" if data["split"] == "val" and data.get("matches_model_manifest")
            else "the validation split of another manifest" if data["split"] == "val" else "all images of the data")
    if data.get("in_model_training_split"):
        what += f" ({data['in_model_training_split']} of them in the model's training split)"
    plot_bars(names, series, out / "robustness.png", title=f"{report['model']['id']} under shifts, on {what}")
    atomic_write_text(out / "robustness.md", markdown(report))
    return out


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _cell(v, d) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if d is None or abs(d) < 5e-4 else f"{v:.3f} ({-d:+.3f})"


def _provenance(d: dict) -> str:
    if d["matches_model_manifest"]:
        return ""
    k = d.get("in_model_training_split")
    return ("; not the model's manifest, overlap with its training split unknown" if k is None
            else f"; {k} of these images are in the model's training split" if k else "")


def markdown(report: dict) -> str:
    """The table: each metric under each shift, and its change from clean in brackets."""
    keys = report["metrics"]
    d = report["data"]
    lines = [
        "# pneumoscan robustness report",
        "",
        f"> {report['intended_use']}",
        "",
        f"Model `{report['model']['id']}` (threshold {report['model']['threshold']:.3f}) on {d['n']} images "
        f"({'validation split' if d['split'] == 'val' else 'all images'} of `{d['source']}`"
        f"{_provenance(d)}). "
        "Shifts act on the decoded 8-bit image before the model's preprocessing; "
        f"noise is seeded ({report['seed']}). In brackets: change from clean.",
        "",
        "| condition | " + " | ".join(HEADERS[k] for k in keys) + " |",
        "| --- |" + " --- |" * len(keys),
    ]
    for r in report["conditions"]:
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r["summary"][k], r["drop"][k] if r["name"] != "clean"
                                                            else None) for k in keys) + " |")
    if report["worst_drop"]:
        lines += ["", "Largest drop per metric: " + "; ".join(
            f"{HEADERS[k]} {-w['drop']:+.3f} under {w['shift']}" for k, w in report["worst_drop"].items()) + "."]
    lines += ["", "![metrics under each shift](robustness.png)", "",
              f"N/P: normal vs pneumonia; B/V: bacterial vs viral (pneumonia images only). {report['seconds']:.0f} s.",
              ""]
    return "\n".join(lines)
