"""Knowing when not to answer: calibrated probabilities, conformal prediction sets, and a learned
out-of-distribution score. Torch-free (numpy only): this runs on every prediction, ONNX path included.

* **Temperature scaling** (Guo et al. 2017): probabilities ``softmax(log p / T)`` with one ``T`` fitted
  on validation (``pneumoscan calibrate``), so that 0.9 means right nine times in ten there.
* **Split conformal prediction sets**, with a quantile ``qhat`` of conformity scores chosen on
  validation, so that a set holds the true class with probability at least 1 - alpha for data
  exchangeable with the validation split, and only for such data. Two scores: ``lac`` (the default;
  Sadinle et al. 2019: every class whose probability is at least 1 - qhat; smallest sets, and coverage
  close to 1 - alpha because its scores are continuous) and ``aps`` (adaptive prediction sets, Romano
  et al. 2020: classes in order of probability until their cumulative probability passes qhat;
  deterministic APS over-covers with three classes). A set holding normal and a pneumonia class is a
  verdict of "uncertain: refer".
* **Mahalanobis out-of-distribution score** (Lee et al. 2018): the distance of the image's pooled
  features to the nearest class mean, under the training features' shared covariance, after a PCA;
  its threshold flags at most 2 % of the validation images. A flagged image gets no diagnosis.
* **Upside-down check**: a logistic regression on the row and column profiles of a 32 px thumbnail
  (:func:`pneumoscan.scope.upright_profile`), fitted on the training films against the same films
  turned by 180 degrees, which the image checks and the feature score miss; its threshold flags at most
  0.2 % of the validation films.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .labels import BACTERIAL, DEFAULT_THRESHOLD, LABELS, NORMAL, VIRAL, decide

UNCERTAIN = "uncertain: refer"  # the verdict when a prediction set holds normal and a pneumonia class
CONFORMAL_METHODS = ("lac", "aps")


def temperature_scale(probs: np.ndarray, temperature: float, bias: "np.ndarray | list[float] | None" = None) -> np.ndarray:
    """``softmax(log p / T + b)`` row-wise: T > 1 softens over-confident probabilities; ``bias`` (one value per
    class, bias-corrected temperature scaling) moves the classes' base rates; T = 1 without bias changes nothing."""
    if temperature == 1.0 and bias is None:
        return np.asarray(probs, float)
    z = np.log(np.clip(np.asarray(probs, float), 1e-12, None)) / temperature
    if bias is not None:
        z = z + np.asarray(bias, float)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def model_calibration(config: dict) -> tuple[float, "list[float] | None"]:
    """(temperature, class bias) that 'pneumoscan calibrate' recorded in a model's config; (1, None) before."""
    cal = config.get("calibration") or {}
    return float(cal.get("temperature", 1.0)), cal.get("bias")


def calibrated_decision(probs: np.ndarray, config: dict) -> np.ndarray:
    """The decided class of each row of ``probs`` after the model's calibration, at its threshold."""
    return decide(temperature_scale(probs, *model_calibration(config)),
                  float(config.get("threshold", DEFAULT_THRESHOLD)))


def decision_settings(config: dict) -> dict:
    """What a verdict depends on besides the network: the calibration, the threshold, the conformal quantile and
    the out-of-scope threshold. An INT8 export records them; its gate and guard hold only while they are unchanged."""
    c, o = config.get("conformal") or {}, config.get("ood") or {}
    cal = config.get("calibration") or {}
    return {"temperature": cal.get("temperature"), "bias": cal.get("bias"), "threshold": config.get("threshold"),
            "qhat": c.get("qhat"), "conformal": c.get("method"), "ood_threshold": o.get("threshold")}


def ood_threshold(config: dict, precision: str = "fp32") -> float | None:
    """The threshold of a model's learned out-of-scope score for the graph that runs (None: the model has no
    such gate): with ``precision`` "int8", the INT8 export's own when it recorded one (its features are noisier,
    see :func:`pneumoscan.export.int8.int8_ood_threshold`), else the one 'pneumoscan calibrate' chose."""
    if not config.get("ood"):
        return None
    if precision == "int8":
        t = ((config.get("onnx") or {}).get("int8") or {}).get("ood_threshold")
        if t is not None:
            return float(t)
    return float(config["ood"]["threshold"])


