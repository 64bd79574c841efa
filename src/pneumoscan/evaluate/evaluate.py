"""Score every image under a folder with a model and write metrics.json, plots and a report."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from .. import INTENDED_USE, __version__
from ..data.index import content_sha1, scan
from ..data.splits import training_overlap
from ..errors import DataError
from ..io import atomic_write, atomic_write_json, atomic_write_text, json_safe, staged_dir
from ..labels import LABELS, NORMAL, decide, pneumonia_score
from ..metrics import N_BOOT, brier_score, calibration_error, compute_metrics, risk_coverage, roc_points
from ..nets.modeldir import read_config, resolve_model_dir
from ..plots import plot_calibration, plot_confusion, plot_reliability, plot_risk_coverage, plot_roc, plot_threshold
from ..predict import BlankImageError, Predictor
from ..uncertainty import UNCERTAIN, set_verdict, temperature_scale
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
    found, skipped = scan(data, exclude=out)  # a report written inside the data is not read back as X-rays
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
    forces full-image inference through the predictor. Images that are in the model's own training
    split (by content) are counted and reported in every output: such figures are not a test.
    The outputs are written together or not at all.
    """
    paths = [p for p, _ in items]
    truth = {p: LABELS.index(lab) for p, lab in items}
    if cache_dir is not False and frozen_features_ok(pred):
        preds, errors = predict_from_feature_cache(pred, paths, cache_dir or None, progress)
    else:
        preds, errors = pred.predict_files(paths, batch_size=batch_size, progress=progress)
    if not preds:
        raise DataError(f"none of the {len(paths)} images under {data_root or 'the given list'} could be decoded"
                        + (f" ({errors[0][1]})" if errors else ""))
    y = np.array([truth[p.path] for p in preds])
    probs = np.stack([p.scores for p in preds])  # every decoded image, the gate's too: nothing is hidden
    metrics = compute_metrics(y, probs, pred.threshold, n_boot=n_boot)
    metrics.update(abstention(y, probs, preds, pred))
    metrics["model"] = {"id": pred.model_id, "dir": str(pred.model_dir), "backend": pred.backend,
                        "prevalence": pred.prevalence}
    metrics["data"] = {"root": data_root, "skipped": len(skipped), "failed_to_decode": len(errors),
                       "not_scored": not_scored(skipped, errors)}
    metrics["training_overlap"] = _overlap([p.path for p in preds], pred.model_dir)
    if metrics["training_overlap"]["n"]:
        log.warning("%s", overlap_sentence(metrics))
    metrics = json_safe(metrics)
    with staged_dir(out) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        plot_confusion(metrics["confusion_matrix"], tmp / "confusion_matrix.png")
        score = pneumonia_score(probs)
        nvp = metrics["normal_vs_pneumonia"]
        op = (1 - nvp["specificity"], nvp["sensitivity"], pred.threshold) \
            if nvp["specificity"] is not None and nvp["sensitivity"] is not None else None
        plot_roc(roc_points(y, probs), tmp / "roc.png", operating_point=op)
        plot_threshold(y != NORMAL, score, pred.threshold, tmp / "threshold.png")
        plot_calibration(y != NORMAL, score, tmp / "calibration.png")
        cal = metrics["calibration"]
        plot_reliability(y, {"as scored": probs} if cal["uncalibrated"] is None else
                         {f"before scaling (ECE {cal['uncalibrated']['ece']:.3f})": uncalibrated(probs, pred),
                          f"after, T = {cal['temperature']:.2f}{' + class bias' if pred.class_bias else ''} "
                          f"(ECE {cal['ece']:.3f})": probs}, tmp / "reliability.png")
        rc = risk_coverage_curve(y, probs, pred.threshold)
        plot_risk_coverage(rc[:, 0], rc[:, 1], tmp / "risk_coverage.png")
        _write_predictions(tmp / "predictions.csv", preds, truth)
        atomic_write_text(tmp / "report.md", report_markdown(metrics))
        atomic_write_text(tmp / "report.html", report_html(metrics, tmp, preds, truth, pred))
    return metrics


