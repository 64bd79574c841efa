"""The manifest: one row per image (path, label, patient, split, content hash), saved as CSV.

A manifest is what every later stage reads instead of a folder: it fixes the patient-grouped
split, and its digest identifies the data and split a model was trained on.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from ..io import atomic_write, file_digest
from ..labels import LABELS

MANIFEST_FIELDS = ("path", "relpath", "label", "patient", "split", "source_split", "sha1")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image of the manifest."""

    path: str  # absolute path of the file
    relpath: str  # path relative to the indexed root (stable across machines)
    label: str  # one of LABELS
    patient: str  # patient key; all images of a patient land in one split
    split: str  # "train", "val" or "test"
    source_split: str  # folder split it came from ("train", "test" or "" when none)
    sha1: str  # content hash: cache key and duplicate detection

    @property
    def target(self) -> int:
        return LABELS.index(self.label)


@dataclass
class Manifest:
    """The indexed dataset: samples plus the files that were skipped and why."""

    root: str
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        counts = self.counts()
        parts = ", ".join(
            f"{split}: " + " ".join(f"{lab}={c.get(lab, 0)}" for lab in LABELS) for split, c in counts.items()
        )
        return f"Manifest(root={self.root!r}, n={len(self)}, skipped={len(self.skipped)}; {parts})"

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, splits in train/val/test order."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            c = Counter(s.label for s in self.samples if s.split == split)
            if c:
                out[split] = {lab: c.get(lab, 0) for lab in LABELS}
        return out

    def subset(self, split: str | Sequence[str] | None) -> list[Sample]:
        """Samples of one split (or several); ``None`` means all."""
        if split is None:
            return list(self.samples)
        splits = {split} if isinstance(split, str) else set(split)
        return [s for s in self.samples if s.split in splits]

    def digest(self) -> str:
        """SHA-256 over (relpath, label, patient, split, sha1): identifies the data and its split."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: s.relpath):
            h.update(f"{s.relpath}\t{s.label}\t{s.patient}\t{s.split}\t{s.sha1}\n".encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest as CSV, atomically (a unique temporary file, then ``os.replace``)."""
        path = Path(path)
        with atomic_write(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            for s in self.samples:
                w.writerow({k: getattr(s, k) for k in MANIFEST_FIELDS})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Read a manifest CSV written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist; create it with 'pneumoscan data index DIR'")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in MANIFEST_FIELDS if c not in (reader.fieldnames or ())]
            if lacking:  # say which: a hand-edited file usually lost one
                raise DataError(f"{path} is not a pneumoscan manifest: no column {', '.join(lacking)} (expected "
                                f"{', '.join(MANIFEST_FIELDS)}); write it with 'pneumoscan data index DIR'")
            samples = [Sample(**{k: row[k] for k in MANIFEST_FIELDS}) for row in reader]
        bad = [s.label for s in samples if s.label not in LABELS]
        if bad:
            raise DataError(f"{path}: unknown label {bad[0]!r}; labels must be one of {LABELS}")
        seen: dict[str, int] = {}
        for row, smp in enumerate(samples, start=2):  # line numbers as an editor shows them (1: the header)
            if smp.split not in (*SPLITS, "all"):  # a row with another split was silently left out of every split
                raise DataError(f"{path}, line {row}: split {smp.split!r} is not one of {', '.join(SPLITS)}; fix the "
                                "row, or index the folder again with 'pneumoscan data index DIR'")
            if smp.path in seen:  # counted twice in its split (and possibly in two splits)
                raise DataError(f"{path}, line {row}: {smp.path} is listed again (first on line {seen[smp.path]}); "
                                "remove the duplicate row")
            seen[smp.path] = row
        return cls(root=str(path.parent), samples=[_relocated(s, path.parent) for s in samples])

    def moved_to(self, folder: str | os.PathLike) -> "Manifest | None":
        """This manifest with every image found at its relative path under ``folder`` (the data was copied or
        moved to another machine), or None when any image is missing there or its content differs
        (SHA-1 against the ``sha1`` column): then ``folder`` holds other data."""
        folder = Path(folder)
        samples = []
        for s in self.samples:
            alt = folder / s.relpath
            if not alt.is_file() or file_digest(alt, "sha1") != s.sha1:
                return None
            samples.append(replace(s, path=str(alt)))
        return Manifest(root=str(folder), samples=samples, skipped=list(self.skipped))

    def check_files(self, splits: Sequence[str] = ("train", "val")) -> None:
        """Every image of ``splits`` must still be where the manifest says: training on what happens to
        be left would quietly change the data (and the card would report the manifest's counts)."""
        samples = self.subset(splits)
        missing = [s for s in samples if not os.path.isfile(s.path)]
        if missing:
            raise DataError(f"{len(missing)} of the {len(samples)} images of the manifest are gone (first: "
                            f"{missing[0].path}); the data was moved or deleted: index the folder again with "
                            "'pneumoscan data index DIR'")
        # the feature cache is keyed by the manifest's content hash: a file replaced since indexing would be
        # trained on with the features of what it held then (seconds for the 5,216 training films)
        changed = [s for s in samples if file_digest(s.path, "sha1") != s.sha1]
        if changed:
            raise DataError(f"{len(changed)} of the {len(samples)} images of the manifest changed since it was written "
                            f"(first: {changed[0].path}, SHA-1 no longer {changed[0].sha1[:12]}...): index the folder "
                            "again with 'pneumoscan data index DIR'")


MIN_PER_CLASS = 2  # images of each class that the train and the validation split must keep
MAX_FAILED_SHARE = 0.02  # share of undecodable images above which training stops instead of skipping them


def check_usable(y_train: Sequence[int], y_val: Sequence[int], failed: int, total: int) -> dict[str, dict[str, int]]:
    """Refuse a training set that lost too much: a class with fewer than :data:`MIN_PER_CLASS` images in
    either split, or more than :data:`MAX_FAILED_SHARE` undecodable files. Returns the counts used."""
    if total and failed / total > MAX_FAILED_SHARE:
        raise DataError(f"{failed} of {total} images could not be decoded (more than {MAX_FAILED_SHARE:.0%}); "
                        "fix or remove the broken files and index again")
    counts = {}
    for split, y in (("train", y_train), ("val", y_val)):
        c = Counter(int(v) for v in y)
        counts[split] = {lab: c.get(i, 0) for i, lab in enumerate(LABELS)}
    for split in counts:
        short = [lab for lab, n in counts[split].items() if n < MIN_PER_CLASS]
        if short:
            absent = all(counts["train"][lab] + counts["val"][lab] == 0 for lab in short)  # no split can mend that
            hint = (f"add {' and '.join(short)} images (the data holds none)" if absent
                    else "add images or index with another --val-fraction")
            raise DataError(f"the {split} split has {', '.join(f'{counts[split][lab]} {lab}' for lab in short)} "
                            f"image(s); each class needs at least {MIN_PER_CLASS} in train and in val: {hint}")
    return counts


def _relocated(s: Sample, folder: Path) -> Sample:
    """A sample whose absolute path is gone but which sits at its relative path beside the manifest
    (the data folder was moved with its manifest.csv)."""
    if os.path.exists(s.path):
        return s
    alt = folder / s.relpath
    return replace(s, path=str(alt)) if alt.exists() else s
