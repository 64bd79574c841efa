"""Inside the network: the first convolution's filters, a layer's activation maps, the list of layers."""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import nn

from ..errors import PneumoscanError
from ..nets.heads import eval_mode
from ..plots import plt


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