def uncalibrated(probs: np.ndarray, pred: Predictor) -> np.ndarray | None:
    """The network's probabilities before the model's temperature and class bias (exact: log q = log p / T + b
    up to a constant, so softmax(T log q - T b) = p); None when a prior shift was applied on top."""
    if pred.prevalence is not None:
        return None
    bias = None if pred.class_bias is None else [-pred.temperature * b for b in pred.class_bias]
    return temperature_scale(probs, 1.0 / pred.temperature, bias)


def risk_coverage_curve(y: np.ndarray, probs: np.ndarray, threshold: float, steps: int = 51) -> np.ndarray:
    """(share answered, 3-class accuracy) rows from all images down to half of them."""
    pts = risk_coverage(y, probs, threshold, tuple(np.linspace(0.0, 0.5, steps)))
    return np.array([[1 - r["abstain"], r["accuracy_3class"]] for r in pts])


def abstention(y: np.ndarray, probs: np.ndarray, preds: list, pred: Predictor) -> dict:
    """How well the model knows when not to answer: the gate's share and reasons, calibration before
    and after the temperature, conformal coverage and set size per true class, and accuracy when the
    least confident 5 / 10 / 20 % are left out."""
    from collections import Counter

    in_scope = np.array([p.in_scope for p in preds])
    reasons = Counter(r.split(" (")[0] for p in preds for r in p.reasons)
    decided = decide(probs, pred.threshold)
    out: dict = {"gate": {
        "n": len(preds), "flagged": int((~in_scope).sum()), "share_flagged": float((~in_scope).mean()),
        "reasons": dict(reasons.most_common(6)), "learned_score": pred.ood is not None,
        "ood_threshold": pred.ood_threshold,
        "accuracy_3class_in_scope": float((decided[in_scope] == y[in_scope]).mean()) if in_scope.any() else None}}
    raw = uncalibrated(probs, pred)
    out["calibration"] = {
        "temperature": pred.temperature, "class_bias": pred.class_bias,
        "ece": calibration_error(y, probs), "brier": brier_score(y, probs),
        "uncalibrated": None if raw is None or (pred.temperature == 1.0 and pred.class_bias is None) else
        {"ece": calibration_error(y, raw), "brier": brier_score(y, raw)}}
    if pred.qhat is not None:
        sets = pred.prediction_sets(probs)
        covered = np.array([LABELS[t] in st for st, t in zip(sets, y)])
        size = np.array([len(st) for st in sets])
        refer = np.array([set_verdict(LABELS[k], st) == UNCERTAIN for st, k in zip(sets, decided)])
        out["conformal"] = {
            "alpha": pred.config["conformal"]["alpha"], "target_coverage": 1 - pred.config["conformal"]["alpha"],
            "coverage": float(covered.mean()), "mean_set_size": float(size.mean()), "share_refer": float(refer.mean()),
            "by_class": {lab: {"n": int((y == i).sum()), "coverage": float(covered[y == i].mean()),
                               "mean_set_size": float(size[y == i].mean())}
                         for i, lab in enumerate(LABELS) if (y == i).any()}}
    else:
        out["conformal"] = None
    out["risk_coverage"] = risk_coverage(y, probs, pred.threshold)
    return out


def _overlap(paths: list[str], model_dir) -> dict:
    """How many of the scored images are in the model's training split (by content hash)."""
    class _S:
        __slots__ = ("sha1",)

        def __init__(self, path: str) -> None:
            self.sha1 = content_sha1(path)

    n = training_overlap([_S(p) for p in paths], model_dir)
    return {"n": n or 0, "of": len(paths), "checked": n is not None}


def overlap_sentence(metrics: dict) -> str:
    o = metrics.get("training_overlap") or {}
    return (f"{o.get('n')} of the {o.get('of')} images scored are in this model's training split: the figures are "
            "optimistic and are not an independent test")


def frozen_features_ok(pred: Predictor) -> bool:
    """True when the model is a frozen backbone + head scored in PyTorch (features are cacheable)."""
    return pred.backend == "torch" and is_frozen(pred.config)


def cached_arrays(pred: Predictor, paths: list[str], cache_dir, progress: bool):
    """(calibrated probabilities, pooled features, kept paths, [(path, error)]) of a frozen model from
    cached (or newly cached) backbone features and its head: the backbone runs once per image, ever."""
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
    kept = [p for p, k in zip(paths, ok) if k]
    return pred._adjust(probs), feats[ok], kept, [(path, err) for path, err in info["failed"]]


