"""The class order and the decision rule, shared by every output (logits, metrics, CSVs, the API).

Decision rule: an image is pneumonia when P(bacterial) + P(viral) >= the model's threshold; a
pneumonia image is then bacterial or viral by the larger of the two. The 3-class prediction, the
confusion matrix and the binary verdicts therefore always agree.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ModelError

LABELS: tuple[str, ...] = ("normal", "bacterial", "viral")
"""Class order of every output: model logits, metrics, CSVs and the API."""

NORMAL, BACTERIAL, VIRAL = (LABELS.index(k) for k in ("normal", "bacterial", "viral"))

DEFAULT_THRESHOLD = 0.5
"""The pneumonia threshold of a model whose validation data could not choose one."""


def check_labels(labels: Sequence[str] | None, source: str = "config.json") -> tuple[str, ...]:
    """The model's class order, which must be :data:`LABELS` (a model whose outputs are in
    another order or of other classes is refused, never silently mislabelled)."""
    got = tuple(labels) if labels is not None else LABELS
    if got != LABELS:
        raise ModelError(f"{source}: classes {list(got)} are not pneumoscan's {list(LABELS)} (in that order); "
                         "this model was not made by pneumoscan or comes from an incompatible version")
    return got


def pneumonia_score(probs: np.ndarray) -> np.ndarray:
    """P(pneumonia) = P(bacterial) + P(viral) = 1 - P(normal)."""
    return 1.0 - np.asarray(probs)[:, NORMAL]


def decide(probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Class indices under the shared decision rule (see module docstring)."""
    probs = np.asarray(probs)
    subtype = np.where(probs[:, BACTERIAL] >= probs[:, VIRAL], BACTERIAL, VIRAL)
    return np.where(pneumonia_score(probs) >= threshold, subtype, NORMAL)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (numerically stable); ONNX Runtime outputs are logits."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
