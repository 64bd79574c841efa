"""Synthetic data for tests (no dataset image): imported as ``from synthetic import make_dataset`` (tests/
is on the path through its conftest), never as ``conftest``, which each test folder may have its own of."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _xray(rng: np.random.Generator, cls: str, size: int = 128) -> Image.Image:
    """A fake 'X-ray': noise whose brightness and texture depend on the class (learnable)."""
    base = {"normal": 60, "bacterial": 140, "viral": 200}[cls]
    a = rng.normal(base, 25, (size, size))
    if cls != "normal":
        a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 30 if cls == "bacterial" else -30
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


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
