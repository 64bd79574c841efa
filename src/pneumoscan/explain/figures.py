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

import numpy as np
from matplotlib.patches import Rectangle

from ..data.imaging import XRay
from ..data.index import label_from_path
from ..errors import PneumoscanError
from ..io import atomic_path
from ..plots import plt, save_figure
from .explainer import Explainer
from .maps import CENTRAL_REGION, DISPLAY_SIDE, METHODS, NAMES, Explanation, display_pair, overlay_png, style, title  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


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


def _draw_overlay(ax, img: np.ndarray, hm: np.ndarray, e: Explanation, alpha: float = 0.45):
    st = style(e, hm)
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
    fig.suptitle(head + title(e), fontsize=10)
    return fig


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
        wrong = e.in_scope and true is not None and true != e.label  # no diagnosis given: no mistake to mark
        if e.in_scope:
            verdict = f"true {true}, called {e.label}" if true else f"called {e.label}"
        else:  # the gate gives no diagnosis: the network's class is shown as what was explained only
            verdict = f"OUT OF SCOPE; network: {e.label}"
        verdict += f" {e.probabilities[e.label]:.2f}"
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


def explainer_for(predictor) -> Explainer:
    """The :class:`Explainer` of a torch-backend predictor, built once and reused."""
    with _LOCK:  # one explainer (and one copy of the network) per predictor
        explainer = _EXPLAINERS.get(predictor)
        if explainer is None:
            explainer = _EXPLAINERS[predictor] = Explainer(predictor)
        return explainer


def explain_overlay_png(predictor, xray: XRay, method: str = "gradcam") -> bytes:
    """A PNG of ``xray`` with the ``method`` heat map ("gradcam" or "occlusion") of its predicted class.

    ``predictor`` is a torch-backend :class:`~pneumoscan.predict.Predictor`; the explainer is built
    once per predictor and reused. Grad-CAM takes well under a second on CPU; occlusion seconds.
    """
    if method not in METHODS:
        raise PneumoscanError(f"explanation method {method!r} is unknown; use gradcam or occlusion")
    (e,) = explainer_for(predictor)(xray, (method,))
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
