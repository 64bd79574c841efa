"""Pictures of what the network sees: heat-map overlays, a summary grid, first-layer filters,
early activation maps (matplotlib, Agg backend; every file written atomically)."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import nn  # noqa: E402

from .errors import PneumoscanError  # noqa: E402
from .explain import CENTRAL_REGION, Explanation, eval_mode  # noqa: E402

log = logging.getLogger(__name__)

DISPLAY_SIDE = 512  # longest side of the X-ray as drawn (px); the map is stretched to it
NAMES = {"occlusion": "occlusion sensitivity", "gradcam": "Grad-CAM"}


# ----------------------------------------------------------------------------------------------
# saving


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def save_array(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """``np.save`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    return dict(cmap="jet", vmin=0.0, vmax=top, label="Grad-CAM (raw)")


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
    return save_figure(overlay_figure(gray, e, title_name), path)


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
        ax.set_title(f"{Path(name).name[:28]}\n{e.label} {e.probabilities[e.label]:.2f}; central {share:.2f}",
                     fontsize=7, color="black" if not share < 0.42 else "firebrick")
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    med = float(np.nanmedian(shares)) if not all(np.isnan(shares)) else float("nan")
    method = NAMES[items[0][2].method]
    fig.suptitle(f"{method}{' - ' + model_id if model_id else ''}: median share of the map inside the dashed "
                 f"central chest region {med:.2f} (0.42 = spread evenly; red titles are below that)", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# filters and activations


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first 2-D convolution in the network (name, module)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise PneumoscanError(f"{type(net).__name__} has no 2-D convolution to show")


def filters_figure(net: nn.Module, max_filters: int = 64, title: str = ""):
    """A grid of the first convolution's filters, each scaled to its own range.

    Filters that see the three input channels are drawn in colour (R, G, B = input channels 0-2);
    others as the mean over their input channels, in gray.
    """
    name, conv = first_conv(_backbone(net))
    w = conv.weight.detach().float().cpu().numpy()[:max_filters]
    n = w.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 0.4, 1.0 * rows + 0.7), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        f = w[i].transpose(1, 2, 0) if w.shape[1] == 3 else w[i].mean(0)
        lo, hi = float(f.min()), float(f.max())
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        ax.imshow(f, cmap=None if f.ndim == 3 else "gray", interpolation="nearest")
    k = "x".join(map(str, conv.kernel_size))
    fig.suptitle(f"{title + ': ' if title else ''}first convolution {name}: {n} of {conv.out_channels} "
                 f"filters, {k}, {conv.in_channels} input channels", fontsize=9)
    return fig


def _backbone(net: nn.Module) -> nn.Module:
    """The backbone of a single model, or of an ensemble's first member."""
    if hasattr(net, "backbone"):
        return net.backbone
    members = getattr(net, "members", None)
    if members is not None and len(members) and hasattr(members[0], "backbone"):
        return members[0].backbone
    return net


def feature_layers(net: nn.Module, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Backbone modules (names as in ``named_modules``) whose output is a feature map, in the
    order they run, with that map's (C, H, W) for a ``size x size`` input."""
    bb = _backbone(net)
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in bb.named_modules():
        if not name or isinstance(m, (nn.Identity, nn.Dropout)):
            continue

        def hook(mod, inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.ndim == 4 and name not in seen:
                seen[name] = tuple(out.shape[1:])
        hooks.append(m.register_forward_hook(hook))
    try:
        with eval_mode(bb), torch.inference_mode():
            bb(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return list(seen.items())


def default_layer(layers: list[tuple[str, tuple[int, ...]]]) -> str:
    """An early layer: the last top-level module that still works at the stem's resolution
    (the stem's activations, e.g. ``bn1`` of an EfficientNet or ``act1`` of a ResNet)."""
    if not layers:
        raise PneumoscanError("the network has no layer with a feature-map output")
    stem_hw = layers[0][1][1:]
    top = [(n, s) for n, s in layers if "." not in n] or layers
    pick = [n for n, s in top if s[1:] == stem_hw]
    if pick:
        return pick[-1]
    return next(n for n, s in layers if s[1:] == stem_hw)


def resolve_layer(net: nn.Module, size: int, layer: str | None) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
    """Check ``layer`` (``None`` = :func:`default_layer`); a bad name lists the valid ones."""
    layers = feature_layers(net, size)
    if layer is None:
        return default_layer(layers), layers
    name = layer.removeprefix("backbone.")
    names = [n for n, _ in layers]
    if name not in names:
        short = [n for n in names if n.count(".") <= 1][:40]  # top-level modules and their children
        raise PneumoscanError(f"layer {layer!r} is not a feature-map layer of this model; valid names include, "
                              f"earliest first: {', '.join(short)}; all {len(names)}: 'pneumoscan visualize layers'")
    return name, layers


def activations(net: nn.Module, x: torch.Tensor, layer: str) -> np.ndarray:
    """The (C, H, W) output of backbone module ``layer`` for one normalised input (1, 3, S, S)."""
    bb = _backbone(net)
    mod = dict(bb.named_modules()).get(layer)
    if mod is None:
        raise PneumoscanError(f"layer {layer!r} is not in the backbone")
    got: list[torch.Tensor] = []
    h = mod.register_forward_hook(lambda m, i, o: got.append(o.detach()) if not got else None)
    try:
        with eval_mode(bb), torch.inference_mode():
            bb(x)
    finally:
        h.remove()
    return got[0][0].float().cpu().numpy()


def activations_figure(act: np.ndarray, gray: np.ndarray, layer: str, max_maps: int = 64, title: str = ""):
    """The input X-ray then a grid of up to ``max_maps`` channels of ``act``, each scaled to its own range.

    Channels are shown in order of their mean activation (strongest first) so that dead or
    near-constant channels do not crowd out the informative ones.
    """
    c = act.shape[0]
    order = np.argsort(-act.reshape(c, -1).mean(1), kind="stable")[:max_maps]
    n = len(order) + 1
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.4, 1.3 * rows + 0.7), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    axes.flat[0].imshow(cv2.resize(gray, act.shape[:0:-1], interpolation=cv2.INTER_AREA), cmap="gray")
    axes.flat[0].set_title("input", fontsize=7)
    for ax, k in zip(list(axes.flat)[1:], order):
        a = act[k]
        lo, hi = float(a.min()), float(a.max())
        ax.imshow((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"ch {k}", fontsize=6)
    fig.suptitle(f"{title + ': ' if title else ''}activations of {layer}: {len(order)} of {c} channels, "
                 f"{act.shape[1]}x{act.shape[2]}, strongest mean first", fontsize=9)
    return fig
