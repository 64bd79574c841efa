"""The out-of-scope suite: inputs that are not pediatric frontal chest X-rays, and how many the gate stops.

Every input is generated here or comes from a package already installed, so the suite is the same on
every machine and commits no image: blank and near-constant frames, pixel noise, natural photographs
(scikit-learn's and matplotlib's sample images, in colour and in gray, cropped and rescaled), an MRI
slice and terrain maps (matplotlib's sample data), rendered text, synthetic patterns, and X-rays of
the validation split rotated, inverted, cropped to a corner or heavily blurred. The clean validation
X-rays give the false-alarm rate. ``pneumoscan scope-suite`` writes the rates.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..data.imaging import XRay

log = logging.getLogger(__name__)

GROUPS = ("blank", "noise", "photo", "other_modality", "text", "pattern",
          "xray_rotated", "xray_inverted", "xray_corner", "xray_blurred")
TARGETS = {"blank": 0.99, "noise": 0.99, "photo": 0.99, "xray_rotated": 0.90, "xray_inverted": 0.90,
           "xray_corner": 0.90, "xray_blurred": 0.90}  # issue 14's detection targets; at most 2 % false alarms


def _xray(pixels: np.ndarray, rgb: np.ndarray | None = None) -> XRay:
    """An XRay as the decoder would return it (colourfulness measured as :mod:`pneumoscan.data.imaging` does)."""
    g = np.ascontiguousarray(pixels.astype(np.uint8))
    colour = 0.0 if rgb is None else float(np.abs(rgb.astype(np.int16) - g[..., None]).mean())
    return XRay(g, format="png", mode="RGB" if rgb is not None else "L", size=(g.shape[1], g.shape[0]),
                colorfulness=colour)


def blanks(rng: np.random.Generator) -> Iterator[XRay]:
    for level in (0, 8, 64, 128, 200, 247, 255):
        for side in (256, 1024):
            yield _xray(np.full((side, side), level, np.uint8))
    for _ in range(16):  # nearly constant: a faint gradient or faint noise on a flat level
        level = rng.integers(20, 230)
        g = np.full((512, 512), float(level)) + np.linspace(0, rng.uniform(1, 12), 512)[None]
        yield _xray(np.clip(g + rng.normal(0, rng.uniform(0, 2), g.shape), 0, 255))


def noise(rng: np.random.Generator) -> Iterator[XRay]:
    for _ in range(15):
        yield _xray(rng.integers(0, 256, (int(rng.integers(256, 900)),) * 2))
    for _ in range(15):
        yield _xray(np.clip(rng.normal(rng.uniform(60, 190), rng.uniform(30, 80), (512, 512)), 0, 255))
    for _ in range(10):  # salt and pepper on gray
        g = np.full((400, 400), float(rng.integers(40, 200)))
        m = rng.random(g.shape)
        g[m < 0.2], g[m > 0.8] = 0, 255
        yield _xray(g)


def _photos() -> list[np.ndarray]:
    """RGB photographs shipped with scikit-learn and matplotlib."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    out = list(load_sample_images().images)
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (sample / name).is_file():
            im = cv2.imread(str(sample / name), cv2.IMREAD_COLOR)
            if im is not None:
                out.append(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
    return out


def photos(rng: np.random.Generator) -> Iterator[XRay]:
    for rgb in _photos():
        h, w = rgb.shape[:2]
        for k in range(10):
            s = rng.uniform(0.5, 1.0)
            ch, cw = int(h * s), int(w * s)
            y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw])
            gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
            yield _xray(gray, crop if k % 2 == 0 else None)  # in colour, and as a gray photograph


