"""Is this a pediatric frontal chest X-ray at all? Cheap image checks that run before any network.

The model was trained on frontal pediatric chest radiographs: grayscale, roughly square to moderately
landscape, hundreds to thousands of pixels a side, with real anatomy (contrast and structure, neither
blank nor burnt out nor noise). An input that fails a check below gets no diagnosis: the prediction
says "not a pediatric frontal chest X-ray" and why. The learned out-of-distribution score
(:mod:`pneumoscan.uncertainty`) catches what these checks cannot (other anatomy, other modalities).

The limits hold with a wide margin on the whole training split (5,216 images: pixel standard
deviation 19.9-87.3, mean 61-222, at most 33 % black and 5.3 % white pixels, mean neighbour
difference 1.5-7.9 at 224 px), see ``tests/test_scope.py``; the model card quotes them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .data.imaging import XRay

CHECK_SIDE = 224  # the image is judged at this size, so a photo's resolution does not change the figures


@dataclass(frozen=True)
class ScopeThresholds:
    """When an input is not a chest X-ray the model can read; quoted in the model card."""

    max_colorfulness: float = 8.0  # mean |channel - gray| (0..255) above which content is colour, not gray
    max_aspect_ratio: float = 2.0  # long side / short side above which the image is not a chest frame
    min_side_px: int = 128  # shorter side of the original below which detail is too coarse
    min_std: float = 8.0  # pixel standard deviation (0..255) below which the image is blank or near constant
    min_mean: float = 25.0  # mean brightness below which the film is black (under-exposed or empty)
    max_mean: float = 235.0  # mean brightness above which the film is white (over-exposed)
    max_dark_share: float = 0.6  # share of pure-black pixels above which most of the image holds nothing
    max_bright_share: float = 0.5  # share of pure-white pixels above which most of the image is burnt out
    max_roughness: float = 30.0  # mean neighbour difference at 224 px above which the image is noise, not anatomy

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_THRESHOLDS = ScopeThresholds()


def check_scope(x: XRay, thresholds: ScopeThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """Why ``x`` is not a chest X-ray the model can read; empty when every check passes."""
    t = thresholds
    out: list[str] = [f"the file is damaged: {n}" for n in x.notes if "truncat" in n or "premature" in n]
    w, h = x.size
    if x.colorfulness > t.max_colorfulness:
        out.append(f"colour content (colourfulness {x.colorfulness:.1f} > {t.max_colorfulness:g}): a photograph "
                   "or another modality, not a radiograph")
    short, long_ = min(w, h), max(w, h)
    if short > 0 and long_ / short > t.max_aspect_ratio:
        out.append(f"aspect ratio {long_ / short:.1f}:1 (> {t.max_aspect_ratio:g}:1): not a frontal chest frame")
    if short < t.min_side_px:
        out.append(f"too small ({w} x {h}; shorter side < {t.min_side_px} px)")
    g = x.pixels
    if g.size == 0:
        return out + ["no pixels"]
    small = cv2.resize(g, (CHECK_SIDE, CHECK_SIDE), interpolation=cv2.INTER_AREA) if g.shape != (CHECK_SIDE,) * 2 else g
    f = small.astype(np.float32)
    std, mean = float(f.std()), float(f.mean())
    if std < t.min_std:
        out.append(f"blank or nearly constant (pixel standard deviation {std:.1f} < {t.min_std:g})")
    if mean < t.min_mean or (small <= 2).mean() > t.max_dark_share:
        out.append(f"under-exposed or empty (mean {mean:.0f}, {(small <= 2).mean():.0%} black pixels)")
    if mean > t.max_mean or (small >= 253).mean() > t.max_bright_share:
        out.append(f"over-exposed (mean {mean:.0f}, {(small >= 253).mean():.0%} white pixels)")
    roughness = float(np.abs(np.diff(f, axis=1)).mean())
    if roughness > t.max_roughness and std >= t.min_std:
        out.append(f"noise rather than anatomy (mean neighbour difference {roughness:.0f} > {t.max_roughness:g})")
    return out


def describe_thresholds(thresholds: ScopeThresholds = DEFAULT_THRESHOLDS) -> list[tuple[str, str, str]]:
    """(check, threshold, why) rows for the model card."""
    t = thresholds
    return [
        ("damaged file", "the decoder reports a truncated or broken image", "part of the film is missing"),
        ("not grayscale content",
         f"colourfulness (mean absolute difference between each colour channel and the gray value, 0-255) "
         f"> {t.max_colorfulness:g}", "radiographs are gray; colour suggests a photograph or another modality"),
        ("extreme aspect ratio", f"long side / short side > {t.max_aspect_ratio:g}",
         "a frontal chest radiograph is roughly square; strips are crops, scans of several films or not chests"),
        ("very small image", f"shorter side < {t.min_side_px} px (original file)",
         "too little detail; thumbnails were not part of training"),
        ("blank or near constant", f"pixel standard deviation < {t.min_std:g} (at {CHECK_SIDE} px)",
         "nothing to read; training films have 19.9 or more"),
        ("under- or over-exposed", f"mean < {t.min_mean:g} or > {t.max_mean:g}, or more than "
         f"{t.max_dark_share:.0%} black / {t.max_bright_share:.0%} white pixels", "the film holds no usable contrast"),
        ("noise", f"mean neighbour difference > {t.max_roughness:g} (at {CHECK_SIDE} px)",
         "pixel noise, not anatomy; training films stay below 8"),
    ]
