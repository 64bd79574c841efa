"""Index a chest X-ray folder into a manifest: label, patient key and a patient-grouped split.

Two layouts are recognised, at any depth under the root:

* the redistribution ("Chest X-Ray Images (Pneumonia)"): ``NORMAL/`` and ``PNEUMONIA/``,
  optionally under ``train/ test/ val/``; bacterial vs viral comes from the file name;
* a plain three-class layout: ``normal/ bacterial/ viral/``.

Patient keys follow the dataset's naming (``personN_bacteria_*`` and ``personN_virus_*`` are
different children; ``IM-XXXX`` / ``NORMAL2-IM-XXXX`` for normal images). Files whose name
carries no patient key are their own patient.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import DataError
from ..io import file_digest
from .manifest import Manifest, Sample

log = logging.getLogger(__name__)

VAL_FRACTION = 0.2  # patient-grouped validation share of a split (the one default)
MANIFEST_NAME = "manifest.csv"  # what 'pneumoscan data index DIR' writes into DIR
_PERSON = re.compile(r"person(\d+)_(bacteria|virus)", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)
_SPLIT_DIRS = {"train": "train", "val": "train", "test": "test"}  # official val joins train


def check_val_fraction(v: float) -> None:
    """A validation share the patient-grouped split can make: one of k >= 2 folds, so above 0 and at most 0.5."""
    if not 0.0 < v <= 0.5:  # nan fails too
        raise DataError(f"val fraction {v} must lie in (0, 0.5]: the split holds out one of k >= 2 patient-grouped "
                        "folds (e.g. 0.2)")


def patient_key(name: str, label: str) -> str:
    """Patient key from a file name (see module docstring); falls back to the file stem."""
    stem = Path(name).stem
    m = _PERSON.search(stem)
    if m:
        return f"{m.group(2).lower()}-{int(m.group(1))}"
    m = _NORMAL.match(stem)
    if m:
        return m.group(1).upper()
    return f"{label}-{stem}"


def label_from_path(rel: Path) -> str | None:
    """Label from the folders (and, under PNEUMONIA/, the file name); ``None`` if unknown."""
    parts = [p.lower() for p in rel.parts[:-1]]
    name = rel.name.lower()
    for p in reversed(parts):
        if p in ("normal",):
            return "normal"
        if p in ("bacterial", "bacteria"):
            return "bacterial"
        if p in ("viral", "virus"):
            return "viral"
        if p == "pneumonia":
            if "bacteria" in name:
                return "bacterial"
            if "virus" in name:
                return "viral"
            return None
    return None


def _source_split(rel: Path) -> str:
    for p in rel.parts[:-1]:
        if p.lower() in _SPLIT_DIRS:
            return _SPLIT_DIRS[p.lower()]
    return ""


def content_sha1(path: str | os.PathLike) -> str:
    """The content hash of an image (the manifest's ``sha1``: cache key and duplicate detection)."""
    return file_digest(path, "sha1")


def _looks_like_image(path: Path) -> str | None:
    """Cheap header check; returns a reason string when the file is not a usable image."""
    from .imaging import sniff_format

    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not head:
        return "empty file"
    fmt = sniff_format(head)
    if fmt is None:
        return f"not a JPEG, PNG or DICOM file ({path.suffix or 'no extension'})"
    return None


def _resolved(folder: str | os.PathLike | None) -> Path | None:
    return Path(folder).resolve() if folder is not None else None


def scan(root: str | os.PathLike,
         exclude: str | os.PathLike | None = None) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """Walk ``root``: (path, label, source_split) for every image, and (path, reason) for skips.
    ``exclude``: the command's own output folder, never walked (its figures are not X-rays)."""
    root = Path(root)
    skip = _resolved(exclude)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; give a folder with NORMAL/ and PNEUMONIA/ "
                        "(or normal/ bacterial/ viral/), or fetch the data with 'pneumoscan data download'")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give the folder that holds the images")
    found: list[tuple[Path, str, str]] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX"
                             and (skip is None or (Path(dirpath) / d).resolve() != skip))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            path = Path(dirpath) / fn
            rel = path.relative_to(root)
            label = label_from_path(rel)
            if label is None:
                if any(p.lower() in ("normal", "pneumonia", "bacterial", "viral") for p in rel.parts[:-1]):
                    skipped.append((str(path), "no class in the name (expected 'bacteria' or 'virus')"))
                continue
            reason = _looks_like_image(path)  # by content: PACS exports are often DICOM without an extension
            if reason:
                skipped.append((str(path), reason))
                continue
            found.append((path, label, _source_split(rel)))
    return found, skipped


@dataclass(frozen=True)
class SplitConfig:
    """How a folder is split into train and validation (``pneumoscan data index``)."""

    val_fraction: float = VAL_FRACTION  # patient-grouped validation share, e.g. 0.2
    seed: int = 0  # seed of the split

    def __post_init__(self) -> None:
        check_val_fraction(self.val_fraction)


