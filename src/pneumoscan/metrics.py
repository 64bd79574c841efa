"""The study's figures and more, on scikit-learn, under the shared decision rule (:mod:`pneumoscan.labels`).

Pure functions of true labels and probabilities: accuracy, sensitivity, specificity, F1 and AUC of
each task with 95 % bootstrap intervals, the confusion matrix, ROC points, the choice of the
pneumonia threshold on validation, and the prior-shift correction of probabilities. Training
records validation figures with them and evaluation reports them, so they sit in the common base.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .labels import BACTERIAL, DEFAULT_THRESHOLD, LABELS, NORMAL, VIRAL, decide, pneumonia_score

N_BOOT = 1000  # bootstrap resamples behind every 95 % interval (the one default; 0 = no intervals)
THRESHOLD_METHODS = ("youden", "sensitivity")  # how the pneumonia threshold is chosen on validation


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def binary_metrics(y: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict:
    """accuracy, sensitivity (recall of positives), specificity, F1 and AUC of a 0/1 task; NaN where a
    figure is undefined (sensitivity and F1 without positives, specificity without negatives, AUC
    without both, everything without images)."""
    from sklearn.metrics import f1_score

    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    tp = int(((y == 1) & (pred == 1)).sum())
    tn = int(((y == 0) & (pred == 0)).sum())
    fp = int(((y == 0) & (pred == 1)).sum())
    fn = int(((y == 1) & (pred == 0)).sum())
    return {
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": float(f1_score(y, pred, zero_division=0)) if tp + fn else float("nan"),  # no positives: 0 or 0/0
        "auc": _safe_auc(y, np.asarray(score)),
        "n": int(len(y)), "tp": tp, "tn": tn, "fp": fp, "fn": fn,
    }


def _binary_batch(yb: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`binary_metrics` for a batch of resamples (rows), vectorised: the bootstrap's inner loop.

    Same definitions as :func:`binary_metrics` (F1 as scikit-learn's; AUC by the Mann-Whitney rank sum with
    ties averaged, which equals ``roc_auc_score``); NaN where a figure is undefined.
    """
    from scipy.stats import rankdata

    n = yb.shape[1]
    tp = ((yb == 1) & (pred == 1)).sum(1)
    tn = ((yb == 0) & (pred == 0)).sum(1)
    fp = ((yb == 0) & (pred == 1)).sum(1)
    fn = ((yb == 1) & (pred == 0)).sum(1)
    pos = yb.sum(1)
    neg = n - pos
    ranks = rankdata(score, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = ((ranks * yb).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
        return {
            "accuracy": (tp + tn) / n,
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "f1": np.where(pos > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
            "auc": np.where((pos > 0) & (neg > 0), auc, np.nan),
        }


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = N_BOOT,
                 seed: int = 0) -> dict[str, list[float]]:
    """95 % percentile-bootstrap intervals (resampling images) for the normal-vs-pneumonia figures."""
    rng = np.random.default_rng(seed)
    yb = (np.asarray(y) != NORMAL).astype(int)
    score = pneumonia_score(probs)
    pred = (score >= threshold).astype(int)
    keys = ("accuracy", "sensitivity", "specificity", "f1", "auc")
    draws: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    n = len(yb)
    chunk = max(1, 2_000_000 // max(n, 1))  # resamples per vectorised step (bounded memory)
    for start in range(0, n_boot, chunk):
        i = rng.integers(0, n, (min(chunk, n_boot - start), n))
        m = _binary_batch(yb[i], pred[i], score[i])
        for k in keys:
            draws[k].append(m[k])
    out = {}
    for k in keys:
        a = np.concatenate(draws[k]) if draws[k] else np.empty(0)
        a = a[~np.isnan(a)]
        out[k] = [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))] if len(a) else [float("nan")] * 2
    return out


def compute_metrics(y: np.ndarray, probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *, n_boot: int = N_BOOT,
                    seed: int = 0) -> dict:
    """The metrics.json dictionary for true labels ``y`` (indices into LABELS) and probabilities."""
    from sklearn.metrics import confusion_matrix, f1_score

    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(LABELS) or len(y) != len(probs):
        raise ValueError(f"need probabilities of shape (n, {len(LABELS)}) and n labels")
    pred = decide(probs, threshold)
    score = pneumonia_score(probs)
    nvp = binary_metrics(y != NORMAL, pred != NORMAL, score)
    nvp["threshold"] = float(threshold)
    nvp["ci95"] = bootstrap_ci(y, probs, threshold, n_boot=n_boot, seed=seed) if n_boot else {}
    pn = y != NORMAL
    bv_score = probs[pn, BACTERIAL] / np.clip(probs[pn, BACTERIAL] + probs[pn, VIRAL], 1e-12, None)
    bv = binary_metrics(y[pn] == BACTERIAL, probs[pn, BACTERIAL] >= probs[pn, VIRAL], bv_score)
    cm = confusion_matrix(y, pred, labels=list(range(len(LABELS))))
    present = sorted(set(y.tolist()))  # a class without images has no recall, so no F1 of its own to average
    m = {
        "n": int(len(y)),
        "labels": list(LABELS),
        "confusion_matrix": cm.tolist(),
        "three_class": {
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0))
            if present else float("nan"),
            "macro_f1_classes": [LABELS[i] for i in present],
        },
        "normal_vs_pneumonia": nvp,
        "bacterial_vs_rest": binary_metrics(y == BACTERIAL, pred == BACTERIAL, probs[:, BACTERIAL]),
        "viral_vs_rest": binary_metrics(y == VIRAL, pred == VIRAL, probs[:, VIRAL]),
        "bacterial_vs_viral": bv,
    }
    m["undefined"] = undefined_figures(m)
    return m


