"""Figures of training and evaluation (matplotlib, Agg backend): history, confusion matrix, ROC
curves, comparison bars; and :func:`save_figure`, the one way every figure reaches the disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path  # noqa: E402
from .labels import LABELS  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Save ``fig`` to ``path`` atomically and close it (also when saving fails)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    finally:
        plt.close(fig)
    return path



def plot_history(history: Sequence[dict], path: str | os.PathLike) -> Path:
    """Loss and accuracy per epoch, train and validation."""
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            vals = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in vals):
                ax.plot(ep, vals, style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    best = min(history, key=lambda h: h.get("val_loss", np.inf)) if history else None
    if best and best.get("val_loss") is not None:
        axes[0].axvline(best["epoch"], color="grey", ls="--", lw=1)
        axes[0].set_title(f"best epoch {best['epoch']} (val loss {best['val_loss']:.3f})")
    return save_figure(fig, path)


def plot_confusion(cm: Sequence[Sequence[int]], path: str | os.PathLike, labels: Sequence[str] = LABELS) -> Path:
    """Counts and row-normalised confusion matrices side by side (rows are true labels)."""
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center",
                        color="white" if mat[i, j] > 0.6 * mat.max() else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    return save_figure(fig, path)


def plot_roc(curves: dict, path: str | os.PathLike, operating_point: tuple[float, float, float] | None = None) -> Path:
    """One ROC panel per task, AUC in the legend; ``operating_point`` (fpr, tpr, threshold) marks where
    the model's threshold puts normal vs pneumonia."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    if operating_point is not None:
        fpr, tpr, thr = operating_point
        ax.plot([fpr], [tpr], "o", ms=8, mfc="none", mec="black", mew=1.5,
                label=f"threshold {thr:.3f}: sens {tpr:.3f}, spec {1 - fpr:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    if curves or operating_point is not None:  # data of one class has no curve (matplotlib warns of an empty legend)
        ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_threshold(y_pneumonia: np.ndarray, score: np.ndarray, threshold: float, path: str | os.PathLike) -> Path:
    """Sensitivity and specificity of normal vs pneumonia as the threshold moves; the model's marked."""
    y = np.asarray(y_pneumonia).astype(bool)
    t = np.linspace(0, 1, 201)
    sens = [(score[y] >= v).mean() if y.any() else np.nan for v in t]
    spec = [(score[~y] < v).mean() if (~y).any() else np.nan for v in t]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(t, sens, label="sensitivity")
    ax.plot(t, spec, label="specificity")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"model threshold {threshold:.3f}")
    ax.set_xlabel("threshold on P(pneumonia)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return save_figure(fig, path)


def plot_calibration(y_pneumonia: np.ndarray, score: np.ndarray, path: str | os.PathLike, bins: int = 10) -> Path:
    """Reliability diagram of P(pneumonia): observed share of pneumonia per predicted-probability bin."""
    y = np.asarray(y_pneumonia).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
    centers, observed, counts = [], [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            centers.append(score[m].mean())
            observed.append(y[m].mean())
            counts.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfectly calibrated")
    ax.plot(centers, observed, "o-", label="this model")
    for c, o, n in zip(centers, observed, counts):
        ax.annotate(str(n), (c, o), textcoords="offset points", xytext=(4, -10), fontsize=7, color="dimgrey")
    ax.set_xlabel("predicted P(pneumonia)")
    ax.set_ylabel("observed share of pneumonia")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def _reliability(y: np.ndarray, probs: np.ndarray, bins: int) -> tuple[list[float], list[float], list[int]]:
    p = np.asarray(probs, float)
    conf, right = p.max(axis=1), (p.argmax(axis=1) == np.asarray(y)).astype(float)
    idx = np.clip(np.digitize(conf, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    out: tuple[list, list, list] = ([], [], [])
    for b in range(bins):
        m = idx == b
        if m.any():
            out[0].append(float(conf[m].mean()))
            out[1].append(float(right[m].mean()))
            out[2].append(int(m.sum()))
    return out


def plot_reliability(y: np.ndarray, curves: dict[str, np.ndarray], path: str | os.PathLike, bins: int = 15) -> Path:
    """Reliability diagram of the top class (the binning of the expected calibration error): accuracy
    against confidence, one curve per named set of probabilities (e.g. before and after scaling)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfectly calibrated")
    for name, probs in curves.items():
        c, acc, n = _reliability(y, probs, bins)
        ax.plot(c, acc, "o-", ms=4, label=name)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(1 / 3 - 0.02, 1.0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def plot_risk_coverage(coverage: Sequence[float], accuracy: Sequence[float], path: str | os.PathLike) -> Path:
    """Accuracy of the images kept against the share kept, when the least confident are left out."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.plot(coverage, accuracy, "-", lw=1.5)
    for a in (0.95, 0.9, 0.8):
        ax.axvline(a, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("share of images answered (least confident left out)")
    ax.set_ylabel("3-class accuracy of those answered")
    ax.set_xlim(1.0, 0.5)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_bars(names: Sequence[str], series: dict[str, Sequence[float]], path: str | os.PathLike,
              title: str = "") -> Path:
    """Grouped bar chart: one group per name, one bar per series (e.g. accuracy, AUC)."""
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    for k, (label, vals) in enumerate(series.items()):
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.0)  # the whole scale: a cut axis makes small differences look large
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the bars
    return save_figure(fig, path)
