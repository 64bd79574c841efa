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
from typing import Callable

import numpy as np
import torch

from ..data.imaging import XRay
from ..errors import ModelError, PneumoscanError
from ..nets.heads import eval_mode
from .gradcam import GradCAM
from .maps import CENTRAL_REGION, METHODS, Explanation, central_share  # noqa: F401  (re-exported: torch-free home)
from .occlusion import BATCH, PATCH, STRIDE, OcclusionSensitivity, _check_input, _check_target, _torch_forward, onnx_forward

log = logging.getLogger(__name__)

ENGINES = ("auto", "incremental", "onnx", "torch")


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
        p, f = pred.forward(tensor, features=pred.ood is not None)  # the learned score too, as predict applies it
        result = pred.result("image", p[0], *pred.screen(x), features=None if f is None else f[0])
        label = result.predicted  # a research view: the network's decision is explained even where the gate says no,
        if not result.in_scope:  # and every output says so (Explanation.reasons)
            log.warning("explaining an input the out-of-scope gate stops: %s", "; ".join(result.reasons))
        probs = {lab: float(v) for lab, v in zip(pred.labels, result.scores)}
        target = list(pred.labels).index(label)
        out = []
        with self._lock, eval_mode(self.net):
            for method in methods:
                t0 = time.perf_counter()
                if method == "gradcam":
                    heat = self.gradcam(self.net, tensor, target)
                else:
                    heat = self.occlusion_map(tensor, target)
                out.append(Explanation(method, heat, target, label, probs,
                                       time.perf_counter() - t0, reasons=list(result.reasons)))
        return out
