"""Training images whose label looks wrong: out-of-fold losses of a linear probe on frozen features.

The test labels of the Kermany set were checked by a third expert, the training labels were not.
Following confident learning (Northcutt et al. 2021) in its simplest form, every training image is
scored by a logistic regression that never saw it (5 patient-grouped folds on the frozen,
pretrained backbone's pooled features): the images whose given label gets the lowest out-of-fold
probability are the likeliest to be mislabelled. :func:`drop_noisy` removes the highest-loss
share of *each class* (so the class balance is kept) and reports what it removed.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write_bytes
from ..labels import LABELS

log = logging.getLogger(__name__)

N_FOLDS = 5  # out-of-fold folds, grouped by patient


def out_of_fold_loss(x: np.ndarray, y: np.ndarray, groups: Sequence[str], seed: int = 0,
                     n_folds: int = N_FOLDS) -> np.ndarray:
    """Cross-entropy of each image's given label under a logistic regression fitted without it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    folds = min(n_folds, len(set(groups)), int(np.bincount(y).min()))
    if folds < 2:
        raise ValueError("too few patients per class for out-of-fold losses")
    loss = np.zeros(len(y))
    split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit, held in split.split(x, y, np.asarray(groups)):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        clf.fit(x[fit], y[fit])
        p = np.full((len(held), len(LABELS)), 1e-12)
        p[:, clf.classes_] = np.clip(clf.predict_proba(x[held]), 1e-12, 1.0)
        loss[held] = -np.log(p[np.arange(len(held)), y[held]])
    return loss


def flag_highest_loss(loss: np.ndarray, y: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask: the ``share`` highest-loss images of each class."""
    flagged = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(share * len(idx)))
        if k:
            flagged[idx[np.argsort(-loss[idx], kind="stable")[:k]]] = True
    return flagged


def drop_noisy(samples: Sequence, backbone: str, net, weights_id: str, prep, share: float, seed: int = 0, *,
               cache_dir=None, progress: bool = False) -> tuple[np.ndarray, dict]:
    """(keep mask over ``samples``, record) after dropping ``share`` of each class.

    ``net`` is the frozen, pretrained ``backbone`` (features come through the feature cache). The
    record goes into config.json; its ``images`` (relpath, label, out-of-fold loss) into dropped.csv.
    """
    from ..features.extract import extract_features

    feats, ok, _ = extract_features(samples, backbone, size=prep.size, intensity=prep.intensity,
                                    cache_dir=cache_dir, progress=progress, net=net, weights_id=weights_id)
    y = np.array([s.target for s in samples])
    loss = np.full(len(samples), np.nan)
    loss[ok] = out_of_fold_loss(feats[ok], y[ok], [s.patient for s, k in zip(samples, ok) if k], seed)
    flagged = np.zeros(len(samples), bool)
    flagged[ok] = flag_highest_loss(loss[ok], y[ok], share)
    record = {
        "method": f"highest out-of-fold loss of a linear probe on frozen features ({N_FOLDS} patient-grouped folds)",
        "share_per_class": share,
        "n_flagged": int(flagged.sum()),
        "flagged_by_class": {lab: int((flagged & (y == i)).sum()) for i, lab in enumerate(LABELS)},
        "images": [{"relpath": s.relpath, "label": s.label, "oof_loss": round(float(loss[i]), 4)}
                   for i, s in enumerate(samples) if flagged[i]],
    }
    log.info("dropping %d training images as likely mislabelled (%s)", record["n_flagged"],
             ", ".join(f"{k} {v}" for k, v in record["flagged_by_class"].items()))
    return ~flagged, record


def write_dropped(record: dict, path: Path) -> None:
    """The dropped images as CSV (relpath, label, out-of-fold loss), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["relpath", "label", "oof_loss"])
    for r in record["images"]:
        w.writerow([r["relpath"], r["label"], r["oof_loss"]])
    atomic_write_bytes(Path(path), buf.getvalue().encode())
