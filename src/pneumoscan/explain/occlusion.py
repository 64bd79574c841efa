"""Occlusion sensitivity on the full network (Captum ``Occlusion``), over ONNX Runtime or PyTorch.

:class:`OcclusionSensitivity` slides a patch filled with the image mean over the model input,
runs all occluded copies in batches (``perturbations_per_eval``) and maps the drop of the
predicted class's probability. The network's own softmax is used (no ``--prevalence`` prior
shift): the map shows what the network relies on. :mod:`pneumoscan.explain.incremental` computes
the same map faster for EfficientNet-family networks.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import PneumoscanError
from ..nets.graph import export_fast
from ..nets.heads import eval_mode
from ..nets.modeldir import onnx_name, verify_file
from ..runtime import ort_session
from .config import BATCH, PATCH, STRIDE

log = logging.getLogger(__name__)



def _check_input(x: torch.Tensor) -> torch.Tensor:
    """A single normalised image as (1, 3, S, S) float32."""
    if not isinstance(x, torch.Tensor):
        raise PneumoscanError(f"expected a torch tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise PneumoscanError(f"expected one normalised image of shape (3, S, S), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise PneumoscanError("the input tensor holds NaN or infinite values")
    return x.float()


def _check_target(target: int, n_classes: int | None = None) -> int:
    if not isinstance(target, (int, np.integer)) or target < 0 or (n_classes is not None and target >= n_classes):
        raise PneumoscanError(f"target class {target!r} is not a class index (0..{(n_classes or 3) - 1})")
    return int(target)



class OcclusionSensitivity:
    """Occlusion sensitivity map: drop of the target class's probability when a patch is hidden.

    ``forward`` maps a normalised batch (N, 3, S, S) to class probabilities (N, C). Every pixel's
    value is the mean drop over the patch positions that cover it (Captum's convention), so a
    positive value marks evidence *for* the class and a negative one evidence against it.
    """

    def __init__(self, patch: int = PATCH, stride: int = STRIDE, batch_size: int = BATCH) -> None:
        for name, v in (("patch", patch), ("stride", stride), ("batch size", batch_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise PneumoscanError(f"occlusion {name} {v!r} must be a positive integer (e.g. 16)")
        if stride > patch:
            raise PneumoscanError(f"occlusion stride {stride} exceeds the patch {patch}: pixels between "
                                  "patches would never be occluded; use a stride <= the patch (e.g. patch/2)")
        self.patch, self.stride, self.batch_size = int(patch), int(stride), int(batch_size)

    def __repr__(self) -> str:
        return f"OcclusionSensitivity(patch={self.patch}, stride={self.stride}, batch_size={self.batch_size})"

    def n_copies(self, size: int) -> int:
        """Number of occluded copies evaluated for a ``size x size`` input (Captum's count: the
        last patch of a row may hang over the edge and is clipped)."""
        per_side = -(-(size - self.patch) // self.stride) + 1
        return per_side * per_side

    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: int) -> np.ndarray:
        from captum.attr import Occlusion

        x = _check_input(x)
        target = _check_target(target)
        size = x.shape[-1]
        if self.patch > size:
            raise PneumoscanError(f"occlusion patch {self.patch} px is larger than the model input ({size} px); "
                                  f"use a patch of at most {size // 4} px")
        baseline = x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()  # the image mean, per channel
        t0 = time.perf_counter()
        with torch.no_grad():
            attr = Occlusion(forward).attribute(
                x, sliding_window_shapes=(3, self.patch, self.patch), strides=(3, self.stride, self.stride),
                baselines=baseline, target=target, perturbations_per_eval=self.batch_size)
        log.debug("occlusion: %d copies in %.2f s", self.n_copies(size), time.perf_counter() - t0)
        return attr[0, 0].float().numpy().astype(np.float32)


def _torch_forward(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(batch.contiguous(memory_format=torch.channels_last)).float().softmax(-1)
    return forward


class _OnnxForward:
    """Softmax probabilities from an ONNX Runtime session (about twice as fast as eager PyTorch on CPU)."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: batch.detach().float().numpy()})[0]
        return torch.from_numpy(out).float().softmax(-1)


def onnx_forward(net: nn.Module, size: int, model_dir=None, config: dict | None = None) -> _OnnxForward:
    """An ONNX Runtime forward for ``net``: the model directory's export when it has one, else an
    export made in memory (a few seconds; :class:`Explainer` does it once per model)."""
    name = onnx_name(config or {}) or "model.onnx"
    if model_dir is not None and config is not None and (model_dir / name).is_file():
        src: bytes | str = str(verify_file(model_dir, name, config))
        log.info("occlusion runs on the model's ONNX export %s", src)
    else:
        t0 = time.perf_counter()
        with eval_mode(net):
            src = export_fast(net, size, "input", "logits")
        log.info("exported the model to ONNX in memory for occlusion (%.1f s, once per model)",
                 time.perf_counter() - t0)
    return _OnnxForward(ort_session(src))
