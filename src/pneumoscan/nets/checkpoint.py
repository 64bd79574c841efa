"""Save and load model directories with their networks (safetensors + config.json; nothing pickled).

Loading checks the SHA-256 of the weights against ``config.json`` before any tensor is read, so a
tampered file is refused, and checks that the class order is pneumoscan's.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .. import __version__
from ..errors import ModelError
from ..io import atomic_path, atomic_write_json, file_digest
from ..labels import DEFAULT_THRESHOLD, LABELS
from ..preprocess import PreprocessConfig
from .backbones import build_architecture
from .heads import Ensemble, Head, PneumoNet, member_input_affine, member_input_size
from .modeldir import CONFIG_NAME, FORMAT, WEIGHTS_NAME, read_config, verify_file


@dataclass
class ModelBundle:
    """A loaded model: the network (eval mode), its config and where it came from."""

    net: nn.Module
    config: dict
    path: Path | None

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.config["preprocess"])

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", DEFAULT_THRESHOLD))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.config.get("labels", LABELS))

    @property
    def model_id(self) -> str:
        return str(self.config.get("model_id", "unknown"))


def save_model(out_dir: str | os.PathLike, net: nn.Module, config: dict) -> Path:
    """Write ``net`` and ``config`` into ``out_dir`` (weights as safetensors, SHA-256 recorded)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
        digest = file_digest(tmp)
    cfg = dict(config)
    cfg.setdefault("format", FORMAT)
    cfg.setdefault("labels", list(LABELS))
    cfg.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cfg.setdefault("pneumoscan_version", __version__)
    cfg["files"] = {**cfg.get("files", {}), WEIGHTS_NAME: digest}
    cfg["model_id"] = f"{cfg.get('name', cfg.get('backbone', 'model'))}-{digest[:12]}"
    atomic_write_json(out / CONFIG_NAME, cfg)
    return out


def build_net(cfg: dict) -> nn.Module:
    """The architecture described by a config (no weights)."""
    if cfg.get("kind") == "ensemble":
        affine = [member_input_affine(cfg["preprocess"], m["preprocess"]) for m in cfg["members"]]
        sizes = [member_input_size(cfg["preprocess"], m["preprocess"]) for m in cfg["members"]]
        return Ensemble([build_net(m) for m in cfg["members"]], tta=cfg.get("tta", "none"), input_affine=affine,
                        input_sizes=sizes)
    backbone = build_architecture(cfg["backbone"])
    head = Head(int(cfg["head"]["in_features"]), len(cfg.get("labels", LABELS)), float(cfg["head"].get("dropout", 0.0)))
    return PneumoNet(backbone, head)


def load_model(model_dir: str | os.PathLike) -> ModelBundle:
    """Load and verify a model directory (single model or ensemble) for inference."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    cfg = read_config(d)
    path = verify_file(d, WEIGHTS_NAME, cfg)
    net = build_net(cfg)
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except Exception as e:
        raise ModelError(f"{path} does not match the architecture in config.json: {e}") from None
    net.eval()
    return ModelBundle(net=net, config=cfg, path=d)
