"""X-ray augmentation on whole batches, on the training device (no worker processes needed).

Small rotation, scale and translation (one random affine per image through ``affine_grid``),
brightness, contrast and gamma jitter, optional horizontal flip, Gaussian blur and pixel noise
(acquisition shifts), and random erasing (a rectangle filled with the image mean, against
shortcuts in one region). Inputs and outputs are float batches in [0, 1] of shape (N, 1, S, S):
the fine-tuner applies them *before* the intensity normalisation (CLAHE / equalisation) and the
backbone's normalisation, so the network sees what CLAHE makes of a noisy or blurred film.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AugmentConfig


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
        if c.blur:
            x = gaussian_blur(x, self._uniform(n, 0.0, c.blur, x))
        if c.noise:
            x = x + torch.randn_like(x) * self._uniform(n, 0.0, c.noise, x).view(n, 1, 1, 1)
        if c.erase:
            x = random_erase(x, c.erase)
        return x.clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (N, 1, S, S) with its own sigma (px, >= 0; 0 leaves it unchanged).

    Separable Gaussian kernels, one per image, applied as grouped convolutions with reflected borders.
    """
    n = x.shape[0]
    half = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    t = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    s = sigma.clamp_min(1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = torch.where(sigma.view(n, 1) > 1e-3, k, (t.view(1, -1) == 0).float())  # sigma 0: identity
    k = k / k.sum(1, keepdim=True)
    y = F.pad(x.transpose(0, 1), (half, half, half, half), mode="reflect")  # (1, N, S+2h, S+2h)
    y = F.conv2d(y, k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, k.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


def random_erase(x: torch.Tensor, p: float) -> torch.Tensor:
    """With probability ``p`` per image, fill one random rectangle (2-20 % of the area, aspect
    1/3-3) with that image's mean intensity."""
    n, _, h, w = x.shape
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(0.02, 0.20) * h * w
    aspect = torch.exp(torch.empty(n, device=dev).uniform_(math.log(1 / 3), math.log(3)))
    eh = (area * aspect).sqrt().clamp(1, h)
    ew = (area / aspect).sqrt().clamp(1, w)
    top = torch.rand(n, device=dev) * (h - eh)
    left = torch.rand(n, device=dev) * (w - ew)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    box &= (torch.rand(n, device=dev) < p).view(n, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(box.unsqueeze(1), mean, x)


class BatchInput(nn.Module):
    """uint8 images (N, S, S) on the training device -> normalised network input (N, 3, S, S).

    With ``augment`` in train mode the batch is augmented first; when ``batch_intensity`` is set the
    intensity normalisation (CLAHE / equalisation, on the CPU with OpenCV) runs after the augmentation,
    as it runs after resizing at inference; then the backbone's mean and std. Fine-tuning and
    self-supervised pretraining share this one path from pixels to tensors.
    """

    def __init__(self, prep, augment: AugmentConfig, batch_intensity: bool) -> None:
        super().__init__()
        from ..preprocess import Preprocess

        self.augment = BatchAugment(augment)
        self.pre = Preprocess(prep)
        self.batch_intensity = batch_intensity and prep.intensity != "none"
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x_u8: torch.Tensor, augment: bool) -> torch.Tensor:
        if augment:
            self.augment.train()
            x = self.augment(x_u8.float().div_(255.0).unsqueeze(1))
            if self.batch_intensity:
                x_u8 = x.squeeze(1).mul(255.0).round_().to(torch.uint8)
        if self.batch_intensity:
            eq = self.pre.intensity_batch(x_u8.cpu().numpy())
            x = torch.from_numpy(eq).to(x_u8.device).float().div_(255.0).unsqueeze(1)
        elif not augment:
            x = x_u8.float().div_(255.0).unsqueeze(1)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)