def aps_scores(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Conformity scores of APS: the probability mass of the classes ranked at or above the true one."""
    p = np.asarray(probs, float)
    order = np.argsort(-p, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    rank = np.argmax(order == np.asarray(y)[:, None], axis=1)
    return cum[np.arange(len(p)), rank]


def conformity_scores(probs: np.ndarray, y: np.ndarray, method: str = "lac") -> np.ndarray:
    """Non-conformity of the true classes: ``1 - p_true`` (lac) or the APS mass (aps)."""
    if method == "aps":
        return aps_scores(probs, y)
    p = np.asarray(probs, float)
    return 1.0 - p[np.arange(len(p)), np.asarray(y, int)]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the k-th smallest score, k = ceil((n + 1)(1 - alpha)); infinite
    (every class in every set) when k > n, i.e. too few calibration scores for this alpha."""
    s = np.sort(np.asarray(scores, float))
    k = int(np.ceil((len(s) + 1) * (1 - alpha)))
    return float(s[k - 1]) if 1 <= k <= len(s) else float("inf")


def prediction_sets(probs: np.ndarray, qhat: float, method: str = "lac") -> list[list[str]]:
    """Conformal sets in LABELS order (the most probable class always): lac, every class with
    probability >= 1 - qhat; aps, classes in order of probability while their cumulative
    probability stays within ``qhat``."""
    p = np.asarray(probs, float)
    if method == "lac":
        keep = p >= 1.0 - qhat - 1e-12
        keep[np.arange(len(p)), p.argmax(axis=1)] = True
        return [[lab for lab, k in zip(LABELS, row) if k] for row in keep]
    order = np.argsort(-p, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    keep = cum <= qhat + 1e-12
    keep[:, 0] = True
    out = []
    for o, k in zip(order, keep):
        members = set(o[k].tolist())
        out.append([lab for i, lab in enumerate(LABELS) if i in members])
    return out


def decided_sets(probs: np.ndarray, threshold: float, qhat: float, method: str = "lac") -> list[list[str]]:
    """The sets a user is shown: conformal sets (LABELS order) of calibrated probabilities with the class the
    threshold rule decides always in its set (the rule may pick a class the set would not have reached)."""
    sets = prediction_sets(probs, qhat, method)
    return [[lab for lab in LABELS if lab in s or lab == LABELS[k]] for s, k in zip(sets, decide(probs, threshold))]


def set_verdict(label: str, pset: list[str]) -> str:
    """The label, or :data:`UNCERTAIN` when the set holds normal and a kind of pneumonia."""
    if LABELS[NORMAL] in pset and (LABELS[BACTERIAL] in pset or LABELS[VIRAL] in pset):
        return UNCERTAIN
    return label


@dataclass
class OODScorer:
    """Mahalanobis distance to the nearest class mean in a PCA of the training features."""

    mean: np.ndarray  # (d,) training feature mean
    components: np.ndarray  # (k, d) PCA directions
    class_means: np.ndarray  # (classes, k) per-class means in PCA space
    precision: np.ndarray  # (k, k) inverse of the shared (shrunk) covariance
    upright: np.ndarray | None = None  # (profile + 1,) logistic weights, bias last: P(turned by 180 degrees)
    # the thresholds live in the model's config.json ("ood"), next to how they were chosen

    def upside_down(self, profiles: np.ndarray) -> np.ndarray:
        """P(the film is upside down) for :func:`pneumoscan.scope.upright_profile` rows."""
        z = np.asarray(profiles, np.float64) @ self.upright[:-1] + self.upright[-1]
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) @ self.components.T
        d = z[:, None, :] - self.class_means[None]
        m = ((d @ self.precision) * d).sum(-1)  # d' P d per class, one BLAS product (4x the 3-operand einsum)
        return np.sqrt(np.clip(m.min(axis=1), 0, None))

    def to_bytes(self) -> bytes:
        """The scorer as safetensors (float32)."""
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(getattr(self, k), np.float32)
                   for k in ("mean", "components", "class_means", "precision", "upright") if getattr(self, k) is not None}
        return save(tensors, metadata={"format": "pneumoscan-ood/1"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OODScorer":
        from safetensors.numpy import load_file

        t = load_file(str(path))
        return cls(mean=t["mean"].astype(np.float64), components=t["components"].astype(np.float64),
                   class_means=t["class_means"].astype(np.float64), precision=t["precision"].astype(np.float64),
                   upright=t["upright"].astype(np.float64) if "upright" in t else None)


GUARD_BOUNDARIES = ("pneumonia", "subtype", "refer_1", "refer_2", "scope")
"""The boundaries a served verdict crosses, in :func:`boundary_distances`' columns: the pneumonia threshold,
bacterial against viral, two that decide whether a conformal set makes "uncertain: refer" (LAC: normal's edge,
the more probable pneumonia's edge; APS: the second class's edge, the ranking's closest tie), and the
out-of-scope threshold."""


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p)


def boundary_distances(probs: np.ndarray, threshold: float, qhat: float | None = None, method: str = "lac",
                       scores: np.ndarray | None = None, ood_threshold: float | None = None) -> np.ndarray:
    """Signed distance of each row of calibrated ``probs`` to each of :data:`GUARD_BOUNDARIES` (columns), in units
    where a graph's numerical error is about even across images: log-odds for the class boundaries, the squared
    out-of-scope score (``scores`` against ``ood_threshold``) for the gate (INT8 noise adds to squared distances).
    Positive: pneumonia, bacterial, in the set, out of scope. NaN where the model has no such boundary (no
    conformal sets, no learned gate; an APS set has one edge, the second class joining it)."""
    p = np.asarray(probs, float)
    d = np.full((len(p), len(GUARD_BOUNDARIES)), np.nan)
    d[:, 0] = _logit(1.0 - p[:, NORMAL]) - _logit(np.array(threshold))
    d[:, 1] = np.log(np.clip(p[:, BACTERIAL], 1e-12, None)) - np.log(np.clip(p[:, VIRAL], 1e-12, None))
    if qhat is not None and 0.0 < qhat < 1.0:
        if method == "lac":  # a class is in the set when its probability reaches 1 - qhat
            edge = _logit(np.array(1.0 - qhat))
            d[:, 2] = _logit(p[:, NORMAL]) - edge
            d[:, 3] = _logit(np.maximum(p[:, BACTERIAL], p[:, VIRAL])) - edge
        else:  # aps: the second most probable class is in the set while the top two's mass stays within qhat,
            # and which classes are first and second is the ranking's (its closest tie, unsigned)
            top = np.log(np.clip(np.sort(p, axis=1)[:, ::-1], 1e-12, None))
            d[:, 2] = _logit(np.array(qhat)) - _logit(np.exp(top[:, :2]).sum(axis=1))
            d[:, 3] = np.minimum(top[:, 0] - top[:, 1], top[:, 1] - top[:, 2])
    if scores is not None and ood_threshold is not None:
        d[:, 4] = np.asarray(scores, float) ** 2 - float(ood_threshold) ** 2
    return d


@dataclass(frozen=True)
class Int8Guard:
    """Which INT8 answers to check in fp32: those of images whose INT8 outputs lie within ``margins`` of a
    boundary of the verdict (:func:`boundary_distances`), the margins being a high quantile of INT8's error on
    each boundary's distance over the calibration images. Far from every boundary, INT8's error cannot change
    the verdict; near one, the image is run again in fp32 and fp32 answers."""

    margins: tuple[float, ...]  # one per GUARD_BOUNDARIES; NaN: that boundary is not guarded

    @classmethod
    def fit(cls, d32: np.ndarray, d8: np.ndarray, quantile: float, min_scope: float = 0.0) -> "Int8Guard":
        """Margins from the distances of the same images under fp32 (``d32``) and INT8 (``d8``); the scope margin
        is at least ``min_scope`` (the gap between the two graphs' thresholds, so that an image INT8 decides alone
        gets the same decision from fp32's threshold)."""
        err = np.abs(np.asarray(d8, float) - np.asarray(d32, float))
        m = np.full(err.shape[1], np.nan)
        for j in range(err.shape[1]):
            e = err[:, j][np.isfinite(err[:, j])]
            if len(e):
                m[j] = float(np.quantile(e, quantile))
        if np.isfinite(m[-1]):
            m[-1] = max(m[-1], float(min_scope))
        return cls(tuple(float(v) for v in m))

    def needs_fp32(self, d: np.ndarray) -> np.ndarray:
        """Rows of INT8 distances ``d`` whose verdict INT8 cannot be trusted with."""
        m = np.asarray(self.margins, float)
        near = np.abs(d) < m  # NaN margins or distances compare False: not guarded
        pneumonia, subtype, refer_n, refer_p, scope = (near[:, j] for j in range(len(GUARD_BOUNDARIES)))
        out = np.nan_to_num(d[:, 4], nan=-np.inf) >= np.nan_to_num(m[4], nan=np.inf)  # clearly stopped: no class
        maybe_pneumonia = np.nan_to_num(d[:, 0], nan=np.inf) > -m[0]
        return scope | (~out & (pneumonia | (subtype & maybe_pneumonia) | refer_n | refer_p))

    def to_dict(self) -> dict[str, float | None]:
        return {k: (v if np.isfinite(v) else None) for k, v in zip(GUARD_BOUNDARIES, self.margins)}

    @classmethod
    def from_dict(cls, margins: dict) -> "Int8Guard":
        return cls(tuple(float("nan") if margins.get(k) is None else float(margins[k]) for k in GUARD_BOUNDARIES))
