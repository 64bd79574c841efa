"""How features are extracted: settings that change speed, never results (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import PneumoscanError

ENGINES = ("auto", "torch", "onnx")
ONNX_MIN_IMAGES = 128  # "auto" exports only for at least this many images (export costs seconds)


@dataclass(frozen=True)
class ExtractConfig:
    """How features are computed; speed only: every engine and setting gives the same features."""

    cache: str | None = None  # feature cache folder (default ~/.cache/pneumoscan/features, or $PNEUMOSCAN_CACHE)
    batch_size: int = 64  # images decoded and run per batch
    workers: int | None = None  # decoding worker processes (default: in-process with ONNX Runtime, else 2)
    engine: Literal["auto", "torch", "onnx"] = "auto"  # auto: ONNX Runtime on a CPU for 128+ images, else PyTorch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PneumoscanError(f"batch size {self.batch_size} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise PneumoscanError(f"workers {self.workers} must be 0 or more")
        if self.engine not in ENGINES:
            raise PneumoscanError(f"engine {self.engine!r} is unknown; use one of {', '.join(ENGINES)}")
