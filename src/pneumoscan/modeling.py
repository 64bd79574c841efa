"""The classifier network and the model directory it is saved in.

A model directory holds ``model.safetensors`` (backbone and head weights) and ``config.json``
(backbone, preprocessing, class order, pneumonia threshold, training config, manifest hash,
validation metrics, SHA-256 of every weight file). Nothing is pickled. Loading checks the
SHA-256 before any tensor is read, so a tampered file is refused.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import LABELS, __version__
from .backbones import build_architecture
from .errors import ModelError
from .preprocess import PreprocessConfig

log = logging.getLogger(__name__)

from .modeldir import (CONFIG_NAME, FORMAT, WEIGHTS_NAME, atomic_write_bytes, atomic_write_json,  # noqa: F401
                       default_model_dir, read_config, resolve_model_dir, sha256_file, verify_file)


class Head(nn.Module):
    """The study's top model on pooled features: dropout then a dense softmax layer (logits out)."""

    def __init__(self, in_features: int, num_classes: int = len(LABELS), dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class PneumoNet(nn.Module):
    """Backbone (global average pooled) + :class:`Head`. ``forward`` returns logits."""

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


TTA = ("none", "flip")  # test-time augmentation of an ensemble: none, or + horizontal flip


class Ensemble(nn.Module):
    """Average of member probabilities; ``forward`` returns log-probabilities (usable as logits).

    Everything happens inside the graph, so ONNX export and serving get the same model:
    ``tta="flip"`` also scores the horizontally flipped image and averages it in, and
    ``input_affine`` (one ``(scale, shift)`` pair of 3-vectors per member, or ``None``)
    maps the ensemble's normalised input to a member whose mean/std differ.
    """

    def __init__(self, members: list[nn.Module], tta: str = "none",
                 input_affine: list[tuple[list[float], list[float]] | None] | None = None) -> None:
        super().__init__()
        if tta not in TTA:
            raise ModelError(f"test-time augmentation {tta!r} is unknown; use one of {', '.join(TTA)}")
        self.members = nn.ModuleList(members)
        self.tta = tta
        affine = list(input_affine or [None] * len(members))
        if len(affine) != len(members):
            raise ModelError(f"{len(affine)} input mappings for {len(members)} ensemble members")
        self._renorm = [a is not None for a in affine]
        for i, a in enumerate(affine):  # not persistent: rebuilt from config.json, never in the weights
            scale, shift = a if a is not None else ([1.0] * 3, [0.0] * 3)
            self.register_buffer(f"in_scale_{i}", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer(f"in_shift_{i}", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)

    def member_affine(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift), each (1, 3, 1, 1), taking the ensemble's input to member ``i``'s
        normalisation; None when the member shares the ensemble's."""
        if not self._renorm[i]:
            return None
        return getattr(self, f"in_scale_{i}"), getattr(self, f"in_shift_{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        views = torch.cat([x, x.flip(-1)]) if self.tta == "flip" else x
        probs = []
        for i, m in enumerate(self.members):
            affine = self.member_affine(i)
            v = views * affine[0] + affine[1] if affine is not None else views
            p = m(v).softmax(-1)
            probs.append(p.view(-1, n, p.shape[-1]).mean(0) if self.tta == "flip" else p)
        p = torch.stack(probs).mean(0)
        return p.clamp_min(1e-12).log()


def member_input_affine(ensemble_prep: dict, member_prep: dict) -> tuple[list[float], list[float]] | None:
    """(scale, shift) taking input normalised by ``ensemble_prep`` to a member's normalisation.

    Both normalise the same uint8 image u: x = (u - m)/s, x_i = (u - m_i)/s_i, hence
    x_i = x * s/s_i + (m - m_i)/s_i exactly. ``None`` when the two agree.
    """
    m, s = ensemble_prep["mean"], ensemble_prep["std"]
    mi, si = member_prep["mean"], member_prep["std"]
    if list(m) == list(mi) and list(s) == list(si):
        return None
    return [a / b for a, b in zip(s, si)], [(a - c) / b for a, c, b in zip(m, mi, si)]


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
        return float(self.config.get("threshold", 0.5))

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
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        digest = sha256_file(tmp)
        os.replace(tmp, out / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
        return Ensemble([build_net(m) for m in cfg["members"]], tta=cfg.get("tta", "none"), input_affine=affine)
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
