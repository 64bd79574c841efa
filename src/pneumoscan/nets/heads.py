"""The networks: the study's head, backbone + head, and ensembles that average members inside one graph.

Everything an ensemble does (map its input to each member's normalisation, optionally score the
horizontally flipped image, average) is described once by :meth:`Ensemble.views` and
:meth:`Ensemble.combine`, which its forward pass, Grad-CAM and incremental occlusion all use.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..labels import LABELS


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


@dataclass(frozen=True)
class View:
    """One network an ensemble runs: member ``index`` on its mapped input, possibly mirrored."""

    index: int  # member index (0 for a single network)
    net: nn.Module  # the member network (backbone + head)
    affine: tuple[torch.Tensor, torch.Tensor] | None  # (scale, shift), each (1, 3, 1, 1), or None
    flipped: bool  # the horizontally mirrored image
    size: int | None = None  # the member's input side when it differs from the ensemble's (resized in the graph)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The member's input for the ensemble's normalised input ``x`` (N, 3, S, S)."""
        v = x * self.affine[0] + self.affine[1] if self.affine is not None else x
        if self.size is not None and self.size != v.shape[-1]:  # antialiased, as an area resize would be
            v = nn.functional.interpolate(v, size=(self.size, self.size), mode="bilinear", antialias=True,
                                          align_corners=False)
        return v.flip(-1) if self.flipped else v


class Head(nn.Module):
    """The study's top model on pooled features: dropout then a dense softmax layer (logits out)."""

    def __init__(self, in_features: int, num_classes: int = len(LABELS), dropout: float = 0.0) -> None:
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
    maps the ensemble's normalised input to a member whose mean/std differ, and ``input_sizes``
    (one side per member, or ``None``) resizes it for a member trained at a lower resolution.
    """

    def __init__(self, members: list[nn.Module], tta: str = "none",
                 input_affine: list[tuple[list[float], list[float]] | None] | None = None,
                 input_sizes: list[int | None] | None = None) -> None:
        super().__init__()
        if tta not in TTA:
            raise ModelError(f"test-time augmentation {tta!r} is unknown; use one of {', '.join(TTA)}")
        self.members = nn.ModuleList(members)
        self.tta = tta
        affine = list(input_affine or [None] * len(members))
        if len(affine) != len(members):
            raise ModelError(f"{len(affine)} input mappings for {len(members)} ensemble members")
        self._renorm = [a is not None for a in affine]
        self.input_sizes = list(input_sizes or [None] * len(members))
        if len(self.input_sizes) != len(members):
            raise ModelError(f"{len(self.input_sizes)} input sizes for {len(members)} ensemble members")
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

    def views(self) -> list[View]:
        """Every network run the ensemble averages: each member, and with flip TTA also each member
        on the mirrored image (member order, unflipped first)."""
        flips = (False, True) if self.tta == "flip" else (False,)
        return [View(i, m, self.member_affine(i), f, self.input_sizes[i])
                for i, m in enumerate(self.members) for f in flips]

    def combine(self, per_view: Sequence) -> "torch.Tensor":
        """The ensemble's result from one result per view (tensors or arrays of one shape): the mean
        over each member's views, then over the members (equal weight per member)."""
        k = 2 if self.tta == "flip" else 1
        members = [sum(per_view[j * k:(j + 1) * k]) / k for j in range(len(self.members))]
        return sum(members) / len(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta == "flip":  # one batched pass per member over the image and its mirror
            n = x.shape[0]
            probs = []
            for v in self.views()[::2]:
                vx = v.input(x)
                p = v.net(torch.cat([vx, vx.flip(-1)])).softmax(-1)
                probs += [p[:n], p[n:]]
        else:
            probs = [v.net(v.input(x)).softmax(-1) for v in self.views()]
        return self.combine(probs).clamp_min(1e-12).log()


def member_input_size(ensemble_prep: dict, member_prep: dict) -> int | None:
    """The member's own input side when it is not the ensemble's (the graph resizes to it)."""
    return None if int(member_prep["size"]) == int(ensemble_prep["size"]) else int(member_prep["size"])


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




def views_of(net: nn.Module) -> list[View]:
    """The views of an :class:`Ensemble`, or the one view of a single network."""
    return net.views() if isinstance(net, Ensemble) else [View(0, net, None, False)]


def combine(net: nn.Module, per_view: Sequence):
    """:meth:`Ensemble.combine` for an ensemble; the one result of a single network."""
    return net.combine(per_view) if isinstance(net, Ensemble) else per_view[0]
