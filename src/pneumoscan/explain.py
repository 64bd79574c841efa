"""Where the network looks: occlusion sensitivity and Grad-CAM heat maps.

Both explainers are callables (settings in ``__init__``, work in ``__call__``) built on Captum:

* :class:`OcclusionSensitivity` slides a patch filled with the image mean over the model input,
  runs all occluded copies in batches (Captum ``Occlusion`` with ``perturbations_per_eval``) and
  maps the drop of the predicted class's probability. The network's own softmax is used (no
  ``--prevalence`` prior shift): the map shows what the network relies on.
* :class:`GradCAM` is Captum ``LayerGradCam`` on the backbone's last convolutional stage
  (:func:`pneumoscan.backbones.gradcam_layer`), for frozen-plus-head and fine-tuned models alike;
  an ensemble's map is the mean of its members' maps, each scaled to a maximum of 1.

Maps are float32 arrays at the model's input resolution (``size x size``), aligned with the
resized model input, so they are stretched back to the X-ray's own aspect for display.
:func:`explain_overlay_png` is the entry point of the web service.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .backbones import gradcam_layer
from .errors import ModelError, PneumoscanError
from .imaging import XRay
from .modeling import Ensemble, verify_file
from .onnxgraph import export_fast

log = logging.getLogger(__name__)

METHODS = ("occlusion", "gradcam")
ENGINES = ("auto", "incremental", "onnx", "torch")
CENTRAL_REGION = (0.20, 0.80, 0.15, 0.85)
"""(left, right, top, bottom) of the central chest region as fractions of width and height.

The central 60 % of the width and 70 % of the height, which holds both lungs and the heart on a
frontal pediatric film, while side markers, text labels, borders and corners fall outside it. The
region covers 42 % of the image, so a map spread evenly over the image puts 0.42 of its mass there.
"""


@contextlib.contextmanager
def eval_mode(*nets: nn.Module) -> Iterator[None]:
    """Put ``nets`` in eval mode and restore every submodule's train/eval flag afterwards."""
    saved = [(m, m.training) for net in nets for m in net.modules()]
    try:
        for net in nets:
            net.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


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


# ----------------------------------------------------------------------------------------------
# occlusion


class OcclusionSensitivity:
    """Occlusion sensitivity map: drop of the target class's probability when a patch is hidden.

    ``forward`` maps a normalised batch (N, 3, S, S) to class probabilities (N, C). Every pixel's
    value is the mean drop over the patch positions that cover it (Captum's convention), so a
    positive value marks evidence *for* the class and a negative one evidence against it.
    """

    def __init__(self, patch: int = 16, stride: int = 8, batch_size: int = 64) -> None:
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
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    name = (config or {}).get("onnx", {}).get("file", "model.onnx")
    if model_dir is not None and config is not None and (model_dir / name).is_file():
        src: bytes | str = str(verify_file(model_dir, name, config))
        log.info("occlusion runs on the model's ONNX export %s", src)
    else:
        t0 = time.perf_counter()
        with eval_mode(net):
            src = export_fast(net, size, "input", "logits")
        log.info("exported the model to ONNX in memory for occlusion (%.1f s, once per model)",
                 time.perf_counter() - t0)
    return _OnnxForward(ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]))


# ----------------------------------------------------------------------------------------------
# Grad-CAM


def _member_views(net: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, bool]]:
    """(single model, its input, flipped?) for each network an ensemble averages."""
    if not isinstance(net, Ensemble):
        return [(net, x, False)]
    views = []
    for i, m in enumerate(net.members):
        affine = net.member_affine(i)
        v = x * affine[0] + affine[1] if affine is not None else x
        views.append((m, v, False))
        if getattr(net, "tta", "none") == "flip":
            views.append((m, v.flip(-1), True))
    return views


class GradCAM:
    """Grad-CAM (Captum ``LayerGradCam``) on the backbone's last convolutional stage.

    ``net`` is a :class:`~pneumoscan.modeling.PneumoNet` (anything with ``.backbone``) or an
    :class:`~pneumoscan.modeling.Ensemble`. Returns a non-negative (S, S) map: the raw Grad-CAM
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
        views = _member_views(net, x)
        with eval_mode(net), torch.enable_grad():
            maps = []
            for model, v, flipped in views:
                cam = self._one(model, v, target)
                maps.append(cam.flip(-1) if flipped else cam)
        if len(maps) == 1:
            return maps[0].numpy().astype(np.float32)
        scaled = [m / m.max() if m.max() > 0 else m for m in maps]
        return torch.stack(scaled).mean(0).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# maps for a predictor


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
    ``engine`` picks what runs the occluded copies: "incremental" (:mod:`pneumoscan.occlusion`:
    the early layers recomputed only around the patch, exact, EfficientNet-family backbones),
    "onnx" (Captum over ONNX Runtime on the model's export, or an in-memory export), "torch"
    (Captum over eager PyTorch), or "auto" (the first of those that works for the model).
    """

    def __init__(self, predictor, *, patch: int = 16, stride: int = 8, batch_size: int = 64,
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
            from .occlusion import IncrementalOcclusion

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
            raise PneumoscanError(f"expected an XRay from pneumoscan.imaging.load_xray, got {type(x).__name__}")
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


_EXPLAINERS: "weakref.WeakKeyDictionary[object, Explainer]" = weakref.WeakKeyDictionary()
_EXPLAINERS_LOCK = threading.Lock()


def explain_overlay_png(predictor, xray: XRay, method: str = "gradcam") -> bytes:
    """A PNG of ``xray`` with the ``method`` heat map ("gradcam" or "occlusion") of its predicted class.

    ``predictor`` is a torch-backend :class:`~pneumoscan.predict.Predictor`; the explainer is built
    once per predictor and reused. Grad-CAM takes well under a second on CPU; occlusion seconds.
    """
    from .visualize import overlay_png

    if method not in METHODS:
        raise PneumoscanError(f"explanation method {method!r} is unknown; use gradcam or occlusion")
    with _EXPLAINERS_LOCK:  # one explainer (and one copy of the network) per predictor
        explainer = _EXPLAINERS.get(predictor)
        if explainer is None:
            explainer = _EXPLAINERS[predictor] = Explainer(predictor)
    (e,) = explainer(xray, (method,))
    return overlay_png(xray.pixels, e, title_name=None)