def predict_from_feature_cache(pred: Predictor, paths: list[str], cache_dir, progress: bool):
    """Predictions of a frozen model from cached (or newly cached) backbone features + its head."""
    probs, feats, kept, errors = cached_arrays(pred, paths, cache_dir, progress)
    preds = []
    scores = pred.ood.score(feats) if pred.ood is not None and len(feats) else [None] * len(kept)  # one call
    for path, pr, score in zip(kept, probs, scores):  # the gate as on every other path: image checks, then features
        try:
            reasons, warns = pred.screen(pred.decode(path))
        except BlankImageError as e:
            reasons, warns = [str(e)], []
        except Exception as e:  # decoded once already by the extractor: a failure here is only noted
            reasons, warns = [], [f"image checks not run: {e}"]
        preds.append(pred.result(path, pr, reasons, warns, score=score))
    return preds, errors


def _write_predictions(path: Path, preds, truth) -> None:
    with atomic_write(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", *[f"p_{lab}" for lab in LABELS], "pneumonia", "in_scope", "verdict",
                    "prediction_set", "ood_score", "reasons"])
        for p in preds:
            called = p.predicted
            w.writerow([p.path, LABELS[truth[p.path]], called, *[f"{v:.6f}" for v in p.scores],
                        int(called != LABELS[NORMAL]), int(p.in_scope), p.verdict, "|".join(p.prediction_set or []),
                        "" if p.ood_score is None else f"{p.ood_score:.3f}", " | ".join(p.reasons)])


def not_scored(skipped=(), errors=()) -> list[dict[str, str]]:
    """Every file under the data that has no prediction, and why: ``{"path", "stage", "reason"}``, where
    stage is "skipped" (not an image, no class in its name) or "failed to decode"."""
    def reason(path: str, err: str) -> str:  # the decoder's message often names the file already
        return err[len(path) + 2:] if err.startswith(f"{path}: ") else err

    return ([{"path": str(p), "stage": "skipped", "reason": reason(str(p), r)} for p, r in skipped]
            + [{"path": str(p), "stage": "failed to decode", "reason": reason(str(p), e)} for p, e in errors])


# the binary tasks of metrics.json, as the reports name them
TASKS = {"normal_vs_pneumonia": "normal vs pneumonia", "bacterial_vs_rest": "bacterial vs rest",
         "viral_vs_rest": "viral vs rest", "bacterial_vs_viral": "bacterial vs viral"}
FIGURE_NAMES = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1",
                "auc": "AUC", "macro_f1": "macro F1"}
NA = "n/a"  # how the reports and the command line show a figure the images do not define


def fmt(v, spec: str = ".3f") -> str:
    """A figure for people: ``n/a`` when undefined (null or NaN: no images of a class the figure needs)."""
    return NA if v is None or v != v else format(v, spec)


def undefined_lines(m: dict) -> list[str]:
    """One line per task with a figure that is n/a: which, and why (metrics.json's ``undefined``)."""
    names = {"three_class": "3-class", **TASKS}
    lines = []
    for task, figs in (m.get("undefined") or {}).items():
        by_reason: dict[str, list[str]] = {}
        for k, why in figs.items():
            by_reason.setdefault(why, []).append(FIGURE_NAMES.get(k, k))
        lines.append(f"{names.get(task, task)}: " + "; ".join(f"{', '.join(ks)} ({why})" for why, ks in by_reason.items()))
    return lines


def absent_classes(m: dict) -> list[str]:
    """The classes that have no image among those scored (rows of the confusion matrix that are empty)."""
    return [lab for lab, row in zip(m["labels"], m["confusion_matrix"]) if not sum(row)]


def _macro_note(m: dict) -> str:
    over = m["three_class"].get("macro_f1_classes")
    return "" if over is None or len(over) == len(m["labels"]) else f" (over {', '.join(over)} only)"


