"""Operating point: the validation set of a model, and re-choosing its pneumonia threshold there.

The validation set is the ``val`` split of the manifest the model was trained on (its
``manifest.csv``, a manifest CSV, or the data folder indexed again with the model's split
settings). A manifest whose SHA-256 differs from the model's ``manifest_sha256`` may put the
model's training images into "validation": that is refused unless forced, because a threshold
chosen on training images is optimistic.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import LABELS
from .data import Manifest, Sample, _sha1, index_dataset, patient_key, scan
from .errors import DataError, PneumoscanError
from .metrics import choose_threshold, compute_metrics
from .modeldir import CONFIG_NAME, atomic_write_json, json_safe, read_config

log = logging.getLogger(__name__)

METHODS = ("youden", "sensitivity")


@dataclass
class EvalSet:
    """Labelled images to score: paths, true class indices and where they came from."""

    paths: list[str]  # image files
    y: np.ndarray  # indices into LABELS
    source: str  # manifest CSV or data folder they came from
    split: str  # "val", or "all" when the data has no validation split
    manifest_sha256: str  # digest of the manifest they were drawn from
    matches_model: bool  # True when that manifest is the one the model was trained on
    training_overlap: int | None = None  # images also in the model's training split (None: not checked)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        c = np.bincount(self.y, minlength=len(LABELS))
        counts = " ".join(f"{lab}={n}" for lab, n in zip(LABELS, c))
        return f"EvalSet({self.source!r}, split={self.split}, n={len(self)}; {counts})"


def split_settings(config: dict) -> tuple[float, int]:
    """(val_fraction, seed) the model's data were split with (first member's for an ensemble)."""
    tc = config.get("train_config")
    if tc is None and config.get("members"):
        return split_settings(config["members"][0])
    tc = tc or {}
    return float(tc.get("val_fraction", 0.2)), int(tc.get("seed", 0))


def load_manifest(data: str | os.PathLike | None, config: dict, model_dir: str | os.PathLike | None,
                  allow_unsplit: bool = False) -> Manifest:
    """The manifest behind ``data``: a manifest CSV, a folder (indexed with the model's split
    settings), or, when ``data`` is None, the ``manifest.csv`` saved in the model directory.

    With ``allow_unsplit``, a folder without train/ or val/ folders is taken whole (``split="all"``).
    """
    if data is None:
        path = Path(model_dir) / "manifest.csv" if model_dir is not None else None
        if path is None or not path.is_file():
            raise DataError(f"{model_dir} has no manifest.csv to take the validation split from; "
                            "pass --data with the training folder or its manifest CSV")
        return Manifest.load(path)
    p = Path(data)
    if p.suffix.lower() == ".csv":
        return Manifest.load(p)
    if allow_unsplit:
        whole = _unsplit_manifest(p)
        if whole is not None:
            return whole
    vf, seed = split_settings(config)
    return index_dataset(p, vf, seed)


def _unsplit_manifest(folder: Path) -> Manifest | None:
    """All images of a folder without train/ or val/ folders (``split="all"``); None otherwise."""
    found, skipped = scan(folder)
    if not found or any(src == "train" for _, _, src in found):
        return None
    root = folder.resolve()
    samples = []
    for f, label, src in found:
        f = f.resolve()
        samples.append(Sample(path=str(f), relpath=f.relative_to(root).as_posix(), label=label,
                              patient=patient_key(f.name, label), split="all", source_split=src, sha1=_sha1(f)))
    return Manifest(root=str(root), samples=samples, skipped=skipped)


def training_overlap(samples, model_dir: str | os.PathLike | None) -> int | None:
    """How many of ``samples`` (by content hash) are in the model's training split; None if unknown."""
    path = Path(model_dir) / "manifest.csv" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    train = {s.sha1 for s in Manifest.load(path).samples if s.split == "train"}
    return sum(s.sha1 in train for s in samples)


def _sample_path(m: Manifest, s) -> str:
    """The sample's absolute path, or its path relative to the manifest when the data moved."""
    if os.path.exists(s.path):
        return s.path
    alt = Path(m.root) / s.relpath
    return str(alt) if alt.exists() else s.path


