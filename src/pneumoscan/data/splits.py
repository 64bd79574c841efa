"""A model's validation images: the ``val`` split of the manifest it was trained on.

The validation set is that split of the model's ``manifest.csv``, of a manifest CSV, or of the data
folder indexed again with the model's split settings. A manifest whose SHA-256 differs from the
model's ``manifest_sha256`` may put the model's training images into "validation": that is refused
unless forced, because figures (and thresholds) on training images are optimistic.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..labels import BACTERIAL, LABELS, NORMAL, VIRAL
from .index import content_sha1, index_dataset, patient_key, scan
from .manifest import Manifest, Sample

log = logging.getLogger(__name__)


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
        counts = " ".join(f"{lab}={n}" for lab, n in zip(LABELS, class_counts(self.y)))
        return f"EvalSet({self.source!r}, split={self.split}, n={len(self)}; {counts})"


def class_counts(y: Sequence[int] | np.ndarray) -> np.ndarray:
    """Images of each class of LABELS among the class indices ``y``."""
    return np.bincount(np.asarray(y, int), minlength=len(LABELS))


def split_settings(config: dict) -> tuple[float, int]:
    """(val_fraction, seed) the model's data were split with (first member's for an ensemble)."""
    tc = config.get("train_config")
    if tc is None and config.get("members"):
        return split_settings(config["members"][0])
    tc = tc or {}
    return float(tc.get("val_fraction", 0.2)), int(tc.get("seed", 0))


def load_manifest(data: str | os.PathLike | None, config: dict, model_dir: str | os.PathLike | None,
                  allow_unsplit: bool = False) -> Manifest:
    """The manifest behind ``data``: a manifest CSV, a folder, or, when ``data`` is None, the
    ``manifest.csv`` saved in the model directory. A folder that holds every image of the model's
    manifest.csv (same relative paths and content) gives that manifest with its paths moved there (the
    split a model was trained with cannot always be re-derived: a manifest made with another seed);
    any other folder is indexed with the model's split settings.

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
    own = Path(model_dir) / "manifest.csv" if model_dir is not None else None
    if own is not None and own.is_file() and p.is_dir():
        moved = Manifest.load(own).moved_to(p)
        if moved is not None:  # the model's own data, in another place: its own split, not a guess at it
            return moved
    vf, seed = split_settings(config)
    return index_dataset(p, vf, seed)


def _unsplit_manifest(folder: Path) -> Manifest | None:
    """All images of a folder without train/ or val/ folders (``split="all"``); None otherwise.
    Paths stay under the folder as ``index_dataset`` keeps them: a member that is a symbolic link to an
    image elsewhere is read through its link (resolving it would leave the folder, and its relative path)."""
    root = folder.resolve()
    found, skipped = scan(root)
    if not found or any(src == "train" for _, _, src in found):
        return None
    samples = []
    for f, label, src in found:
        samples.append(Sample(path=str(f), relpath=f.relative_to(root).as_posix(), label=label,
                              patient=patient_key(f.name, label), split="all", source_split=src, sha1=content_sha1(f)))
    return Manifest(root=str(root), samples=samples, skipped=skipped)


def training_overlap(samples, model_dir: str | os.PathLike | None) -> int | None:
    """How many of ``samples`` (by content hash) are in the model's training split; None if unknown."""
    path = Path(model_dir) / "manifest.csv" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    train = {s.sha1 for s in Manifest.load(path).samples if s.split == "train"}
    return sum(s.sha1 in train for s in samples)


def sample_path(m: Manifest, s) -> str:
    """The sample's absolute path, or its path relative to the manifest when the data moved."""
    if os.path.exists(s.path):
        return s.path
    alt = Path(m.root) / s.relpath
    return str(alt) if alt.exists() else s.path


def calibration_sample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``k`` of ``n`` training images (all when ``k >= n``): the
    images INT8 activation ranges are fitted on, by ``export --int8`` and by quantisation-aware training."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(k, n), replace=False))


def check_present(paths: Sequence[str], source: str) -> None:
    """Refuse, before any work, a split whose images are not where the manifest says (a model's
    manifest.csv from another machine): one line naming the first and how many."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} images of {source} are not on this machine (first: "
                        f"{missing[0]}); pass --data with the training folder (e.g. ../shared/data/chest_xray) or "
                        "its manifest CSV")


# what a fit on validation images needs, as {name: the classes that count for it}
EVERY_CLASS = {lab: (i,) for i, lab in enumerate(LABELS)}  # one bias per class: calibrate
BOTH_SIDES = {"normal": (NORMAL,), "pneumonia": (BACTERIAL, VIRAL)}  # normal vs pneumonia: the threshold


def check_classes(y: Sequence[int] | np.ndarray, source: str, job: str,
                  needs: dict[str, tuple[int, ...]] = EVERY_CLASS) -> None:
    """Refuse, before any work, validation images without a class that ``job`` is fitted on (a fit on one
    class is silently wrong: the threshold falls back to a default, a bias runs to its bound): one line with
    the images of each class and what to do."""
    c = class_counts(y)
    missing = [name for name, idx in needs.items() if not c[list(idx)].sum()]
    if missing:
        counts = ", ".join(f"{lab} {n}" for lab, n in zip(LABELS, c))
        raise DataError(f"{source} has no {' and no '.join(missing)} images ({counts}): {job} needs images of "
                        f"{'every class' if needs is EVERY_CLASS else ' and '.join(needs)}; pass --data with a training "
                        "folder or manifest CSV whose validation split holds them (e.g. ../shared/data/chest_xray)")


def validation_set(data: str | os.PathLike | None, config: dict, model_dir: str | os.PathLike | None = None, *,
                   force: bool = False, allow_unsplit: bool = False, can_force: bool = True) -> EvalSet:
    """The model's validation images (``split == "val"``).

    ``allow_unsplit``: data without a validation split (a folder without train/ or val/ folders,
    or a manifest without ``val`` rows) give all their images. Images of another manifest that
    are in the model's training split (by content hash) are refused unless ``force`` (or only
    warned about with ``allow_unsplit``); without the model's manifest.csv the overlap is unknown.
    ``can_force``: whether the command has a ``--force`` to name in that refusal (``export --int8`` and
    ``adapt`` have none: their figures must never rest on training images).
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
            raise DataError(msg + "; pass the model's manifest.csv" + (", or --force to use it anyway" if can_force
                                                                         else " (or its training folder)"))
        log.warning("%s: figures on them are optimistic", msg)
    return EvalSet(paths=[sample_path(m, s) for s in samples], y=np.array([s.target for s in samples], int),
                   source=source, split=split, manifest_sha256=digest, matches_model=matches,
                   training_overlap=overlap)
