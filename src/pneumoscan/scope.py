"""Out-of-scope checks: warnings (never refusals) for inputs unlike the training data.

The model was trained on frontal pediatric chest radiographs: grayscale, roughly square to
moderately landscape, hundreds to thousands of pixels a side. An input far from that still gets
a prediction, but with a warning that says why the result may be meaningless. The thresholds
below are quoted in every model card (see :func:`describe_thresholds`).

Checked on the real training split (5,216 images, all 224 x 224 RGB-encoded gray): colourfulness
0.0, aspect ratio 1.0, shorter side 224 px, so no training image triggers a warning, while a
colour photograph (colourfulness about 19), a 3:1 strip and a 64-px thumbnail each do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .data.imaging import XRay


@dataclass(frozen=True)
class ScopeThresholds:
    """When an input is called out of scope; quoted in the model card."""

    max_colorfulness: float = 8.0  # mean |channel - gray| (0..255) above which content is colour, not gray
    max_aspect_ratio: float = 2.0  # long side / short side above which the image is not a chest frame
    min_side_px: int = 128  # shorter side of the original below which detail is too coarse

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_THRESHOLDS = ScopeThresholds()
MAX_COLORFULNESS = DEFAULT_THRESHOLDS.max_colorfulness
MAX_ASPECT = DEFAULT_THRESHOLDS.max_aspect_ratio
MIN_SIDE = DEFAULT_THRESHOLDS.min_side_px
SCOPE_THRESHOLDS = DEFAULT_THRESHOLDS.to_dict()


def check_scope(x: XRay, thresholds: ScopeThresholds = DEFAULT_THRESHOLDS) -> list[str]:
    """Human-readable warnings for an input that looks out of scope; empty when it looks fine."""
    t = thresholds
    out: list[str] = []
    w, h = x.size
    if x.colorfulness > t.max_colorfulness:
        out.append(f"image has colour content (colourfulness {x.colorfulness:.1f} > {t.max_colorfulness:g}); "
                   "the model expects a grayscale radiograph")
    short, long_ = min(w, h), max(w, h)
    if short > 0 and long_ / short > t.max_aspect_ratio:
        out.append(f"extreme aspect ratio {long_ / short:.1f}:1 (> {t.max_aspect_ratio:g}:1); "
                   "the model expects a frontal chest X-ray")
    if short < t.min_side_px:
        out.append(f"very small image ({w} x {h}; shorter side < {t.min_side_px} px); results are unreliable")
    return out


def describe_thresholds(thresholds: ScopeThresholds = DEFAULT_THRESHOLDS) -> list[tuple[str, str, str]]:
    """(check, threshold, why) rows for the model card."""
    t = thresholds
    return [
        ("not grayscale content",
         f"colourfulness (mean absolute difference between each colour channel and the gray value, "
         f"0-255) > {t.max_colorfulness:g}",
         "radiographs are gray; colour suggests a photograph or another modality"),
        ("extreme aspect ratio", f"long side / short side > {t.max_aspect_ratio:g}",
         "a frontal chest radiograph is roughly square; strips are crops, scans of several films or not chests"),
        ("very small image", f"shorter side < {t.min_side_px} px (original file)",
         "too little detail; thumbnails were not part of training"),
    ]