# each binary task of compute_metrics: (its positive class, its negative class), as the reasons name them
TASK_CLASSES = {"normal_vs_pneumonia": ("pneumonia", "normal"), "bacterial_vs_rest": ("bacterial", "normal or viral"),
                "viral_vs_rest": ("viral", "normal or bacterial"), "bacterial_vs_viral": ("bacterial", "viral")}
BINARY_FIGURES = ("accuracy", "sensitivity", "specificity", "f1", "auc")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and not np.isfinite(v))


def undefined_figures(m: dict) -> dict[str, dict[str, str]]:
    """Why each undefined (NaN or null) figure of a :func:`compute_metrics` dictionary has no value,
    ``{task: {figure: reason}}``: e.g. the specificity of normal vs pneumonia on pneumonia images only."""
    out: dict[str, dict[str, str]] = {}
    three = {k: "no images" for k in ("accuracy", "macro_f1") if _missing(m["three_class"][k])}
    if three:
        out["three_class"] = three
    for task, (pos, neg) in TASK_CLASSES.items():
        t = m[task]
        if not t["n"]:
            why = dict.fromkeys(BINARY_FIGURES, "no pneumonia images" if task == "bacterial_vs_viral" else "no images")
        else:
            why = {"sensitivity": f"no {pos} images", "f1": f"no {pos} images", "specificity": f"no {neg} images",
                   "auc": f"needs both {pos} and {neg} images"}
        gone = {k: r for k, r in why.items() if _missing(t.get(k))}
        if gone:
            out[task] = gone
    return out


def check_method(method: str, target_sensitivity: float | None) -> None:
    """Validate the threshold options where they enter."""
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold method {method!r} is unknown; use youden or sensitivity")
    if method == "sensitivity" and (target_sensitivity is None or not 0.0 < target_sensitivity <= 1.0):
        raise ConfigError(f"--method sensitivity needs --target-sensitivity in (0, 1], e.g. 0.97 "
                              f"(got {target_sensitivity})")
    if method != "sensitivity" and target_sensitivity is not None:  # it would be silently ignored
        raise ConfigError(f"a target sensitivity ({target_sensitivity}) is used only by the sensitivity method, not "
                          f"{method}: choose the sensitivity method, or drop the target")


