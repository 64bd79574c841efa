"""X-ray augmentation on whole batches, on the training device (no worker processes needed).

Small rotation, scale and translation (one random affine per image through ``affine_grid``),
brightness, contrast and gamma jitter, optional horizontal flip. Inputs and outputs are float
batches in [0, 1] of shape (N, 1, S, S), before the backbone's normalisation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; 0 switches a transform off."""

    rotate: float = 10.0  # max rotation in degrees
    scale: float = 0.10  # max relative zoom in or out
    translate: float = 0.06  # max shift as a fraction of the side
    brightness: float = 0.10  # max additive shift on [0, 1] intensities
    contrast: float = 0.20  # max relative contrast change around the image mean
    gamma: float = 0.25  # max |log gamma|: gamma drawn log-uniformly in [e^-g, e^g]
    flip: bool = False  # horizontal flip (hearts are on the left: off by default)

    def to_dict(self) -> dict:
        return asdict(self)


class BatchAugment(nn.Module):
    """Callable augmentation of a batch; identity in ``eval()`` mode."""

    def __init__(self, cfg: AugmentConfig = AugmentConfig()) -> None:
        super().__init__()
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"BatchAugment({self.cfg})"

    def _uniform(self, n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=torch.float32).uniform_(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        c = self.cfg
        n = x.shape[0]
        x = x.float()
        if c.rotate or c.scale or c.translate or c.flip:
            ang = self._uniform(n, -c.rotate, c.rotate, x) * (math.pi / 180.0)
            sc = 1.0 + self._uniform(n, -c.scale, c.scale, x)
            sx = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0) if c.flip else torch.ones(n, device=x.device)
            cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
            theta = torch.zeros(n, 2, 3, device=x.device)
            theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin
            theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos
            theta[:, :, 2] = torch.stack([self._uniform(n, -c.translate, c.translate, x) * 2,
                                          self._uniform(n, -c.translate, c.translate, x) * 2], dim=1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if c.gamma:
            g = torch.exp(self._uniform(n, -c.gamma, c.gamma, x)).view(n, 1, 1, 1)
            x = x.clamp(1e-6, 1.0) ** g
        if c.contrast:
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * (1.0 + self._uniform(n, -c.contrast, c.contrast, x)).view(n, 1, 1, 1) + m
        if c.brightness:
            x = x + self._uniform(n, -c.brightness, c.brightness, x).view(n, 1, 1, 1)
        return x.clamp(0.0, 1.0)
