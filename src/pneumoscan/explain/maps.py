"""Heat maps as data and as the web's picture, torch-free: what the server needs to explain.

:class:`Explanation` (one map, its class and prediction), the share of a map inside the
central chest region (:func:`central_share`), and :func:`overlay_png`, the one-panel overlay
the web page shows (OpenCV, a few ms). :mod:`.figures` draws the matplotlib figures.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import cv2
import matplotlib
import numpy as np

from ..errors import PneumoscanError

METHODS = ("occlusion", "gradcam")
NAMES = {"occlusion": "occlusion sensitivity", "gradcam": "Grad-CAM"}
DISPLAY_SIDE = 512  # longest side of the X-ray as drawn (px); the map is stretched to it
PREVIEW_SIDE = 768  # longest side (px) of the web page's image and heat-map layer


CENTRAL_REGION = (0.20, 0.80, 0.15, 0.85)
"""(left, right, top, bottom) of the central chest region as fractions of width and height.

The central 60 % of the width and 70 % of the height, which holds both lungs and the heart on a
frontal pediatric film, while side markers, text labels, borders and corners fall outside it. The
region covers 42 % of the image, so a map spread evenly over the image puts 0.42 of its mass there.
"""


@dataclass
class Explanation:
    """One heat map for one image: the map, the class it explains and the prediction."""

    method: str  # "occlusion" or "gradcam"
    heatmap: np.ndarray  # float32 (S, S) at the model input resolution
    target: int  # index of the explained (predicted) class
    label: str  # predicted class name
    probabilities: dict[str, float]  # the predictor's probabilities (LABELS order)
    seconds: float = 0.0  # time the map took
    extra: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # why the out-of-scope gate stops this input; empty: in scope

    @property
    def central_share(self) -> float:
        return central_share(self.heatmap)

    @property
    def in_scope(self) -> bool:
        return not self.reasons


def central_share(heatmap: np.ndarray, region: tuple[float, float, float, float] = CENTRAL_REGION) -> float:
    """Share of the map's positive mass inside ``region`` (see :data:`CENTRAL_REGION`); NaN for an empty map."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, np.float64)), 0, None)
    if h.ndim != 2:
        raise PneumoscanError(f"expected a 2-D heat map, got shape {h.shape}")
    total = h.sum()
    if total <= 0:
        return float("nan")
    rows, cols = h.shape
    left, right, top, bottom = region
    inner = h[int(round(top * rows)):int(round(bottom * rows)), int(round(left * cols)):int(round(right * cols))]
    return float(inner.sum() / total)


# ----------------------------------------------------------------------------------------------
# heat-map overlays


def display_pair(gray: np.ndarray, heat: np.ndarray, side: int = DISPLAY_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """The X-ray shrunk to at most ``side`` px (aspect kept) and the map stretched onto it.

    The model saw the image squashed to a square, so the square map is stretched back to the
    X-ray's own aspect to land on the anatomy it describes.
    """
    h, w = gray.shape
    scale = min(1.0, side / max(h, w))
    dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
    img = cv2.resize(gray, (dw, dh), interpolation=cv2.INTER_AREA) if (dw, dh) != (w, h) else gray
    hm = cv2.resize(np.nan_to_num(heat).astype(np.float32), (dw, dh), interpolation=cv2.INTER_LINEAR)
    return img, hm


def style(e: Explanation, heat: np.ndarray) -> dict:
    """Colour map, limits and colour-bar label: occlusion is signed (a probability drop), Grad-CAM relative."""
    if e.method == "occlusion":
        lim = float(np.abs(heat).max()) or 1e-6
        return dict(cmap="RdBu_r", vmin=-lim, vmax=lim, label=f"drop in P({e.label})")
    top = float(heat.max()) or 1.0
    return dict(cmap="inferno", vmin=0.0, vmax=top, label=f"evidence for {e.label} (relative)")  # perceptual, not jet


def title(e: Explanation) -> str:
    probs = ", ".join(f"{k} {v:.2f}" for k, v in e.probabilities.items())
    if not e.in_scope:  # a research view of an input that gets no diagnosis: never shown as one
        why = textwrap.shorten(e.reasons[0], 70, placeholder="...")
        return f"OUT OF SCOPE, no diagnosis: {why}\nthe network's {e.label} explained ({probs})"
    return f"predicted {e.label} ({probs})"


def overlay_png(gray: np.ndarray, e: Explanation, title_name: str | None = None, side: int = 448) -> bytes:
    """One-panel overlay as PNG bytes, drawn with OpenCV (no matplotlib figure: a few ms, for the web).

    The X-ray (at most ``side`` px) with the map blended in, a colour bar on the right with its
    range, and the prediction in a header line.
    """
    img, hm = display_pair(gray, e.heatmap, side)
    if max(img.shape) < side:  # small inputs (e.g. 224 px) are enlarged so the header fits
        k = side / max(img.shape)
        dsize = (round(img.shape[1] * k), round(img.shape[0] * k))
        img, hm = cv2.resize(img, dsize, interpolation=cv2.INTER_LINEAR), cv2.resize(hm, dsize)
    st = style(e, hm)
    lut = (matplotlib.colormaps[st["cmap"]](np.linspace(0, 1, 256))[:, 2::-1] * 255).astype(np.uint8)  # BGR
    idx = np.clip((hm - st["vmin"]) / (st["vmax"] - st["vmin"]) * 255, 0, 255).astype(np.uint8)
    base = np.repeat(img[..., None], 3, axis=2).astype(np.float32)
    blend = (0.55 * base + 0.45 * lut[idx]).astype(np.uint8)
    h, w = img.shape
    bar = np.repeat(lut[::-1][np.linspace(0, 255, h).astype(int)][:, None], 14, axis=1)
    canvas = np.full((h + 44, w + 74, 3), 255, np.uint8)
    canvas[40:40 + h, :w] = blend
    canvas[40:40 + h, w + 6:w + 20] = bar
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    cv2.putText(canvas, f"{st['vmax']:.3g}", (w + 22, 50), font, 0.35, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, f"{st['vmin']:.3g}", (w + 22, 38 + h), font, 0.35, black, 1, cv2.LINE_AA)
    head = f"{title_name}: " if title_name else ""
    cv2.putText(canvas, head + title(e).replace("\n", "; "), (4, 16), font, 0.42, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, f"{NAMES[e.method]}: {st['label']}; central share {e.central_share:.2f}", (4, 33),
                font, 0.38, black, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise PneumoscanError("could not encode the overlay as PNG")
    return buf.tobytes()




def heat_layer_png(gray: np.ndarray, heat: np.ndarray, side: int = DISPLAY_SIDE) -> bytes:
    """The map alone as a transparent PNG at the X-ray's display size (aspect kept), for a page to lay
    over its own image: inferno colours (perceptually uniform) scaled to the map's maximum, opacity rising with the value."""
    _, hm = display_pair(gray, heat, side)
    top = float(hm.max())
    v = np.clip(hm / top, 0, 1) if top > 0 else np.zeros_like(hm)
    lut = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, 2::-1] * 255).astype(np.uint8)  # BGR
    bgr = lut[(v * 255).astype(np.uint8)]
    alpha = (np.clip(v * 1.4, 0, 1) * 255).astype(np.uint8)[..., None]
    ok, buf = cv2.imencode(".png", np.concatenate([bgr, alpha], axis=2))
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise PneumoscanError("could not encode the heat map as PNG")
    return buf.tobytes()
