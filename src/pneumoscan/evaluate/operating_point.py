"""Operating point: re-choosing a model's pneumonia threshold on its validation split.

The validation images are those of :func:`pneumoscan.data.splits.validation_set` (the ``val``
split of the manifest the model was trained on). The new threshold is written into
``config.json`` atomically, the old one kept in ``threshold_history``; the weights are not touched.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

import numpy as np

from ..data.splits import BOTH_SIDES, EvalSet, check_classes, check_present, validation_set
from ..errors import DataError
from ..io import atomic_write_json, json_safe
from ..metrics import choose_threshold, compute_metrics
from ..nets.modeldir import CONFIG_NAME, read_config
from ..predict import Predictor
from .config import ThresholdConfig

log = logging.getLogger(__name__)


def score(predictor: Predictor, ev: EvalSet, batch_size: int = 32,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, probabilities) of the images of ``ev`` that decode; failures are logged."""
    probs, _, kept, errors = predictor.arrays(ev.paths, batch_size, progress, features=False)
    for path, err in errors[:5]:
        log.warning("skipped %s: %s", path, err)
    if not kept:
        raise DataError(f"none of the {len(ev)} validation images of {ev.source} could be decoded")
    truth = dict(zip(ev.paths, ev.y))
    return np.array([truth[p] for p in kept], int), probs


def set_threshold(cfg: dict, threshold: float, method: str, *, record: dict | None = None,
                  val_metrics: dict | None = None, val_data: dict | None = None) -> dict:
    """Set the pneumonia threshold in a config dictionary, keeping the old value and method in
    ``threshold_history``; returns ``cfg``."""
    entry = {"threshold": cfg.get("threshold"), "method": cfg.get("threshold_method"),
             "replaced": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "new_threshold": float(threshold), "new_method": method, **(record or {})}
    cfg["threshold_history"] = [*cfg.get("threshold_history", []), entry]
    cfg["threshold"] = float(threshold)
    cfg["threshold_method"] = method
    if val_metrics is not None:
        cfg["val_metrics"] = val_metrics
    if val_data is not None:
        cfg["val_data"] = val_data
    return cfg


def write_threshold(model_dir: str | os.PathLike, threshold: float, method: str, **kw) -> dict:
    """:func:`set_threshold` on the model's ``config.json`` (atomically). Weights are not touched."""
    d = Path(model_dir)
    cfg = set_threshold(read_config(d), threshold, method, **kw)
    atomic_write_json(d / CONFIG_NAME, cfg)
    return cfg


def retune(model_dir: str | os.PathLike, data: str | os.PathLike | None = None,
           cfg: ThresholdConfig = ThresholdConfig(), *, progress: bool = False) -> dict:
    """Re-choose a model's threshold on its validation split and write it into config.json.

    ``data`` is the training folder or a manifest CSV (default: the model's own manifest.csv).
    Returns ``{"old": ..., "new": ..., "method": ..., "n_val": ..., "val_metrics": ...}``.
    """
    d = Path(model_dir)
    conf = read_config(d)
    ev = validation_set(data, conf, d, force=cfg.force)
    log.info("validation set: %r", ev)
    check_present(ev.paths, f"the validation split of {ev.source}")
    check_classes(ev.y, f"the validation split of {ev.source}", "the threshold", BOTH_SIDES)
    predictor = Predictor(d, precision="fp32")  # the threshold is chosen on the reference graph
    try:
        y, probs = score(predictor, ev, cfg.batch_size, progress)
    finally:
        predictor.close()
    check_classes(y, f"the validation images of {ev.source} that decode", "the threshold", BOTH_SIDES)
    thr, how = choose_threshold(y, probs, cfg.method, cfg.target_sensitivity)
    vm = json_safe(compute_metrics(y, probs, thr))
    record = {"data": ev.source, "manifest_sha256": ev.manifest_sha256, "n_val": int(len(y))}
    val_data = {"source": ev.source, "manifest_sha256": ev.manifest_sha256, "n": int(len(y)),
                "matches_model": ev.matches_model}
    write_threshold(d, thr, how, record=record, val_metrics=vm if ev.matches_model else None, val_data=val_data)
    log.info("threshold %.4f (%s) on %d validation images", thr, how, len(y))
    return {"old": conf.get("threshold"), "new": thr, "method": how, "n_val": int(len(y)), "val_metrics": vm,
            "manifest_sha256": ev.manifest_sha256}
