"""Score every image under a folder with a model and write metrics.json, plots and a report."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from .. import INTENDED_USE
from ..data.index import content_sha1, scan
from ..errors import DataError
from ..io import atomic_write, atomic_write_json, atomic_write_text, json_safe
from ..labels import LABELS
from ..metrics import N_BOOT, compute_metrics, roc_points
from ..nets.modeldir import read_config, resolve_model_dir
from ..plots import plot_confusion, plot_roc
from ..predict import Predictor
from .config import EvaluateConfig

log = logging.getLogger(__name__)


def is_frozen(config: dict) -> bool:
    """A frozen ImageNet backbone + trained head: its features are cacheable."""
    return (config.get("kind", "single") == "single" and config.get("finetuned") is False
            and bool(config.get("weights_source")))


def evaluate(data: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike | None = None,
             cfg: EvaluateConfig = EvaluateConfig(), *, progress: bool = True,
             predictor: Predictor | None = None) -> dict:
    """Evaluate ``model`` on all labelled images under ``data`` (no split); returns the metrics.

    ``backend`` "auto" scores a frozen-backbone model through the feature cache (only its head
    runs for images seen before) and any other model on its fastest verified engine.
    ``prevalence``: the expected share of pneumonia; probabilities are prior-shift corrected.
    """
    found, skipped = scan(data)
    if not found:
        raise DataError(f"no labelled images under {data}: expected NORMAL/ and PNEUMONIA/ "
                        "(or normal/ bacterial/ viral/) folders")
    backend = cfg.backend
    if predictor is None and backend == "auto" and cfg.use_cache and is_frozen(read_config(resolve_model_dir(model))):
        backend = "torch"  # the cached features plus the head: faster than any full-image engine
    pred = predictor or Predictor(model, backend=backend, prevalence=cfg.prevalence)
    items = [(str(p), lab) for p, lab, _ in found]
    try:
        return evaluate_items(items, out, pred, data_root=str(Path(data).resolve()), skipped=skipped,
                              cache_dir=cfg.cache if cfg.use_cache else False, batch_size=cfg.batch_size,
                              progress=progress, n_boot=cfg.n_boot)
    finally:
        if predictor is None:
            pred.close()


def evaluate_items(items: list[tuple[str, str]], out: str | os.PathLike, pred: Predictor, *, data_root: str = "",
                   skipped=(), batch_size: int = 32, progress: bool = True, n_boot: int = N_BOOT,
                   cache_dir: str | os.PathLike | None | bool = None) -> dict:
    """Evaluate ``(path, label)`` pairs (e.g. a manifest's validation split) and write the outputs.

    A frozen-backbone model (head on ImageNet features) is scored through the feature cache that
    ``extract``/``train`` fill, so only the head runs for images seen before; ``cache_dir=False``
    forces full-image inference through the predictor.
    """
    paths = [p for p, _ in items]
    truth = {p: LABELS.index(lab) for p, lab in items}
    if cache_dir is not False and frozen_features_ok(pred):
        preds, errors = predict_from_feature_cache(pred, paths, cache_dir or None, progress)
    else:
        preds, errors = pred.predict_files(paths, batch_size=batch_size, progress=progress)
    if not preds:
        raise DataError(f"none of the {len(paths)} images under {data_root or 'the given list'} could be decoded")
    y = np.array([truth[p.path] for p in preds])
    probs = np.array([[p.probabilities[lab] for lab in LABELS] for p in preds])
    metrics = compute_metrics(y, probs, pred.threshold, n_boot=n_boot)
    metrics["model"] = {"id": pred.model_id, "dir": str(pred.model_dir), "backend": pred.backend,
                        "prevalence": pred.prevalence}
    metrics["data"] = {"root": data_root, "skipped": len(skipped), "failed_to_decode": len(errors)}
    metrics = json_safe(metrics)
    out = Path(out)
    atomic_write_json(out / "metrics.json", metrics)
    plot_confusion(metrics["confusion_matrix"], out / "confusion_matrix.png")
    plot_roc(roc_points(y, probs), out / "roc.png")
    _write_predictions(out / "predictions.csv", preds, truth)
    atomic_write_text(out / "report.md", report_markdown(metrics, skipped, errors))
    return metrics


def frozen_features_ok(pred: Predictor) -> bool:
    """True when the model is a frozen backbone + head scored in PyTorch (features are cacheable)."""
    return pred.backend == "torch" and is_frozen(pred.config)


def predict_from_feature_cache(pred: Predictor, paths: list[str], cache_dir, progress: bool):
    """Predictions of a frozen model from cached (or newly cached) backbone features + its head."""
    import torch

    from ..features.extract import extract_features

    class _S:  # the two attributes extract_features reads
        __slots__ = ("path", "sha1")

        def __init__(self, path: str) -> None:
            self.path, self.sha1 = path, content_sha1(path)

    samples = [_S(p) for p in paths]
    c = pred.config
    prep = pred.prep_cfg
    feats, ok, info = extract_features(samples, c["backbone"], size=prep.size, intensity=prep.intensity,
                                       cache_dir=cache_dir, progress=progress, net=pred.net.backbone,
                                       weights_id=c["weights_source"])
    with torch.inference_mode():
        probs = pred.net.head.eval()(torch.from_numpy(feats[ok])).softmax(-1).numpy()
    probs = pred._adjust(probs)
    kept = [p for p, k in zip(paths, ok) if k]
    preds = [pred.result(p, pr) for p, pr in zip(kept, probs)]
    errors = [(path, err) for path, err in info["failed"]]
    return preds, errors


def _write_predictions(path: Path, preds, truth) -> None:
    with atomic_write(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", *[f"p_{lab}" for lab in LABELS], "pneumonia"])
        for p in preds:
            w.writerow([p.path, LABELS[truth[p.path]], p.label,
                        *[f"{p.probabilities[lab]:.6f}" for lab in LABELS], int(p.pneumonia)])


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def report_markdown(m: dict, skipped=(), errors=()) -> str:
    """A short human-readable report of a metrics dictionary."""
    nvp = m["normal_vs_pneumonia"]
    ci = nvp.get("ci95", {})
    lines = [
        "# pneumoscan evaluation",
        "",
        f"> {INTENDED_USE}",
        "",
        f"Model `{m.get('model', {}).get('id', '?')}` on {m['n']} images "
        f"(threshold {nvp['threshold']:.3f}; {len(skipped)} files skipped, {len(errors)} failed to decode).",
        "",
        "| task | accuracy | sensitivity | specificity | F1 | AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in (("normal_vs_pneumonia", "normal vs pneumonia"), ("bacterial_vs_rest", "bacterial vs rest"),
                      ("viral_vs_rest", "viral vs rest"), ("bacterial_vs_viral", "bacterial vs viral")):
        b = m[key]
        lines.append(f"| {name} | {_fmt(b['accuracy'])} | {_fmt(b['sensitivity'])} | {_fmt(b['specificity'])} "
                     f"| {_fmt(b['f1'])} | {_fmt(b['auc'])} |")
    lines += [
        "",
        f"3-class accuracy {_fmt(m['three_class']['accuracy'])}, macro F1 {_fmt(m['three_class']['macro_f1'])}.",
        "",
        "95 % bootstrap intervals (normal vs pneumonia): "
        + ", ".join(f"{k} [{_fmt(v[0])}, {_fmt(v[1])}]" for k, v in ci.items()),
        "",
        "Confusion matrix (rows true, columns predicted: " + ", ".join(m["labels"]) + "):",
        "",
        "| | " + " | ".join(m["labels"]) + " |",
        "| --- |" + " --- |" * len(m["labels"]),
    ]
    for lab, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "![confusion matrix](confusion_matrix.png) ![ROC](roc.png)", ""]
    if errors:
        lines += ["Files that failed to decode:", ""] + [f"- {p}: {e}" for p, e in errors[:50]] + [""]
    return "\n".join(lines)
