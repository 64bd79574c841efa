"""Teach a model when not to answer, on its own validation split: temperature, conformal sets, OOD gate.

``pneumoscan calibrate --model DIR`` scores the validation split (and, for the out-of-distribution
score, the training split's pooled features) once, then fits and stores in the model directory:

1. the temperature, or the temperature and one bias per class (bias-corrected temperature scaling,
   Alexandari et al. 2020), that minimises the validation negative log-likelihood; by default both are
   fitted and the one with the lower validation calibration error is kept (the threshold is then
   re-chosen on the calibrated probabilities, so verdicts and probabilities agree);
2. the conformal quantile of the conformity scores (lac or aps) at the chosen error rate (coverage measured on held-out
   halves of the validation split: fit on one half, count on the other);
3. the Mahalanobis scorer of :mod:`pneumoscan.uncertainty` on the training features, its threshold
   the ``ood_quantile`` of the validation scores (so at most 2 % of validation images are flagged).

Each figure goes into ``config.json`` (``calibration``, ``conformal``, ``ood``) and the model card;
The scorer's file (``ood-<hash>.safetensors``) is recorded with its SHA-256 like any weight file; the
config is written once, last, so an interrupted run leaves the model as it was.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ..data.splits import check_classes, check_present, load_manifest, sample_path, validation_set
from ..errors import DataError
from ..io import atomic_write_bytes, atomic_write_json, file_digest, json_safe
from ..labels import LABELS
from ..metrics import brier_score, calibration_error, choose_threshold, compute_metrics
from ..nets.modeldir import CONFIG_NAME, has_onnx, read_config
from ..predict import FEATURES_OUTPUT, Predictor
from ..uncertainty import OODScorer, conformal_quantile, conformity_scores, prediction_sets, temperature_scale
from .config import CalibrateConfig
from .evaluate import cached_arrays, is_frozen
from .operating_point import set_threshold

log = logging.getLogger(__name__)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``probs`` rescaled by it."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, int)

    def nll(t: float) -> float:
        p = temperature_scale(probs, t)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    res = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-4})
    return float(res.x)


def fit_bias_corrected(probs: np.ndarray, y: np.ndarray, t0: float | None = None) -> tuple[float, list[float]]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020): the temperature and one bias per class
    minimising the negative log-likelihood of ``softmax(log p / T + b)``; the biases are centred (a common
    shift changes nothing). Starts from the temperature alone (``t0``, fitted here when not given), so it is never
    worse than it on the fit data."""
    from scipy.optimize import minimize

    y = np.asarray(y, int)
    logp = np.log(np.clip(np.asarray(probs, float), 1e-12, None))
    k = logp.shape[1]

    def nll(w: np.ndarray) -> float:
        z = logp / w[0] + w[1:]
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

    t0 = fit_temperature(probs, y) if t0 is None else t0
    start = np.array([t0, *([0.0] * k)])
    res = minimize(nll, start, method="L-BFGS-B", bounds=[(0.05, 20.0)] + [(-10.0, 10.0)] * k)
    w = res.x if res.success and nll(res.x) <= nll(start) else start
    b = w[1:] - w[1:].mean()
    return float(w[0]), [float(v) for v in b]


def conformal_check(probs: np.ndarray, y: np.ndarray, alpha: float, method: str = "lac", seed: int = 0) -> dict:
    """Coverage and set sizes on held-out halves: the quantile fitted on one half of the validation
    split is tried on the other, both ways; per class and overall."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    halves = np.array_split(idx, 2)
    covered, size, labels = [], [], []
    for fit, held in ((halves[0], halves[1]), (halves[1], halves[0])):
        q = min(1.0, conformal_quantile(conformity_scores(probs[fit], y[fit], method), alpha))
        sets = prediction_sets(probs[held], q, method)
        covered += [LABELS[t] in s for s, t in zip(sets, y[held])]
        size += [len(s) for s in sets]
        labels += list(y[held])
    covered, size, labels = np.array(covered), np.array(size), np.array(labels)
    return {"coverage": float(covered.mean()), "mean_set_size": float(size.mean()),
            "by_class": {lab: {"coverage": float(covered[labels == i].mean()), "mean_set_size":
                               float(size[labels == i].mean()), "n": int((labels == i).sum())}
                         for i, lab in enumerate(LABELS) if (labels == i).any()}}


def fit_ood(train_feats: np.ndarray, train_y: np.ndarray, val_feats: np.ndarray, quantile: float,
            pca_dim: int) -> tuple[OODScorer, float]:
    """PCA of the training features, class means and a Ledoit-Wolf shared covariance in that space;
    returns the scorer and the threshold that lets ``quantile`` of the validation images through."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    k = int(min(pca_dim, train_feats.shape[1], len(train_feats) - 1))
    pca = PCA(n_components=k, random_state=0).fit(train_feats)
    z = pca.transform(train_feats)
    y = np.asarray(train_y, int)
    means = np.stack([z[y == c].mean(0) if (y == c).any() else z.mean(0) for c in range(len(LABELS))])
    cov = LedoitWolf().fit(z - means[y]).covariance_
    scorer = OODScorer(mean=pca.mean_, components=pca.components_, class_means=means, precision=np.linalg.inv(cov))
    return scorer, float(np.quantile(scorer.score(val_feats), quantile))