def report_markdown(m: dict) -> str:
    """A short human-readable report of a metrics dictionary."""
    nvp = m["normal_vs_pneumonia"]
    ci = nvp.get("ci95", {})
    data = m["data"]
    dropped = data["not_scored"]  # every file without a prediction, and why (evaluate_items)
    warn = [f"**Warning:** {overlap_sentence(m)}.", ""] if (m.get("training_overlap") or {}).get("n") else []
    lines = [
        "# pneumoscan evaluation",
        "",
        f"> {INTENDED_USE}",
        "",
        *warn,
        f"Model `{m.get('model', {}).get('id', '?')}` on {m['n']} images "
        f"(threshold {nvp['threshold']:.3f}; {data['skipped']} files skipped, {data['failed_to_decode']} failed to decode"
        + ("; each is listed at the end" if dropped else "") + ").",
        "",
        "| task | accuracy | sensitivity | specificity | F1 | AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in TASKS.items():
        b = m[key]
        lines.append(f"| {name} | " + " | ".join(fmt(b[k]) for k in ("accuracy", "sensitivity", "specificity", "f1", "auc"))
                     + " |")
    lines += [
        "",
        f"3-class accuracy {fmt(m['three_class']['accuracy'])}, macro F1 {fmt(m['three_class']['macro_f1'])}"
        f"{_macro_note(m)}.",
        "",
    ]
    if m.get("undefined"):
        lines += [f"{NA}: not defined on these images (no {' and no '.join(absent_classes(m)) or 'such'} images):", "",
                  *(f"- {u}" for u in undefined_lines(m)), ""]
    lines += [
        "95 % bootstrap intervals (normal vs pneumonia): "
        + ", ".join(f"{k} {_interval(v)}" for k, v in ci.items()),
        "",
        "Confusion matrix (rows true, columns predicted: " + ", ".join(m["labels"]) + "):",
        "",
        "| | " + " | ".join(m["labels"]) + " |",
        "| --- |" + " --- |" * len(m["labels"]),
    ]
    for lab, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", *abstention_lines(m), "",
              "![confusion matrix](confusion_matrix.png) ![ROC](roc.png) ![threshold](threshold.png) "
              "![calibration](calibration.png) ![reliability](reliability.png) ![risk-coverage](risk_coverage.png)", "",
              "The same with intervals, curves and the most confident mistakes in one self-contained page: "
              "`report.html`.", ""]
    if dropped:
        lines += [f"Files not scored ({len(dropped)}):", ""] + [f"- {d['path']}: {d['stage']} ({d['reason']})"
                                                                 for d in dropped] + [""]
    return "\n".join(lines)


def _interval(v) -> str:
    return NA if v is None or fmt(v[0]) == NA or fmt(v[1]) == NA else f"[{fmt(v[0])}, {fmt(v[1])}]"


def abstention_lines(m: dict) -> list[str]:
    """Markdown of :func:`abstention`: the gate, calibration, prediction sets, risk-coverage."""
    g, c, k = m["gate"], m["calibration"], m.get("conformal")
    why = "; ".join(f"{r} ({n})" for r, n in g["reasons"].items()) or "none"
    acc_in = g["accuracy_3class_in_scope"]
    kind = ("image checks and the learned out-of-distribution score" if g["learned_score"]
            else "image checks only: no learned score, run pneumoscan calibrate")
    lines = ["## Knowing when not to answer", "",
             f"Out-of-scope gate ({kind}): "
             f"{g['flagged']} of {g['n']} images flagged ({g['share_flagged']:.1%}; reasons: {why}). The figures above "
             "count every image; 3-class accuracy on the accepted ones: " + fmt(acc_in) + ".", ""]
    before = c["uncalibrated"]
    bias = "" if not c.get("class_bias") else " and class bias " + "/".join(f"{v:+.2f}" for v in c["class_bias"])
    lines.append(f"Calibration: temperature {c['temperature']:.3f}{bias}; expected calibration error {c['ece']:.3f}, "
                 f"Brier {c['brier']:.3f}" + (f" (before scaling {before['ece']:.3f} and {before['brier']:.3f})" if before
                                               else "") + ".")
    if k:
        lines += ["", f"Conformal prediction sets at error rate {k['alpha']:g} (target coverage {k['target_coverage']:.0%}): "
                  f"coverage {k['coverage']:.3f}, mean set size {k['mean_set_size']:.2f}, verdict 'uncertain: refer' for "
                  f"{k['share_refer']:.1%}. Coverage is guaranteed only for images exchangeable with the validation "
                  "split the sets were calibrated on; on shifted data it can fall below the target.", "",
                  "| true class | n | coverage | mean set size |", "| --- | --- | --- | --- |"]
        lines += [f"| {lab} | {v['n']} | {v['coverage']:.3f} | {v['mean_set_size']:.2f} |" for lab, v in k["by_class"].items()]
    else:
        lines += ["", "No prediction sets: the model has no conformal calibration (run `pneumoscan calibrate`)."]
    lines += ["", "| left out (least confident) | images answered | 3-class accuracy | pneumonia accuracy |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['abstain']:.0%} | {r['n']} | {r['accuracy_3class']:.3f} | {r['pneumonia_accuracy']:.3f} |"
              for r in m["risk_coverage"]]
    return lines