def split_patients(samples: Sequence[Sample], val_fraction: float = VAL_FRACTION, seed: int = 0) -> list[Sample]:
    """Patient-grouped, class-stratified train/val split of the non-test samples (deterministic)."""
    from sklearn.model_selection import StratifiedGroupKFold

    check_val_fraction(val_fraction)
    idx = [i for i, s in enumerate(samples) if s.source_split != "test"]
    out = list(samples)
    if not idx:
        return out
    n_folds = min(range(2, max(3, round(1.0 / val_fraction) + 2)), key=lambda k: abs(1.0 / k - val_fraction))
    y = np.array([samples[i].target for i in idx])
    groups = np.array([samples[i].patient for i in idx])
    if len(set(groups)) < n_folds:
        raise DataError(f"only {len(set(groups))} patients: too few for a {val_fraction:.0%} validation split")
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    try:
        _, val_idx = next(sgkf.split(np.zeros(len(idx)), y, groups))
    except ValueError as e:  # e.g. a class with fewer patients than folds
        raise DataError(f"cannot make a {val_fraction:.0%} patient-grouped validation split of "
                        f"{len(idx)} images ({e}); add images or raise --val-fraction") from None
    val = {idx[i] for i in val_idx}
    for i in idx:
        out[i] = replace(samples[i], split="val" if i in val else "train")
    share = len(val) / len(idx)
    if abs(share - val_fraction) > 0.05:  # whole patients, stratified: a small folder cannot always meet the share
        log.warning("the validation split holds %.0f%% of the %d images, not the %.0f%% asked for: it takes one of "
                    "%d patient-grouped folds, each patient whole", 100 * share, len(idx), 100 * val_fraction, n_folds)
    return out


def index_dataset(root: str | os.PathLike, val_fraction: float = VAL_FRACTION, seed: int = 0,
                  progress: bool = False, exclude: str | os.PathLike | None = None) -> Manifest:
    """Index ``root`` into a :class:`Manifest` with a patient-grouped train/val split.

    Images under a ``test/`` folder keep ``split="test"``; everything else is split by patient.
    Unreadable and non-image files are listed in ``manifest.skipped`` (never silently dropped).
    ``exclude``: the command's own output folder, not indexed (:func:`scan`).
    """
    root = Path(root).resolve()
    found, skipped = scan(root, exclude)
    if not found:
        raise DataError(
            f"no labelled images under {root}: expected NORMAL/ and PNEUMONIA/ (optionally under "
            "train/ test/ val/) or normal/ bacterial/ viral/ folders holding JPEG, PNG or DICOM files"
        )
    from tqdm.auto import tqdm

    samples = []
    for path, label, src in tqdm(found, desc="index", unit="img", disable=not progress):
        rel = path.relative_to(root)
        samples.append(Sample(path=str(path), relpath=rel.as_posix(), label=label,
                              patient=patient_key(path.name, label),
                              split="test" if src == "test" else "train",
                              source_split=src, sha1=content_sha1(path)))
    samples = split_patients(samples, val_fraction, seed)
    first: dict[str, Sample] = {}
    for smp in samples:  # the same bytes under two labels: one of them is wrong, and the copies may straddle splits
        other = first.setdefault(smp.sha1, smp)
        if other is not smp and other.label != smp.label:
            log.warning("%s (%s, %s split) and %s (%s, %s split) are the same image under two labels; remove the "
                        "wrong copy", other.relpath, other.label, other.split, smp.relpath, smp.label, smp.split)
    for p, why in skipped:
        log.warning("skipped %s: %s", p, why)
    return Manifest(root=str(root), samples=samples, skipped=skipped)


def resolve_manifest(data: str | os.PathLike, val_fraction: float = VAL_FRACTION, seed: int = 0) -> Manifest:
    """A manifest from either a manifest CSV or a data folder (indexed on the fly)."""
    p = Path(data)
    if p.suffix.lower() == ".csv":
        return Manifest.load(p)
    beside = p / MANIFEST_NAME
    if beside.is_file():  # one rule: the manifest 'pneumoscan data index DIR' wrote is the split of DIR
        log.info("using %s (its own split; delete it, or pass another manifest CSV, to split differently)", beside)
        return Manifest.load(beside)
    return index_dataset(p, val_fraction, seed)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".dcm", ".dicom")  # a folder member named so must be an image


def iter_image_files(paths: Iterable[str | os.PathLike],
                     exclude: str | os.PathLike | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into image files; returns (files, [(path, problem)]).

    Folder members are judged by content, so DICOM files without an extension count and notes or CSV
    files beside the images are passed over; a member *named* as an image (``IMAGE_SUFFIXES``) that is
    empty, unreadable or another kind of file is a problem, reported like a missing path, never dropped.
    ``exclude``: the command's own output folder; when it lies inside a folder given, what it holds is not an
    input (a command that writes images would otherwise read its earlier run's pictures back as X-rays)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    skip = _resolved(exclude)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            inside = skip is not None and skip != p.resolve() and p.resolve() in skip.parents
            for q in sorted(p.rglob("*")):
                if any(part.startswith(".") for part in q.relative_to(p).parts) or q.is_dir():
                    continue
                if not q.is_file():  # a link to nothing, a pipe (never opened: it would block), a device
                    if q.suffix.lower() in IMAGE_SUFFIXES:
                        what = "a symbolic link to nothing" if q.is_symlink() and not q.exists() else "not a regular file"
                        problems.append((str(q), f"{what}; replace it with the X-ray or remove it"))
                    continue
                if inside and skip in q.resolve().parents:
                    continue
                reason = _looks_like_image(q)
                if reason is None:
                    files.append(q)
                elif q.suffix.lower() in IMAGE_SUFFIXES:
                    problems.append((str(q), f"{reason}; replace it with the X-ray or remove it"))
        elif p.is_file():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder" if not p.exists() else "not a regular file"))
    seen: set[Path] = set()
    unique = []
    for f in files:  # a file named twice (or also through its folder) counts once: a prior estimate would weigh it twice
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, list(dict.fromkeys(problems))