def other_modalities(rng: np.random.Generator) -> Iterator[XRay]:
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    mri = sample / "s1045.ima.gz"
    if mri.is_file():
        a = np.frombuffer(gzip.open(mri).read(), np.uint16).reshape(256, 256).astype(np.float32)
        g = (a - a.min()) / max(1.0, a.max() - a.min()) * 255
        for k in range(6):
            yield _xray(cv2.resize(np.rot90(g, k % 4), (256 + 64 * k,) * 2))
    for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
        path = sample / name
        if path.is_file():
            with np.load(path) as z:
                a = z[key].astype(np.float32)
            g = (a - a.min()) / max(1e-6, float(a.max() - a.min())) * 255
            for k in range(4):
                yield _xray(cv2.resize(np.rot90(g, k), (300, 300)))


def text(rng: np.random.Generator) -> Iterator[XRay]:
    from PIL import Image, ImageDraw, ImageFont

    words = ["pneumonia", "radiology report", "LEFT", "patient 0042", "normal", "chest X-ray", "2026-12-01"]
    for k in range(20):
        bg, fg = (255, 0) if k % 2 else (0, 255)
        im = Image.new("L", (512, 384), bg)
        draw = ImageDraw.Draw(im)
        font = ImageFont.load_default(size=int(rng.integers(18, 48)))
        for line in range(int(rng.integers(2, 8))):
            draw.text((int(rng.integers(5, 80)), 20 + 48 * line), " ".join(rng.choice(words, 3)), fill=fg, font=font)
        yield _xray(np.asarray(im))


def patterns(rng: np.random.Generator) -> Iterator[XRay]:
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    for k in range(5):
        n = 2 ** (k + 2)
        yield _xray(((np.floor(yy * n) + np.floor(xx * n)) % 2) * 255)  # checkerboards
        yield _xray((np.sin(2 * np.pi * n * xx) * 0.5 + 0.5) * 255)  # stripes
        yield _xray(((xx * np.cos(k) + yy * np.sin(k)) % 1.0) * 255)  # gradients
        r = np.hypot(xx - 0.5, yy - 0.5)
        yield _xray((r < 0.1 + 0.07 * k) * 200.0 + 30)  # discs