GALLERY = 12  # most confident mistakes shown in report.html


def report_html(m: dict, folder: Path, preds, truth, pred: Predictor) -> str:
    """One self-contained HTML page (figures and thumbnails embedded): metrics with intervals, the
    confusion matrix, ROC with the operating point, sensitivity/specificity against the threshold,
    calibration, and the most confident mistakes."""
    import base64

    import jinja2

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    rows = []
    for key, name in TASKS.items():
        t, ci = m[key], m[key].get("ci95") or {}
        rows.append([name, *[fmt(t[k]) + (f" ({fmt(ci[k][0])}–{fmt(ci[k][1])})" if _interval(ci.get(k)) != NA else "")
                             for k in ("accuracy", "sensitivity", "specificity", "f1", "auc")], t["n"]])
    wrong = [p for p in preds if p.predicted != LABELS[truth[p.path]]]
    wrong.sort(key=lambda p: -float(p.scores[LABELS.index(p.predicted)]))
    gallery = []
    for p in wrong[:GALLERY]:
        try:
            thumb = _thumbnail_png(pred, p.path)
        except Exception as e:  # a thumbnail is decoration: a file that fails here must not sink the report
            log.warning("no thumbnail for %s: %s", p.path, e)
            continue
        gallery.append({"name": Path(p.path).name, "path": p.path, "true": LABELS[truth[p.path]], "pred": p.predicted,
                        "p": [float(v) for v in p.scores], "png": thumb, "verdict": p.verdict,
                        "set": ", ".join(p.prediction_set or [])})
    figures = [(t, b64(folder / f)) for t, f in (("ROC; the circle is the model's threshold", "roc.png"),
                                                 ("sensitivity and specificity against the threshold", "threshold.png"),
                                                 ("calibration of P(pneumonia)", "calibration.png"),
                                                 ("reliability of the top class", "reliability.png"),
                                                 ("accuracy when the least confident are left out", "risk_coverage.png"),
                                                 ("confusion matrix", "confusion_matrix.png"))]
    env = jinja2.Environment(loader=jinja2.PackageLoader("pneumoscan.evaluate", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    o = m.get("training_overlap") or {}
    return env.get_template("report.html.j2").render(
        model_id=m["model"]["id"], backend=m["model"]["backend"], n=m["n"], root=m["data"]["root"],
        threshold=m["normal_vs_pneumonia"]["threshold"], skipped=m["data"]["skipped"], failed=m["data"]["failed_to_decode"],
        intended_use=INTENDED_USE, overlap=overlap_sentence(m) if o.get("n") else None, tasks=rows,
        acc3=fmt(m["three_class"]["accuracy"]), f1=fmt(m["three_class"]["macro_f1"]) + _macro_note(m),
        undefined=undefined_lines(m), absent=absent_classes(m), not_scored=m["data"]["not_scored"], labels=list(LABELS),
        confusion=list(zip(LABELS, m["confusion_matrix"])), figures=figures, gallery=gallery, version=__version__,
        gate=m["gate"], calibration=m["calibration"], conformal=m.get("conformal"), risk=m["risk_coverage"])


def _thumbnail_png(pred: Predictor, path: str, side: int = 200) -> str:
    import base64

    import cv2

    g = pred.decode(path).pixels
    k = side / max(g.shape)
    small = cv2.resize(g, (max(1, round(g.shape[1] * k)), max(1, round(g.shape[0] * k))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", small)
    return base64.b64encode(buf.tobytes()).decode()
