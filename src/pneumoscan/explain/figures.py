"""Pictures of where the network looks: heat-map overlays (matplotlib, and a fast OpenCV PNG for
the web) and a summary grid with the central chest region drawn in; every file written atomically."""
from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import cv2
import matplotlib
import numpy as np
from matplotlib.patches import Rectangle

from ..data.imaging import XRay
from ..data.index import label_from_path
from ..errors import PneumoscanError
from ..io import atomic_path
from ..plots import plt, save_figure
from .explainer import CENTRAL_REGION, METHODS, Explainer, Explanation

log = logging.getLogger(__name__)

DISPLAY_SIDE = 512  # longest side of the X-ray as drawn (px); the map is stretched to it
NAMES = {"occlusion": "occlusion sensitivity", "gradcam": "Grad-CAM"}


def short_name(name: str, width: int = 28) -> str:
    """A file name cut to ``width`` characters with an ellipsis in the middle (both ends stay readable)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 2] + "…" + name[-(keep // 2):]


def save_array(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """``np.save`` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, arr)
    return Path(path)


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


def _style(e: Explanation, heat: np.ndarray) -> dict:
    """Colour map, limits and colour-bar label: occlusion is signed (a probability drop), Grad-CAM relative."""
    if e.method == "occlusion":
        lim = float(np.abs(heat).max()) or 1e-6
        return dict(cmap="RdBu_r", vmin=-lim, vmax=lim, label=f"drop in P({e.label})")
    top = float(heat.max()) or 1.0
    return dict(cmap="inferno", vmin=0.0, vmax=top, label="relative importance")  # perceptually uniform, not jet


def _title(e: Explanation) -> str:
    probs = ", ".join(f"{k} {v:.2f}" for k, v in e.probabilities.items())
    return f"predicted {e.label} ({probs})"


def _draw_overlay(ax, img: np.ndarray, hm: np.ndarray, e: Explanation, alpha: float = 0.45):
    st = _style(e, hm)
    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    im = ax.imshow(hm, cmap=st["cmap"], vmin=st["vmin"], vmax=st["vmax"], alpha=alpha)
    ax.set_axis_off()
    return im, st["label"]


def overlay_figure(gray: np.ndarray, e: Explanation, title_name: str | None = None):
    """Two panels: the X-ray, and the X-ray with the heat map and a colour bar; prediction in the title."""
    img, hm = display_pair(gray, e.heatmap)
    aspect = img.shape[1] / img.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(2 * 4.2 * aspect + 1.2, 4.7),
                             gridspec_kw=dict(width_ratios=[1, 1.1]), layout="constrained")
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=255)
    axes[0].set_axis_off()
    axes[0].set_title("X-ray", fontsize=9)
    im, label = _draw_overlay(axes[1], img, hm, e)
    axes[1].set_title(f"{NAMES[e.method]}; central share {e.central_share:.2f}", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02).set_label(label, fontsize=8)
    head = f"{title_name}: " if title_name else ""
    fig.suptitle(head + _title(e), fontsize=10)
    return fig


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
    st = _style(e, hm)
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
    cv2.putText(canvas, head + _title(e), (4, 16), font, 0.42, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, f"{NAMES[e.method]} ({st['label']}); central share {e.central_share:.2f}", (4, 33),
                font, 0.38, black, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise PneumoscanError("could not encode the overlay as PNG")
    return buf.tobytes()


def save_overlay(gray: np.ndarray, e: Explanation, path: str | os.PathLike, title_name: str | None = None) -> Path:
    return save_figure(overlay_figure(gray, e, title_name), path, dpi=100, tight=False)


def grid_figure(items: Sequence[tuple[str, np.ndarray, Explanation]], model_id: str = ""):
    """Up to 16 overlays (name, gray, explanation) with the central chest region drawn in,
    each titled with its prediction and central share; the median share in the heading."""
    items = list(items)[:16]
    if not items:
        raise PneumoscanError("no explanations to put in a grid")
    n = len(items)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    left, right, top, bottom = CENTRAL_REGION
    shares = []
    for ax, (name, gray, e) in zip(axes.flat, items):
        img, hm = display_pair(gray, e.heatmap, side=256)
        if e.method == "gradcam" and hm.max() > 0:
            hm = hm / hm.max()  # per image: relative importance
        _draw_overlay(ax, img, hm, e)
        hh, ww = img.shape
        ax.add_patch(Rectangle((left * ww, top * hh), (right - left) * ww, (bottom - top) * hh,
                               fill=False, ls="--", lw=1, ec="white"))
        share = e.central_share
        shares.append(share)
        true = label_from_path(Path(name))  # from the folders, when the image sits in a labelled layout
        wrong = true is not None and true != e.label
        verdict = (f"true {true}, called {e.label}" if true else f"called {e.label}") + f" {e.probabilities[e.label]:.2f}"
        ax.set_title(f"{short_name(Path(name).name)}\n{'MISTAKE: ' if wrong else ''}{verdict}; central {share:.2f}",
                     fontsize=7, color="firebrick" if wrong or share < 0.42 else "black",
                     fontweight="bold" if wrong else "normal")
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    med = float(np.nanmedian(shares)) if not all(np.isnan(shares)) else float("nan")
    method = NAMES[items[0][2].method]
    fig.suptitle(f"{method}{' - ' + model_id if model_id else ''}: median share of the map inside the dashed "
                 f"central chest region {med:.2f} (0.42 = spread evenly); red: below 0.42, or a mistake (bold)", fontsize=9)
    return fig


_EXPLAINERS: "weakref.WeakKeyDictionary[object, Explainer]" = weakref.WeakKeyDictionary()
_PREDICTORS: dict[str, object] = {}
_LOCK = threading.Lock()


def explain_overlay_png(predictor, xray: XRay, method: str = "gradcam") -> bytes:
    """A PNG of ``xray`` with the ``method`` heat map ("gradcam" or "occlusion") of its predicted class.

    ``predictor`` is a torch-backend :class:`~pneumoscan.predict.Predictor`; the explainer is built
    once per predictor and reused. Grad-CAM takes well under a second on CPU; occlusion seconds.
    """
    if method not in METHODS:
        raise PneumoscanError(f"explanation method {method!r} is unknown; use gradcam or occlusion")
    with _LOCK:  # one explainer (and one copy of the network) per predictor
        explainer = _EXPLAINERS.get(predictor)
        if explainer is None:
            explainer = _EXPLAINERS[predictor] = Explainer(predictor)
    (e,) = explainer(xray, (method,))
    return overlay_png(xray.pixels, e, title_name=None)


def model_overlay_png(model_dir, xray: XRay, method: str = "gradcam") -> bytes:
    """:func:`explain_overlay_png` with the model directory's torch predictor, loaded once per directory."""
    from ..predict import Predictor

    key = str(Path(model_dir).resolve())
    with _LOCK:
        pred = _PREDICTORS.get(key)
        if pred is None:
            pred = _PREDICTORS[key] = Predictor(model_dir, backend="torch")
    return explain_overlay_png(pred, xray, method)
