"""What ``pneumoscan explain`` computes and how (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PATCH, STRIDE, BATCH = 16, 8, 64  # default occlusion patch and stride (model-input px), copies per forward pass


@dataclass(frozen=True)
class ExplainConfig:
    """What ``pneumoscan explain`` computes and how."""

    method: Literal["occlusion", "gradcam", "both"] = "both"  # heat-map method
    patch: int = PATCH  # occlusion patch side in model-input px
    stride: int = STRIDE  # occlusion stride in model-input px
    batch_size: int = BATCH  # occluded copies per forward pass
    engine: Literal["auto", "incremental", "onnx", "torch"] = "auto"  # what runs the occluded copies: incremental
    # (exact, recomputes only the layers around the patch; EfficientNet-family backbones), onnx or torch (Captum
    # over the full network); auto: the first that works
    grid: bool = False  # also a summary figure per method with up to 16 of the images
    sample: int | None = None  # explain only this many images, spread evenly over the sub-folders (big folders)

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 1:  # 0 explained nothing and said nothing
            from ..errors import ConfigError

            raise ConfigError(f"--sample {self.sample} must be at least 1 (or left out: every image)")

    @property
    def methods(self) -> tuple[str, ...]:
        return ("occlusion", "gradcam") if self.method == "both" else (self.method,)
