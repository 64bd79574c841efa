"""Unlabelled adaptation at a new site: estimate the class prior of its images, without labels.

Two estimators of the target prior from the model's own outputs:

* ``em``: expectation-maximisation of Saerens, Latinne and Decaestecker (2002, "Adjusting the outputs
  of a classifier to new a priori probabilities"): re-weight the posteriors by the ratio of the
  current prior estimate to the model's training prior, average them, repeat until it settles.
  Needs only the posteriors and the prior the model's probabilities answer to
  (:func:`pneumoscan.metrics.model_prior`).
* ``bbse``: black-box shift estimation (Lipton, Wang and Smola 2018): the confusion matrix of the
  model's hard predictions on its own validation split, C[i, j] = P(predicted i, true j), turns the
  distribution of predictions at the new site into importance weights w by solving C w = q; the
  prior is w times the validation prior. Robust to miscalibration, needs the validation split.

Both assume label shift (the look of each class is unchanged; only how common it is differs).
The estimate is reported, never applied: pass it to ``predict --prevalence`` if you decide to.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ConfigError, DataError
from ..labels import LABELS, decide
from ..metrics import model_prior

log = logging.getLogger(__name__)

METHODS = ("em", "bbse")


@dataclass(frozen=True)
class AdaptConfig:
    """How the class prior of unlabelled images is estimated (``pneumoscan adapt``)."""

    method: Literal["em", "bbse"] = "em"  # em: Saerens et al. 2002; bbse: black-box shift estimation (needs validation)
    max_iter: int = 1000  # EM iterations at most
    tol: float = 1e-6  # EM stops when no class's prior moves more than this
    batch_size: int = 32  # images per inference batch

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adaptation method {self.method!r} is unknown; use em or bbse")
        if self.max_iter < 1 or not 0 < self.tol < 0.01 or self.batch_size < 1:  # a prior moves in [0, 1]
            raise ConfigError("--max-iter and --batch-size must be at least 1 and --tol in (0, 0.01), e.g. 1e-6")


FEW_IMAGES = 100  # below this many in-scope images an estimated prior is said to be rough (binomial sd ~ 0.05)


def em_prior(probs: np.ndarray, train_prior: np.ndarray, max_iter: int = 1000,
             tol: float = 1e-6) -> tuple[np.ndarray, int]:
    """(estimated target prior, iterations) by Saerens et al.'s EM on posteriors ``probs`` (n, k)."""
    p = np.asarray(probs, float)
    base = np.clip(np.asarray(train_prior, float), 1e-12, None)
    prior = base.copy()
    for it in range(1, max_iter + 1):
        w = p * (prior / base)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            return new, it
        prior = new
    return prior, max_iter


def bbse_prior(pred_val: np.ndarray, y_val: np.ndarray, pred_target: np.ndarray,
               k: int = len(LABELS)) -> np.ndarray:
    """Black-box shift estimate of the target prior from hard predictions (class indices)."""
    y_val, pred_val, pred_target = (np.asarray(a, int) for a in (y_val, pred_val, pred_target))
    joint = np.zeros((k, k))
    np.add.at(joint, (pred_val, y_val), 1.0)
    joint /= len(y_val)
    q = np.bincount(pred_target, minlength=k) / len(pred_target)
    w, *_ = np.linalg.lstsq(joint, q, rcond=None)
    w = np.clip(w, 0, None)  # weights are non-negative; a negative least-squares weight means "absent"
    prior = w * (np.bincount(y_val, minlength=k) / len(y_val))
    if not prior.sum() > 0:
        raise DataError("black-box shift estimation found no consistent prior (the validation confusion matrix "
                        "is singular for these predictions); use --method em")
    return prior / prior.sum()


def adapt(paths: list[str], predictor, cfg: AdaptConfig = AdaptConfig(), *, validation=None,
          progress: bool = False) -> dict:
    """Estimate the class prior of the images ``paths`` (unlabelled). ``validation`` is the model's
    (labels, probabilities) on its validation split, needed by ``bbse`` and reported with ``em``.

    Only images the out-of-scope gate lets through count (a lateral film, a photograph or a blank frame
    among them would pull the estimate anywhere); how many were left out is reported."""
    preds, errors = predictor.predict_files(paths, cfg.batch_size, progress)
    if not preds:
        raise DataError(f"none of the {len(paths)} images could be decoded" + (f" ({errors[0][1]})" if errors else ""))
    kept = [p for p in preds if p.in_scope]
    if not kept:
        raise DataError(f"none of the {len(preds)} decodable images is a chest X-ray the model can read (first: "
                        f"{preds[0].path}: {preds[0].reasons[0]}); the prior is estimated on those it can read")
    probs = np.stack([p.scores for p in kept])
    base = model_prior(predictor.config)
    out = {"method": cfg.method, "n": len(kept), "failed": len(errors), "out_of_scope": len(preds) - len(kept),
           "errors": [{"path": p, "error": e} for p, e in errors], "model": predictor.model_id,
           "model_prior": dict(zip(LABELS, base.round(4).tolist())),
           "predicted_share": dict(zip(LABELS, (np.bincount(decide(probs, predictor.threshold), minlength=len(LABELS))
                                                / len(kept)).round(4).tolist()))}
    if cfg.method == "em":
        prior, iters = em_prior(probs, base, cfg.max_iter, cfg.tol)
        out["iterations"] = iters
    else:
        if validation is None:
            raise DataError("--method bbse needs the model's validation split (its manifest.csv, or --data-val)")
        y_val, p_val = validation
        prior = bbse_prior(decide(p_val, predictor.threshold), y_val, decide(probs, predictor.threshold))
    if len(kept) < FEW_IMAGES:
        out["warning"] = (f"estimated from {len(kept)} images: a rough figure (its standard error is about "
                          f"{0.5 / np.sqrt(len(kept)):.2f}); use at least {FEW_IMAGES} images of the site")
    out["prior"] = dict(zip(LABELS, prior.round(4).tolist()))
    out["pneumonia_prevalence"] = round(float(1.0 - prior[0]), 4)
    log.info("estimated prior %s (%s, %d images)", out["prior"], cfg.method, len(kept))
    return out
