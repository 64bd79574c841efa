"""Where Grad-CAM puts its mass on an ``pneumoscan explain`` output folder: neck, mediastinum, lung fields.

    pneumoscan explain VAL_NORMALS --model DIR --method gradcam --grid --out cams/DIR
    python scripts/cam_regions.py cams/DIR ...

Each map (the ``*.gradcam.npy`` files) is resized to 100 x 100, clipped at 0 and normalised to sum 1;
printed are the medians over the images of the share inside the neck (x 35-65 %, y 0-25 %), the
mediastinum (x 40-60 %, y 25-70 %) and the two lung fields (x 15-42 % and 58-85 %, y 20-80 %), and
what a map spread evenly would give. A model that reads the lungs puts more there than uniform; a
shortcut on the neck or the mediastinum shows as a share several times the uniform one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

REGIONS = {"neck": (slice(0, 25), [slice(35, 65)]), "mediastinum": (slice(25, 70), [slice(40, 60)]),
           "lung fields": (slice(20, 80), [slice(15, 42), slice(58, 85)])}


def shares(m: np.ndarray) -> dict[str, float]:
    m = np.clip(cv2.resize(m.astype(np.float64), (100, 100)), 0, None)
    m /= m.sum() + 1e-12
    return {k: float(sum(m[rows, c].sum() for c in cols)) for k, (rows, cols) in REGIONS.items()}


def main(folders: list[str]) -> None:
    uniform = shares(np.ones((100, 100)))
    print("| maps | images | " + " | ".join(REGIONS) + " |")
    print("| --- | --- |" + " --- |" * len(REGIONS))
    print("| spread evenly | – | " + " | ".join(f"{uniform[k]:.3f}" for k in REGIONS) + " |")
    for folder in folders:
        maps = [np.load(f) for f in sorted(Path(folder).glob("*.gradcam.npy"))]
        if not maps:
            raise SystemExit(f"{folder}: no *.gradcam.npy files; run pneumoscan explain --method gradcam first")
        s = [shares(m) for m in maps]
        print(f"| {folder} | {len(maps)} | " + " | ".join(f"{np.median([x[k] for x in s]):.3f}" for k in REGIONS) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
