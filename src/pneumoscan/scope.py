"""Out-of-scope checks: warnings (never refusals) for inputs unlike the training data.

The thresholds below are quoted in every model card.
"""
from __future__ import annotations

from .imaging import XRay

MAX_COLORFULNESS = 8.0  # mean |channel - gray| in 0..255 above which content is called colour
MAX_ASPECT = 2.0  # long side / short side above which the image is called extreme
MIN_SIDE = 128  # shorter side (original pixels) below which the image is called very small

SCOPE_THRESHOLDS = {"max_colorfulness": MAX_COLORFULNESS, "max_aspect_ratio": MAX_ASPECT, "min_side_px": MIN_SIDE}


def check_scope(x: XRay) -> list[str]:
    """Human-readable warnings for an input that looks out of scope."""
    out = []
    w, h = x.size
    if x.colorfulness > MAX_COLORFULNESS:
        out.append(f"image has colour content (colourfulness {x.colorfulness:.1f} > {MAX_COLORFULNESS:g}); "
                   "the model expects a grayscale radiograph")
    if min(w, h) > 0 and max(w, h) / min(w, h) > MAX_ASPECT:
        out.append(f"extreme aspect ratio {max(w, h) / min(w, h):.1f} (> {MAX_ASPECT:g}); "
                   "the model expects a frontal chest X-ray")
    if min(w, h) < MIN_SIDE:
        out.append(f"very small image ({w} x {h}; shorter side < {MIN_SIDE} px); results are unreliable")
    return out