UPRIGHT_QUANTILE = 0.998  # share of validation films the upside-down check lets through
UPRIGHT_TRAIN_MAX = 2000  # training films (and their turned copies) the upside-down check is fitted on, at most


def fit_upright(train: list[np.ndarray], val: list[np.ndarray]) -> tuple[np.ndarray, float, float]:
    """Logistic regression of upright training films against the same films turned by 180 degrees, on
    :func:`~pneumoscan.scope.upright_profile`; returns (weights with the bias last, the threshold that
    lets :data:`UPRIGHT_QUANTILE` of the validation films through, the share of turned validation films
    it stops)."""
    from sklearn.linear_model import LogisticRegression

    from ..scope import upright_profile

    up = np.stack([upright_profile(g) for g in train])
    down = np.stack([upright_profile(np.rot90(g, 2)) for g in train])
    clf = LogisticRegression(C=0.5, max_iter=3000).fit(np.r_[up, down], np.r_[np.zeros(len(up)), np.ones(len(down))])
    w = np.r_[clf.coef_[0], clf.intercept_[0]]
    vu = clf.predict_proba(np.stack([upright_profile(g) for g in val]))[:, 1]
    vd = clf.predict_proba(np.stack([upright_profile(np.rot90(g, 2)) for g in val]))[:, 1]
    threshold = float(np.quantile(vu, UPRIGHT_QUANTILE))
    return w, threshold, float((vd > threshold).mean())


def _method(cfg: dict) -> tuple[str, float | None]:
    """The threshold method the model was given (Youden unless a target sensitivity was recorded)."""
    text = str(cfg.get("threshold_method", ""))
    if "sensitivity >=" in text:
        return "sensitivity", float(text.rsplit(">=", 1)[1].split()[0])
    return "youden", None