def choose_threshold(y: np.ndarray, probs: np.ndarray, method: str = "youden",
                     target_sensitivity: float | None = None) -> tuple[float, str]:
    """Pneumonia threshold chosen on validation data, and how it was chosen.

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` takes the highest
    threshold whose sensitivity is still >= ``target_sensitivity`` (more specificity, same recall).
    """
    from sklearn.metrics import roc_curve

    check_method(method, target_sensitivity)
    yb = (np.asarray(y) != NORMAL).astype(int)
    score = pneumonia_score(probs)
    if not 0 < yb.sum() < len(yb):
        return DEFAULT_THRESHOLD, f"default {DEFAULT_THRESHOLD:g} (validation has a single class)"
    fpr, tpr, thr = roc_curve(yb, score, drop_intermediate=False)  # every distinct score, highest first
    if method == "youden":
        j = tpr - fpr
        best = np.flatnonzero(j == j.max())
        i = best[len(best) // 2]  # middle of a plateau of equally good thresholds
        how = f"Youden's J on validation (J={j[i]:.3f})"
    else:
        i = np.flatnonzero(tpr >= target_sensitivity)[0]
        how = f"highest threshold with validation sensitivity >= {target_sensitivity:g}"
    return _between(thr, i), how


def _between(thr: np.ndarray, i: int) -> float:
    """The threshold halfway between the score it admits (``thr[i]``) and the next lower one, so that no
    validation image sits on it: the same verdicts on validation, and float32 noise between two
    engines cannot flip an image at the operating point."""
    upper = float(np.clip(thr[i], 0.0, 1.0))
    lower = float(np.clip(thr[i + 1], 0.0, 1.0)) if i + 1 < len(thr) else max(0.0, upper - 1e-6)
    return (upper + lower) / 2


def prior_shift(probs: np.ndarray, train_prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    """Re-weight posteriors for a change of class priors (Saerens et al. 2002), renormalised."""
    w = np.asarray(new_prior, float) / np.clip(np.asarray(train_prior, float), 1e-12, None)
    p = np.asarray(probs, float) * w
    return p / p.sum(axis=1, keepdims=True)


def model_prior(config: dict) -> np.ndarray:
    """The class prior the model's probabilities answer to (Saerens et al.'s training prior).

    A loss with inverse-frequency ("balanced") class weights cancels the data's class frequencies,
    so such a model's posteriors are those of equal priors; without weights they follow the
    training frequencies. An explicit ``model_prior`` in config.json (ensembles) wins.
    """
    k = len(LABELS)
    if "model_prior" in config:
        return np.asarray(config["model_prior"], float)
    if config.get("train_config", {}).get("class_weight") == "balanced" or "train_prior" not in config:
        return np.full(k, 1.0 / k)
    return np.asarray(config["train_prior"], float)


def prevalence_prior(config: dict, prevalence: float) -> np.ndarray:
    """Class prior for a stated pneumonia prevalence; bacterial vs viral keep the training ratio."""
    k = len(LABELS)
    train_prior = np.asarray(config.get("train_prior", [1.0 / k] * k), float)
    pn = train_prior[1:] / train_prior[1:].sum()
    return np.array([1.0 - prevalence, *(prevalence * pn)])


def roc_points(y: np.ndarray, probs: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """(fpr, tpr, auc) for each task of the report."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y)
    out = {}
    tasks = {
        "normal vs pneumonia": (y != NORMAL, pneumonia_score(probs)),
        "bacterial vs rest": (y == BACTERIAL, probs[:, BACTERIAL]),
        "viral vs rest": (y == VIRAL, probs[:, VIRAL]),
    }
    pn = y != NORMAL
    if pn.any():
        tasks["bacterial vs viral"] = (y[pn] == BACTERIAL,
                                       probs[pn, BACTERIAL] / np.clip(probs[pn, BACTERIAL] + probs[pn, VIRAL], 1e-12, None))
    for name, (t, s) in tasks.items():
        t = np.asarray(t).astype(int)
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = roc_curve(t, s)
            out[name] = (fpr, tpr, float(roc_auc_score(t, s)))
    return out


def calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top class (Guo et al. 2017): the bin-weighted gap between
    confidence and accuracy over ``bins`` equal-width confidence bins."""
    p = np.asarray(probs, float)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    right = (pred == np.asarray(y)).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - right[m].mean())
    return float(ece)


def brier_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean squared distance of the probabilities from the one-hot truth."""
    p = np.asarray(probs, float)
    onehot = np.eye(p.shape[1])[np.asarray(y, int)]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def risk_coverage(y: np.ndarray, probs: np.ndarray, threshold: float,
                  abstain: tuple[float, ...] = (0.0, 0.05, 0.10, 0.20)) -> list[dict]:
    """3-class and normal-vs-pneumonia accuracy when the least confident share of images is left out
    (confidence: the probability of the predicted class)."""
    p = np.asarray(probs, float)
    pred = decide(p, threshold)
    conf = p[np.arange(len(p)), pred]
    order = np.argsort(-conf, kind="stable")
    y = np.asarray(y, int)
    out = []
    for a in abstain:
        keep = order[: max(1, int(round(len(p) * (1 - a))))]
        out.append({"abstain": a, "n": int(len(keep)), "accuracy_3class": float((pred[keep] == y[keep]).mean()),
                    "pneumonia_accuracy": float(((pred[keep] != NORMAL) == (y[keep] != NORMAL)).mean())})
    return out
