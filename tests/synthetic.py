"""Synthetic data for tests (no dataset image): imported as ``from synthetic import make_dataset`` (tests/
is on the path through its conftest), never as ``conftest``, which each test folder may have its own of."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def chest(width: int = 128, height: int | None = None, seed: int = 0, level: float = 0.0,
          consolidation: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """A chest-like gray image (not a dataset image): a bright body with a bright midline between two dark
    lung fields, smooth texture and a little pixel noise, so that the out-of-scope gate's image checks
    pass. ``level`` shifts the brightness, ``consolidation`` brightens the left lung (a learnable class
    signal); ``scale`` (e.g. 16) returns 12-bit-like values for DICOM tests."""
    rng = np.random.default_rng(seed)
    h = height or width
    yy, xx = np.mgrid[0:h, 0:width]
    yy, xx = yy / h, xx / width
    body = 175.0 - 110.0 * np.clip((np.abs(xx - 0.5) - 0.38) / 0.1, 0, 1)

    def lung(cx: float) -> np.ndarray:
        return np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.45) / 0.25) ** 2))

    a = body - 95.0 * (lung(0.28) + lung(0.72)) + consolidation * lung(0.28) + level
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h, width)), (0, 0), max(1.0, width / 64)) * 45
    a = np.clip(a + texture + rng.normal(0, 3, (h, width)), 0, 255)
    return a * scale if scale != 1.0 else a.astype(np.uint8)


def _xray(rng: np.random.Generator, cls: str, size: int = 128) -> Image.Image:
    """A fake 'X-ray' whose brightness and left-lung opacity depend on the class (learnable)."""
    level, cons = {"normal": (-25, 0), "bacterial": (5, 70), "viral": (25, 25)}[cls]
    return Image.fromarray(chest(size, seed=int(rng.integers(1 << 31)), level=level, consolidation=cons), mode="L")


def make_dataset(root: Path, n_patients: int = 8, per_patient: int = 2, seed: int = 0, size: int = 128) -> Path:
    """Redistribution layout: train/NORMAL, train/PNEUMONIA (bacteria and virus names)."""
    rng = np.random.default_rng(seed)
    for k in range(n_patients):
        for j in range(per_patient):
            (root / "train" / "NORMAL").mkdir(parents=True, exist_ok=True)
            (root / "train" / "PNEUMONIA").mkdir(parents=True, exist_ok=True)
            _xray(rng, "normal", size).save(root / "train" / "NORMAL" / f"IM-{k:04d}-{j + 1:04d}.jpeg")
            _xray(rng, "bacterial", size).save(root / "train" / "PNEUMONIA" / f"person{k + 1}_bacteria_{10 * k + j}.jpeg")
            _xray(rng, "viral", size).save(root / "train" / "PNEUMONIA" / f"person{k + 1}_virus_{10 * k + j}.jpeg")
    return root