def calibrate(model_dir: str | os.PathLike, data: str | os.PathLike | None = None,
              cfg: CalibrateConfig = CalibrateConfig(), *, progress: bool = False, cache_dir=None) -> dict:
    """Fit and store temperature, conformal quantile and OOD scorer; returns the records written.
    A frozen-backbone model is scored through the feature cache (``cache_dir``; None: the default)."""
    d = Path(model_dir)
    conf = read_config(d)
    ev = validation_set(data, conf, d, force=cfg.force)
    check_classes(ev.y, f"the validation split of {ev.source}", "calibrate")  # a bias per class, the threshold
    manifest = load_manifest(data, conf, d)
    train = manifest.subset("train")
    if not train:
        raise DataError(f"{ev.source} has no training split: the out-of-distribution score is fitted on it")
    train_paths = [sample_path(manifest, s) for s in train]
    check_present(ev.paths, f"the validation split of {ev.source}")
    check_present(train_paths, f"the training split of {ev.source}")
    onnx_outputs = conf.get("onnx", {}).get("outputs", [])
    backend = "onnx" if has_onnx(d) and FEATURES_OUTPUT in onnx_outputs else "torch"  # features from one pass
    frozen = is_frozen(conf)
    # fitted on the reference graph (fp32), whatever serves it
    pred = Predictor(d, backend="torch" if frozen else backend, precision="fp32")
    try:
        # fit on the raw outputs, every image
        pred.temperature, pred.class_bias, pred.gate, pred.prevalence = 1.0, None, False, None

        def arrays(paths):
            if frozen:
                return cached_arrays(pred, paths, cache_dir, progress)
            return pred.arrays(paths, cfg.batch_size, progress)

        raw, feats, kept, _ = arrays(ev.paths)
        truth = dict(zip(ev.paths, ev.y))
        y = np.array([truth[p] for p in kept], int)
        check_classes(y, f"the validation images of {ev.source} that decode", "calibrate")
        _, tr_feats, tr_kept, _ = arrays(train_paths)
        tr_truth = dict(zip(train_paths, (s.target for s in train)))
        tr_y = np.array([tr_truth[p] for p in tr_kept], int)
    finally:
        pred.close()
    if feats is None:
        raise DataError(f"{d} gives no pooled features (an ONNX export without a 'features' output); export it "
                        "again with 'pneumoscan export' on a copy, or calibrate with the torch backend")
    t, bias, scaling, by_scaling = 1.0, None, "none", None
    if cfg.temperature:
        fits = {}
        if cfg.scaling in ("auto", "temperature"):
            fits["temperature"] = (fit_temperature(raw, y), None)
        if cfg.scaling in ("auto", "bias-corrected"):  # starts from the temperature alone, if fitted already
            t_alone = fits["temperature"][0] if "temperature" in fits else None
            fits["bias-corrected"] = fit_bias_corrected(raw, y, t_alone)
        by_scaling = {k: calibration_error(y, temperature_scale(raw, *v)) for k, v in fits.items()}
        scaling = min(by_scaling, key=by_scaling.get)  # one fit: that one; auto: the lower calibration error
        t, bias = fits[scaling]
    cal = temperature_scale(raw, t, bias)
    method, target = _method(conf)
    thr, how = choose_threshold(y, cal, method, target)
    check = conformal_check(cal, y, cfg.alpha, cfg.conformal)
    qhat = min(1.0, conformal_quantile(conformity_scores(cal, y, cfg.conformal), cfg.alpha))  # 1: every class
    scorer, ood_threshold = fit_ood(tr_feats, tr_y, feats, cfg.ood_quantile, cfg.pca_dim)
    flagged = float((scorer.score(feats) > ood_threshold).mean())
    step = max(1, len(tr_kept) // UPRIGHT_TRAIN_MAX)  # an evenly spaced sample is plenty for 160 weights
    scorer.upright, upright_threshold, upright_caught = fit_upright([pred.decode(p).pixels for p in tr_kept[::step]],
                                                                    [pred.decode(p).pixels for p in kept])
    blob = scorer.to_bytes()
    ood_name = f"ood-{hashlib.sha256(blob).hexdigest()[:12]}.safetensors"  # a new name: the old files stay valid
    records = {
        "calibration": {"temperature": t, "bias": bias, "method": scaling, "requested": cfg.scaling if cfg.temperature
                        else "none", "ece_by_scaling": by_scaling, "fitted_on": "validation", "n": int(len(y)),
                        "ece_before": calibration_error(y, raw), "ece_after": calibration_error(y, cal),
                        "brier_before": brier_score(y, raw), "brier_after": brier_score(y, cal)},
        "conformal": {"method": cfg.conformal, "alpha": cfg.alpha, "qhat": qhat, "heldout": check,
                      "note": "coverage holds for images exchangeable with the validation split only"},
        "ood": {"file": ood_name, "method": "mahalanobis in a PCA of the pooled features (Lee et al. 2018)",
                "pca_dim": int(scorer.components.shape[0]), "threshold": ood_threshold,
                "validation_flagged": flagged, "quantile": cfg.ood_quantile, "n_train": int(len(tr_y)),
                "upright_threshold": upright_threshold, "upright_quantile": UPRIGHT_QUANTILE,
                "upright_validation_turned_caught": upright_caught},
    }
    conf = read_config(d)
    old_ood = (conf.get("ood") or {}).get("file")
    atomic_write_bytes(d / ood_name, blob)
    conf.update(records)
    files = {k: v for k, v in conf.get("files", {}).items() if k != old_ood}
    conf["files"] = {**files, ood_name: file_digest(d / ood_name)}
    set_threshold(conf, thr, how.split(" (calibrated")[0] + " (calibrated probabilities)",
                  record={"data": ev.source, "n_val": int(len(y)), "calibrated": True},
                  val_metrics=json_safe(compute_metrics(y, cal, thr)) if ev.matches_model else None)
    atomic_write_json(d / CONFIG_NAME, conf)  # the one switch: config, threshold and gate change together
    if old_ood and old_ood != ood_name:
        (d / old_ood).unlink(missing_ok=True)
    log.info("calibrated %s: T=%.3f, ECE %.3f -> %.3f, conformal qhat %.3f (held-out coverage %.3f), OOD flags "
             "%.1f%% of validation", d, t, records["calibration"]["ece_before"], records["calibration"]["ece_after"],
             qhat, check["coverage"], 100 * flagged)
    return records