def xray_transforms(images: list[np.ndarray]) -> dict[str, list[XRay]]:
    out: dict[str, list[XRay]] = {g: [] for g in ("xray_rotated", "xray_inverted", "xray_corner", "xray_blurred")}
    for g in images:
        h, w = g.shape
        out["xray_rotated"] += [_xray(np.rot90(g, 1)), _xray(np.rot90(g, 2))]
        out["xray_inverted"].append(_xray(255 - g))
        out["xray_corner"].append(_xray(cv2.resize(g[: h // 3, : w // 3], (w, h), interpolation=cv2.INTER_LINEAR)))
        out["xray_blurred"].append(_xray(cv2.GaussianBlur(g, (0, 0), sigmaX=max(h, w) / 28)))
    return out


def suite(xrays: list[np.ndarray], seed: int = 0) -> dict[str, list[XRay]]:
    """Every group's inputs; ``xrays`` are decoded validation images for the transformed groups."""
    rng = np.random.default_rng(seed)
    groups: dict[str, Callable] = {"blank": blanks, "noise": noise, "photo": photos,
                                   "other_modality": other_modalities, "text": text, "pattern": patterns}
    out = {name: list(fn(rng)) for name, fn in groups.items()}
    out.update(xray_transforms(xrays))
    return out


def run_suite(gate: Callable[[XRay], tuple[bool, list[str]]], xrays: list[np.ndarray], clean: list[XRay],
              seed: int = 0) -> dict:
    """Share of each group that ``gate`` flags (``gate(x) -> (in_scope, reasons)``), and of the clean
    validation X-rays (false alarms), with the reasons that fired most."""
    from collections import Counter

    report: dict = {"groups": {}, "targets": TARGETS}
    for name, items in {**suite(xrays, seed), "validation_clean": clean}.items():
        flags, why = [], Counter()
        for x in items:
            ok, reasons = gate(x)
            flags.append(not ok)
            why.update(r.split(" (")[0] for r in reasons)
        rate = float(np.mean(flags)) if flags else float("nan")
        report["groups"][name] = {"n": len(items), "flagged": rate, "reasons": dict(why.most_common(4))}
        log.info("%s: %d inputs, %.1f%% flagged", name, len(items), 100 * rate)
    g = report["groups"]
    report["met"] = {name: g[name]["flagged"] >= target for name, target in TARGETS.items() if name in g}
    report["met"]["validation_false_alarms"] = g["validation_clean"]["flagged"] <= 0.02
    return report


def predictor_gate(pred) -> Callable[[XRay], tuple[bool, list[str]]]:
    """The gate every prediction passes: a blank image is refused, then the image checks and the
    out-of-distribution score of :meth:`~pneumoscan.predict.Predictor.predict_xray`."""
    from ..data.imaging import BlankImageError, check_content

    def gate(x: XRay) -> tuple[bool, list[str]]:
        try:
            check_content(x, "input")
        except BlankImageError:
            return False, ["blank image refused (pixel spread under 2 gray levels)"]
        p = pred.predict_xray(x, "input")
        return p.in_scope, p.reasons

    return gate


def run_for_model(pred, data=None, cfg=None, *, progress: bool = False) -> dict:
    """The suite against ``pred``'s gate: every validation X-ray decoded for the false alarms, an
    evenly spaced ``cfg.n_transformed`` of them transformed."""
    from tqdm.auto import tqdm

    from ..data.splits import check_present, validation_set
    from .config import ScopeSuiteConfig

    cfg = cfg or ScopeSuiteConfig()
    ev = validation_set(data, pred.config, pred.model_dir, force=cfg.force)
    check_present(ev.paths, f"the validation split of {ev.source}")
    clean = [pred.decode(p, p) for p in tqdm(ev.paths, desc="decode validation", disable=not progress)]
    step = max(1, len(clean) // cfg.n_transformed)
    xrays = [x.pixels for x in clean[::step][: cfg.n_transformed]]
    report = run_suite(predictor_gate(pred), xrays, clean, cfg.seed)
    report["model"] = pred.model_id
    report["validation"] = {"source": ev.source, "n": len(ev.paths)}
    report["gate"] = {"learned_score": pred.ood is not None, "ood_threshold": pred.ood_threshold}
    return report


def markdown(report: dict, model_id: str) -> str:
    lines = [f"# Out-of-scope suite: `{model_id}`", "",
             "Share of each group's inputs that get no diagnosis: a blank image is refused, then the image checks of "
             "`pneumoscan.scope`, the learned upside-down check and the learned out-of-distribution score of the "
             "pooled features (`pneumoscan calibrate`). Targets of issue 14: at least 99 % of blank, noise and photo "
             "inputs, 90 % of transformed X-rays, at most 2 % of clean validation X-rays. Regenerate with "
             "`pneumoscan scope-suite --model DIR --data ../shared/data/chest_xray`.", "",
             "| group | inputs | flagged | target | met | most frequent reasons |", "| --- | --- | --- | --- | --- | --- |"]
    for name, g in report["groups"].items():
        target = report["targets"].get(name)
        met = report["met"].get(name, report["met"].get("validation_false_alarms") if name == "validation_clean" else None)
        tgt = f">= {target:.0%}" if target else ("<= 2%" if name == "validation_clean" else "–")
        why = "; ".join(f"{k} ({v})" for k, v in g["reasons"].items())
        lines.append(f"| {name} | {g['n']} | {g['flagged']:.1%} | {tgt} | "
                     f"{'–' if met is None else ('yes' if met else 'no')} | {why} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: str | os.PathLike, model_id: str) -> Path:
    from ..io import atomic_write_json, atomic_write_text

    out = Path(out)
    atomic_write_json(out / "scope-suite.json", {"model": model_id, **report})
    atomic_write_text(out / "scope-suite.md", markdown(report, model_id))
    return out
