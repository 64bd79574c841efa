"""Grad-CAM (Captum ``LayerGradCam``) on the backbone's last convolutional stage.

For frozen-plus-head and fine-tuned models alike (:func:`pneumoscan.nets.backbones.gradcam_layer`);
an ensemble's map is the mean of its views' maps (:meth:`pneumoscan.nets.heads.Ensemble.views`),
each scaled to a maximum of 1, mirrored views mirrored back.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, PneumoscanError
from ..nets.backbones import gradcam_layer
from ..nets.heads import eval_mode, views_of
from .occlusion import _check_input, _check_target


class GradCAM:
    """Grad-CAM (Captum ``LayerGradCam``) on the backbone's last convolutional stage.

    ``net`` is a :class:`~pneumoscan.nets.heads.PneumoNet` (anything with ``.backbone``) or an
    :class:`~pneumoscan.nets.heads.Ensemble`. Returns a non-negative (S, S) map: the raw Grad-CAM
    of a single model, or the mean of members' maps scaled to a maximum of 1 for an ensemble.
    """

    def __init__(self, layer: Callable[[nn.Module], nn.Module] = gradcam_layer,
                 interpolation: str = "bilinear") -> None:
        if interpolation not in ("bilinear", "nearest", "bicubic"):
            raise PneumoscanError(f"interpolation {interpolation!r} is unknown; use bilinear, nearest or bicubic")
        self.layer, self.interpolation = layer, interpolation

    def __repr__(self) -> str:
        return f"GradCAM(layer={getattr(self.layer, '__name__', self.layer)}, interpolation={self.interpolation!r})"

    def _one(self, model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
        from captum.attr import LayerAttribution, LayerGradCam

        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise ModelError(f"{type(model).__name__} has no backbone; Grad-CAM needs a pneumoscan model")
        x = x.detach().clone().requires_grad_(True)  # gradients flow even when every weight is frozen
        cam = LayerGradCam(model, self.layer(backbone)).attribute(x, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach().float(), tuple(x.shape[-2:]), self.interpolation)
        return torch.nan_to_num(cam[0, 0]).clamp_min(0)

    def __call__(self, net: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
        x = _check_input(x)
        target = _check_target(target)
        with eval_mode(net), torch.enable_grad():
            maps = []
            for v in views_of(net):
                cam = self._one(v.net, v.input(x), target)
                if cam.shape[-1] != x.shape[-1]:  # a lower-resolution member: its map back at the input's size
                    from captum.attr import LayerAttribution
                    cam = LayerAttribution.interpolate(cam[None, None], tuple(x.shape[-2:]), self.interpolation)[0, 0]
                maps.append(cam.flip(-1) if v.flipped else cam)
        if len(maps) == 1:
            return maps[0].numpy().astype(np.float32)
        scaled = [m / m.max() if m.max() > 0 else m for m in maps]
        return torch.stack(scaled).mean(0).numpy().astype(np.float32)
