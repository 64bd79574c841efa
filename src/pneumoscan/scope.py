"""Is this a pediatric frontal chest X-ray at all? Cheap image checks that run before any network.

The model was trained on frontal pediatric chest radiographs: grayscale, roughly square to moderately
landscape, hundreds to thousands of pixels a side, with real anatomy (contrast and structure, neither
blank nor burnt out nor noise). An input that fails a check below gets no diagnosis: the prediction
says "not a pediatric frontal chest X-ray" and why. The learned out-of-distribution score
(:mod:`pneumoscan.uncertainty`) catches what these checks cannot (other anatomy, other modalities).

The limits hold with a margin on the whole training split (5,216 images: pixel standard deviation
19.9-87.3, mean 61-222, at most 33 % black and 5.3 % white pixels, mean neighbour difference 1.5-7.9
at 224 px, neighbour correlation 0.78-0.99 and layout margin -0.20 to 1.80 at 64 px), see
``tests/test_scope.py``; the model card quotes them. The last two are what a frontal chest film looks
like: neighbouring pixels agree (anatomy, not noise), and a bright vertical midline (spine,
mediastinum) runs between darker lung fields, which an inverted film reverses and a film rotated by
90 degrees turns across.
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
    min_neighbour_corr: float = 0.5  # correlation of horizontally adjacent pixels at 64 px below which it is noise
    min_layout_margin: float = -0.25  # upright midline contrast minus the best other layout's (std) below which the
    # film is inverted or turned by 90 degrees

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_THRESHOLDS = ScopeThresholds()


def check_scope(x: XRay, thresholds: ScopeThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """Why ``x`` is not a chest X-ray the model can read; empty when every check passes."""
    t = thresholds
    out: list[str] = [f"the file is damaged: {n}" for n in x.notes if "truncat" in n or "premature" in n]
    out += x.header_reasons  # a DICOM header that names another modality, body part or a lateral view
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
    m, sd = cv2.meanStdDev(small)  # one pass in OpenCV on the uint8 pixels (the float32 numpy form took 3x longer)
    mean, std = float(m[0, 0]), float(sd[0, 0])
    dark, bright = np.count_nonzero(small <= 2) / small.size, np.count_nonzero(small >= 253) / small.size
    if std < t.min_std:
        out.append(f"blank or nearly constant (pixel standard deviation {std:.1f} < {t.min_std:g})")
    if mean < t.min_mean or dark > t.max_dark_share:
        out.append(f"under-exposed or empty (mean {mean:.0f}, {dark:.0%} black pixels)")
    if mean > t.max_mean or bright > t.max_bright_share:
        out.append(f"over-exposed (mean {mean:.0f}, {bright:.0%} white pixels)")
    roughness = cv2.mean(cv2.absdiff(small[:, 1:], small[:, :-1]))[0]  # mean neighbour difference, exact in uint8
    if std < t.min_std:
        return out  # nothing below has a meaning on a flat image
    corr, midline, across = layout_stats(g)
    if roughness > t.max_roughness or corr < t.min_neighbour_corr:
        out.append(f"noise rather than anatomy (mean neighbour difference {roughness:.0f}, neighbour correlation "
                   f"{corr:.2f}; limits {t.max_roughness:g} and {t.min_neighbour_corr:g})")
    else:
        layouts = {"inverted": -midline, "turned": across, "turned and inverted": -across}
        worst = max(layouts, key=layouts.get)
        margin = midline - layouts[worst]
        if margin < t.min_layout_margin:
            fix = ("check the DICOM photometric interpretation" if x.format == "dicom"
                   else "send the film as it is viewed, not inverted")  # a PNG has no photometric interpretation
            what = ("inverted gray scale (the midline is darker than the lung fields; a chest film shows a bright spine "
                    f"between dark lungs): {fix}" if worst == "inverted" else
                    "turned on its side (the bright midline runs across the image): send the frontal film upright")
            out.append(f"{what} (layout margin {margin:.2f} < {t.min_layout_margin:g})")
    return out


LAYOUT_SIDE = 64  # the layout statistics are measured on this thumbnail
PROFILE_SIDE = 32  # the upside-down check reads this thumbnail's profiles


def upright_profile(g: np.ndarray) -> np.ndarray:
    """Row and column means of a standardised 32 px thumbnail, and the row means of its left, central and
    right bands (160 values): what the learned upside-down check of :mod:`pneumoscan.uncertainty` reads."""
    s = cv2.resize(g, (PROFILE_SIDE, PROFILE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    z = (s - s.mean()) / (s.std() + 1e-6)
    return np.concatenate([z.mean(1), z.mean(0), z[:, 4:12].mean(1), z[:, 20:28].mean(1), z[:, 12:20].mean(1)])


def layout_stats(g: np.ndarray) -> tuple[float, float, float]:
    """(neighbour correlation, midline contrast, the same across) of a gray image at 64 px.

    The contrasts are in standard deviations of the thumbnail: the mean of the central vertical band
    (x 40-60 %, y 20-80 %) minus the mean of the two lung bands (x 15-35 % and 65-85 %, y 25-65 %),
    and the same measured on the transposed image."""
    s = cv2.resize(g, (LAYOUT_SIDE, LAYOUT_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    a, b = s[:, :-1] - s[:, :-1].mean(), s[:, 1:] - s[:, 1:].mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    corr = float((a * b).sum()) / norm if norm > 0 else 1.0  # Pearson's r, as np.corrcoef, without its overhead
    z = (s - s.mean()) / (s.std() + 1e-6)

    def contrast(m: np.ndarray) -> float:
        centre = m[13:51, 26:38].mean()
        lungs = np.concatenate([m[16:42, 10:22].ravel(), m[16:42, 42:54].ravel()]).mean()
        return float(centre - lungs)

    return corr, contrast(z), contrast(z.T)


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
        ("noise", f"mean neighbour difference > {t.max_roughness:g} (at {CHECK_SIDE} px) or neighbour correlation "
         f"< {t.min_neighbour_corr:g} (at {LAYOUT_SIDE} px)",
         "pixel noise, not anatomy; training films stay below 8 and above 0.78"),
        ("inverted or rotated by 90 degrees",
         f"layout margin < {t.min_layout_margin:g}: the contrast of the central vertical band against the lung "
         f"bands (in standard deviations, at {LAYOUT_SIDE} px) minus the largest of the same for an inverted or "
         "turned film", "a frontal film has a bright vertical midline between dark lungs; training films stay "
         "above -0.20"),
    ]