def validation_set(data: str | os.PathLike | None, config: dict, model_dir: str | os.PathLike | None = None, *,
                   force: bool = False, allow_unsplit: bool = False) -> EvalSet:
    """The model's validation images (``split == "val"``).

    ``allow_unsplit``: data without a validation split (a folder without train/ or val/ folders,
    or a manifest without ``val`` rows) give all their images. Images of another manifest that
    are in the model's training split (by content hash) are refused unless ``force`` (or only
    warned about with ``allow_unsplit``); without the model's manifest.csv the overlap is unknown.
    """
    m = load_manifest(data, config, model_dir, allow_unsplit)
    digest = m.digest()
    expected = config.get("manifest_sha256")
    matches = expected is not None and digest == expected
    source = str(data if data is not None else Path(model_dir) / "manifest.csv")
    samples, split = m.subset("val"), "val"
    if not samples and allow_unsplit:
        samples, split = list(m.samples), "all"
        log.info("%s has no validation split: using all %d images", source, len(samples))
    if not samples:
        raise DataError(f"{source} has no validation split (no rows with split == 'val'); pass the training "
                        "folder or the model's manifest.csv")
    overlap = 0 if matches else training_overlap(samples, model_dir)
    if overlap != 0:
        what = ("its images may be" if overlap is None
                else f"{overlap} of the {len(samples)} images used from it are")
        msg = (f"{source} is not the manifest this model was trained on (SHA-256 {digest[:12]}... vs "
               f"{(expected or 'none recorded')[:12]}...) and {what} in the model's training split")
        if not force and not allow_unsplit:
            raise DataError(msg + "; pass the model's manifest.csv, or --force to use it anyway")
        log.warning("%s: figures on them are optimistic", msg)
    return EvalSet(paths=[_sample_path(m, s) for s in samples], y=np.array([s.target for s in samples], int),
                   source=source, split=split, manifest_sha256=digest, matches_model=matches,
                   training_overlap=overlap)


def score(predictor, ev: EvalSet, batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, probabilities) of the images of ``ev`` that decode; failures are logged."""
    preds, errors = predictor.predict_files(ev.paths, batch_size=batch_size, progress=progress)
    for path, err in errors[:5]:
        log.warning("skipped %s: %s", path, err)
    if not preds:
        raise DataError(f"none of the {len(ev)} validation images of {ev.source} could be decoded")
    truth = dict(zip(ev.paths, ev.y))
    y = np.array([truth[p.path] for p in preds], int)
    probs = np.array([[p.probabilities[lab] for lab in predictor.labels] for p in preds])
    return y, probs


def check_method(method: str, target_sensitivity: float | None) -> None:
    """Validate the threshold options where they enter."""
    if method not in METHODS:
        raise PneumoscanError(f"threshold method {method!r} is unknown; use youden or sensitivity")
    if method == "sensitivity" and (target_sensitivity is None or not 0.0 < target_sensitivity <= 1.0):
        raise PneumoscanError(f"--method sensitivity needs --target-sensitivity in (0, 1], e.g. 0.97 "
                              f"(got {target_sensitivity})")


def pick(y: np.ndarray, probs: np.ndarray, method: str = "youden",
         target_sensitivity: float | None = None) -> tuple[float, str]:
    """The threshold and a description of how it was chosen."""
    check_method(method, target_sensitivity)
    return choose_threshold(y, probs, method, target_sensitivity)


def write_threshold(model_dir: str | os.PathLike, threshold: float, method: str, *, record: dict | None = None,
                    val_metrics: dict | None = None) -> dict:
    """Set the pneumonia threshold in ``config.json`` (atomically), keeping the old value and method
    in ``threshold_history``. Weights are not touched. Returns the new config."""
    d = Path(model_dir)
    cfg = read_config(d)
    entry = {"threshold": cfg.get("threshold"), "method": cfg.get("threshold_method"),
             "replaced": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "new_threshold": float(threshold), "new_method": method, **(record or {})}
    cfg["threshold_history"] = [*cfg.get("threshold_history", []), entry]
    cfg["threshold"] = float(threshold)
    cfg["threshold_method"] = method
    if val_metrics is not None:
        cfg["val_metrics"] = val_metrics
    atomic_write_json(d / CONFIG_NAME, cfg)
    write_card_if_available(d)
    return cfg


def write_card_if_available(model_dir: Path) -> None:
    """Refresh MODEL_CARD.md when the model-card module is installed; never fails the caller."""
    try:
        from .card import write_card
    except ImportError:
        return
    try:
        write_card(model_dir)
    except Exception as e:  # the card is documentation: a card bug must not undo a model
        log.warning("MODEL_CARD.md not written for %s: %s", model_dir, e)


def retune(model_dir: str | os.PathLike, data: str | os.PathLike | None = None, *, method: str = "youden",
           target_sensitivity: float | None = None, force: bool = False, batch_size: int = 32,
           progress: bool = False) -> dict:
    """Re-choose a model's threshold on its validation split and write it into config.json.

    Returns ``{"old": ..., "new": ..., "method": ..., "n_val": ..., "val_metrics": ...}``.
    """
    from .predict import Predictor

    check_method(method, target_sensitivity)
    d = Path(model_dir)
    cfg = read_config(d)
    ev = validation_set(data, cfg, d, force=force)
    log.info("validation set: %r", ev)
    y, probs = score(Predictor(d), ev, batch_size, progress)
    thr, how = pick(y, probs, method, target_sensitivity)
    vm = json_safe(compute_metrics(y, probs, thr, n_boot=1000))
    record = {"data": ev.source, "manifest_sha256": ev.manifest_sha256, "n_val": int(len(y))}
    write_threshold(d, thr, how, record=record, val_metrics=vm if ev.matches_model else None)
    return {"old": cfg.get("threshold"), "new": thr, "method": how, "n_val": int(len(y)), "val_metrics": vm}
