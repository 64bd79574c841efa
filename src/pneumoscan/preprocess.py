"""Turn a decoded X-ray into a model input tensor.

The size, mean, std and interpolation travel with the backbone (timm's pretrained config),
are resolved once into a :class:`PreprocessConfig`, and are saved inside every model directory
so that training, evaluation, serving and export all use the same numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .errors import PneumoscanError

if TYPE_CHECKING:  # torch is imported lazily: the ONNX serving path never loads it
    import torch

INTENSITY = ("none", "equalize", "clahe")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn pixels into a tensor; saved in the model's JSON."""

    size: int = 224  # square input side; the image is resized without keeping aspect (as in the study)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel, from the backbone's pretrained cfg
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # per-channel, from the backbone's pretrained cfg
    intensity: str = "none"  # "none", "equalize" (global histogram) or "clahe" (adaptive): exposure robustness

    def __post_init__(self) -> None:
        if not 32 <= int(self.size) <= 1024:
            raise PneumoscanError(f"image size {self.size} is out of range: give 32 to 1024 px (the study's sizes: "
                                  "224, 299, 320)")
        if self.intensity not in INTENSITY:
            raise PneumoscanError(f"intensity {self.intensity!r} is unknown; use one of {', '.join(INTENSITY)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   intensity=d.get("intensity", "none"))

    def key(self) -> str:
        """A short string that identifies the preprocessing (part of the feature-cache key)."""
        m = ",".join(f"{v:.4f}" for v in self.mean)
        s = ",".join(f"{v:.4f}" for v in self.std)
        return f"s{self.size}-m{m}-d{s}-{self.intensity}-v1"


class Preprocess:
    """Callable: uint8 grayscale (H x W) -> float32 tensor (3 x size x size), normalised."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._mean = np.asarray(cfg.mean, np.float32).reshape(3, 1, 1) * 255.0
        self._inv_std = 1.0 / (np.asarray(cfg.std, np.float32).reshape(3, 1, 1) * 255.0)
        self._clahe = None

    def __repr__(self) -> str:
        return f"Preprocess({self.cfg})"

    def resize(self, gray: np.ndarray) -> np.ndarray:
        """Resize to ``size x size``, then the intensity normalisation (uint8 in, uint8 out)."""
        return self.intensity(self.resize_only(gray))

    def resize_only(self, gray: np.ndarray) -> np.ndarray:
        """Resize to ``size x size`` (area when shrinking, bilinear when enlarging); no intensity step."""
        if gray.dtype != np.uint8 or gray.ndim != 2:
            raise PneumoscanError(f"expected an 8-bit grayscale image, got {gray.dtype} with shape {gray.shape}")
        s = self.cfg.size
        h, w = gray.shape
        interp = cv2.INTER_AREA if (h > s or w > s) else cv2.INTER_LINEAR
        return cv2.resize(gray, (s, s), interpolation=interp) if (h, w) != (s, s) else gray

    def intensity(self, img: np.ndarray) -> np.ndarray:
        """The configured intensity normalisation of one uint8 image (global histogram
        equalisation, or CLAHE with clip limit 2 on an 8 x 8 tile grid); identity for "none"."""
        if self.cfg.intensity == "equalize":
            img = cv2.equalizeHist(img)
        elif self.cfg.intensity == "clahe":
            if self._clahe is None:
                self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
            img = self._clahe.apply(img)
        return np.ascontiguousarray(img)

    def intensity_batch(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`intensity` of every image of a uint8 (N, S, S) batch (a copy; the input is kept)."""
        if self.cfg.intensity == "none":
            return batch
        return np.stack([self.intensity(np.ascontiguousarray(b)) for b in batch])

    def normalize_np(self, resized: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``size x size`` -> normalised float32 array (3, size, size) of identical channels;
        a uint8 batch (N, size, size) -> (N, 3, size, size). ``out``: a float32 array of that shape to
        write into (a batch buffer used again: a new 38 MB batch costs its page faults every time)."""
        x = resized.astype(np.float32)[..., None, :, :]
        if out is None:
            out = np.empty((*x.shape[:-3], 3, *x.shape[-2:]), np.float32)
        np.subtract(x, self._mean, out=out)
        out *= self._inv_std
        return out

    def normalize(self, resized: np.ndarray) -> "torch.Tensor":
        """As :meth:`normalize_np`, as a torch tensor."""
        import torch

        return torch.from_numpy(self.normalize_np(resized))

    def array(self, gray: np.ndarray) -> np.ndarray:
        """uint8 gray image -> normalised float32 array (3, size, size), without torch."""
        return self.normalize_np(self.resize(gray))

    def __call__(self, gray: np.ndarray) -> "torch.Tensor":
        return self.normalize(self.resize(gray))


def normalize_batch(batch_u8: "torch.Tensor", cfg: PreprocessConfig) -> "torch.Tensor":
    """(N, S, S) uint8 -> (N, 3, S, S) float32 normalised; the vectorised form of Preprocess."""
    import torch

    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=batch_u8.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.std, dtype=torch.float32, device=batch_u8.device).view(1, 3, 1, 1) * 255.0
    x = batch_u8.to(torch.float32).unsqueeze(1)
    return (x - mean) / std
