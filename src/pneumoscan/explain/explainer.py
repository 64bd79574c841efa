"""Heat maps for a prediction: which explainer runs, on which engine, and what comes back.

:class:`Explainer` predicts an X-ray and explains its predicted class with Grad-CAM
(:mod:`.gradcam`) and/or occlusion sensitivity (:mod:`.occlusion`, or the exact and faster
:mod:`.incremental` engine). Maps are float32 arrays at the model's input resolution
(``size x size``), aligned with the resized model input, so figures stretch them back to the
X-ray's own aspect (:mod:`.figures`).
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data.imaging import XRay
from ..errors import ModelError, PneumoscanError
from ..nets.heads import eval_mode
from .gradcam import GradCAM
from .occlusion import BATCH, PATCH, STRIDE, OcclusionSensitivity, _check_input, _check_target, _torch_forward, onnx_forward

log = logging.getLogger(__name__)

METHODS = ("occlusion", "gradcam")
ENGINES = ("auto", "incremental", "onnx", "torch")


CENTRAL_REGION = (0.20, 0.80, 0.15, 0.85)
"""(left, right, top, bottom) of the central chest region as fractions of width and height.

The central 60 % of the width and 70 % of the height, which holds both lungs and the heart on a
frontal pediatric film, while side markers, text labels, borders and corners fall outside it. The
region covers 42 % of the image, so a map spread evenly over the image puts 0.42 of its mass there.
"""


@dataclass
class Explanation:
    """One heat map for one image: the map, the class it explains and the prediction."""

    method: str  # "occlusion" or "gradcam"
    heatmap: np.ndarray  # float32 (S, S) at the model input resolution
    target: int  # index of the explained (predicted) class
    label: str  # predicted class name
    probabilities: dict[str, float]  # the predictor's probabilities (LABELS order)
    seconds: float = 0.0  # time the map took
    extra: dict = field(default_factory=dict)

    @property
    def central_share(self) -> float:
        return central_share(self.heatmap)


def central_share(heatmap: np.ndarray, region: tuple[float, float, float, float] = CENTRAL_REGION) -> float:
    """Share of the map's positive mass inside ``region`` (see :data:`CENTRAL_REGION`); NaN for an empty map."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, np.float64)), 0, None)
    if h.ndim != 2:
        raise PneumoscanError(f"expected a 2-D heat map, got shape {h.shape}")
    total = h.sum()
    if total <= 0:
        return float("nan")
    rows, cols = h.shape
    left, right, top, bottom = region
    inner = h[int(round(top * rows)):int(round(bottom * rows)), int(round(left * cols)):int(round(right * cols))]
    return float(inner.sum() / total)


class Explainer:
    """Heat maps for a torch-backend :class:`~pneumoscan.predict.Predictor`.

    The explainer works on its own copy of the network (channels-last, eval mode), so Captum's
    hooks never touch the predictor that serves predictions, and a lock serialises its calls.
    ``engine`` picks what runs the occluded copies: "incremental" (:mod:`pneumoscan.explain.incremental`:
    the early layers recomputed only around the patch, exact, EfficientNet-family backbones),
    "onnx" (Captum over ONNX Runtime on the model's export, or an in-memory export), "torch"
    (Captum over eager PyTorch), or "auto" (the first of those that works for the model).
    """

    def __init__(self, predictor, *, patch: int = PATCH, stride: int = STRIDE, batch_size: int = BATCH,
                 engine: str = "auto") -> None:
        if getattr(predictor, "net", None) is None:
            raise ModelError("explanations need a torch-backend Predictor (Predictor(model_dir, backend='torch'))")
        if engine not in ENGINES:
            raise PneumoscanError(f"engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
        self.predictor = predictor
        self.occlusion = OcclusionSensitivity(patch, stride, batch_size)
        self.gradcam = GradCAM()
        self.engine = engine
        self.size = int(predictor.prep_cfg.size)
        if self.occlusion.patch > self.size:  # validate now, not after the first image is decoded
            raise PneumoscanError(f"occlusion patch {patch} px is larger than the model input ({self.size} px); "
                                  f"use a patch of at most {self.size // 4} px")
        self.net = copy.deepcopy(predictor.net).cpu().eval().to(memory_format=torch.channels_last)
        self._forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._incremental = None  # IncrementalOcclusion, False when the model does not support it
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Explainer({self.predictor!r}, {self.occlusion!r}, engine={self.engine!r})"

    def incremental(self):
        """The incremental occlusion engine, or None when the engine or the model rules it out."""
        if self.engine not in ("auto", "incremental") or self._incremental is False:
            return None
        if self._incremental is None:
            from .incremental import IncrementalOcclusion

            o = self.occlusion
            try:
                self._incremental = IncrementalOcclusion(self.net, self.size, o.patch, o.stride, o.batch_size)
                log.info("occlusion runs incrementally: %r", self._incremental)
            except Exception as e:
                # PneumoscanError: a model it cannot split (expected); anything else: an exporter
                # or runtime gap for this architecture (worth a warning)
                expected = isinstance(e, PneumoscanError)
                if self.engine == "incremental":
                    why = f"does not support this model ({e})" if expected else \
                        f"failed to build ({type(e).__name__}: {e})"
                    raise ModelError(f"incremental occlusion {why}; use --engine onnx or torch") from None
                (log.info if expected else log.warning)(
                    "incremental occlusion unavailable (%s); occluding the full network", e)
                self._incremental = False
        return self._incremental or None

    def occlusion_map(self, tensor: torch.Tensor, target: int) -> np.ndarray:
        """The occlusion map of one normalised image (1, 3, S, S) for class ``target``."""
        inc = self.incremental()
        if inc is not None:
            return inc(_check_input(tensor), _check_target(target))
        return self.occlusion(self.occlusion_forward(), tensor, target)

    def occlusion_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Batch -> probabilities for the occluded copies (built on first use, then reused)."""
        if self._forward is not None:
            return self._forward
        if self.engine in ("auto", "incremental", "onnx"):
            try:
                self._forward = onnx_forward(self.net, self.size, self.predictor.model_dir, self.predictor.config)
                return self._forward
            except PneumoscanError:
                raise
            except Exception as e:  # an exporter or runtime gap for this architecture
                if self.engine == "onnx":
                    raise ModelError(f"ONNX Runtime cannot run this model for occlusion ({e}); "
                                     "use --engine torch") from None
                log.warning("ONNX Runtime unavailable for occlusion (%s); using PyTorch", e)
        self._forward = _torch_forward(self.net)
        return self._forward

    def __call__(self, x: XRay, methods: tuple[str, ...] = METHODS) -> list[Explanation]:
        """Predict ``x`` and explain its predicted class with each of ``methods``."""
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise PneumoscanError(f"explanation method {bad or methods!r} is unknown; use occlusion, gradcam or both")
        if not isinstance(x, XRay):
            raise PneumoscanError(f"expected an XRay from pneumoscan.data.imaging.load_xray, got {type(x).__name__}")
        pred = self.predictor
        tensor = pred.tensor(x)[None]
        result = pred.result("image", pred.probabilities(tensor)[0])
        target = list(pred.labels).index(result.label)
        out = []
        with self._lock, eval_mode(self.net):
            for method in methods:
                t0 = time.perf_counter()
                if method == "gradcam":
                    heat = self.gradcam(self.net, tensor, target)
                else:
                    heat = self.occlusion_map(tensor, target)
                out.append(Explanation(method, heat, target, result.label, result.probabilities,
                                       time.perf_counter() - t0))
        return out
