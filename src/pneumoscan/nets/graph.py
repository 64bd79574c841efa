"""Fast ONNX graphs of the backbones for ONNX Runtime on a CPU.

TensorFlow-ported timm backbones (``tf_efficientnet_lite*``, ``tf_*``) pad their strided
convolutions "SAME" at run time: the exported graph computes the padding from the input shape
and runs a separate ``Pad`` before each such ``Conv``. ONNX Runtime then cannot keep the whole
network in its blocked NCHWc layout: every ``Pad`` costs a copy and a pair of layout reorders.

For a fixed input side the padding is a constant, so :func:`static_same_padding` swaps every
``Conv2dSame`` for a convolution with constant padding, and :func:`fold_pads` moves each
constant zero ``Pad`` into the following ``Conv``'s (possibly asymmetric) ``pads`` attribute
(onnxscript's rewrite rule).
The result computes the same numbers (identical outputs on the parity inputs) and leaves a graph
of ``Conv`` nodes only, which ONNX Runtime runs 1.2-1.5x faster on this project's 2-core CPU
(``benchmarks/results/extract.json``).

:func:`export_fast` is the one TorchScript-exporter path used for the feature-extraction
backbone and the occlusion graphs (about 2 s, against about 12 s for the torch.export-based
exporter that ``pneumoscan export`` uses for the served model, which folds pads by itself).
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import ort_session


class StaticPadConv2d(nn.Module):
    """A ``Conv2dSame`` frozen to one input size: constant zero padding, then an unpadded conv."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.pads = tuple(int(p) for p in pads)  # (left, right, top, bottom), as F.pad takes them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _same_pads(hw: Sequence[int], conv: nn.Conv2d) -> tuple[int, int, int, int]:
    from timm.layers.padding import get_same_padding

    ph = get_same_padding(int(hw[0]), conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    pw = get_same_padding(int(hw[1]), conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def _same_conv_types() -> tuple[type, ...]:
    try:
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
        return (Conv2dSame, Conv2dSameExport)
    except ImportError:  # pragma: no cover - older timm
        from timm.layers.conv2d_same import Conv2dSame
        return (Conv2dSame,)


def static_same_padding(net: nn.Module, size: int) -> nn.Module:
    """A copy of ``net`` whose run-time "SAME" convolutions pad by constants for a ``size`` input.

    The copy shares no parameters with ``net`` and computes the same outputs at that size (a
    different size gives wrong padding, so the copy belongs to one export only). A network
    without such convolutions is returned as an unchanged copy.
    """
    net = copy.deepcopy(net).eval()
    kinds = _same_conv_types()
    seen: dict[nn.Module, tuple[int, ...]] = {}

    def record(m: nn.Module, args: tuple) -> None:  # a pre-hook returning a value would replace the input
        seen.setdefault(m, tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, kinds)]
    if not hooks:
        return net
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, kinds) and child in seen:
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                  child.dilation, child.groups, child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, StaticPadConv2d(plain, _same_pads(seen[child], child)))
            else:
                swap(child)

    swap(net)
    return net


def fold_pads(model):
    """``model`` (an ``onnx.ModelProto``) with every constant zero spatial ``Pad`` that feeds a ``Conv``
    folded into that ``Conv``'s ``pads``: onnxscript's pad-into-conv rewrite, after ONNX shape
    inference (the rule needs the input's rank). Run ONNX Runtime's basic optimisation first
    (:func:`optimize_basic`) so that the pads are constants."""
    import onnx
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import fuse_pad_into_conv_rule

    return rewrite(onnx.shape_inference.infer_shapes(model), pattern_rewrite_rules=[fuse_pad_into_conv_rule])


def optimize_basic(model_bytes: bytes) -> bytes:
    """ONNX Runtime's basic graph optimisations (constant folding, redundant-node removal) saved
    as a plain ONNX model: hardware independent, standard operators only."""
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix="pneumoscan-basic-")
    os.close(fd)
    try:
        ort_session(model_bytes, level="basic", optimized_path=tmp, quiet=True)
        with open(tmp, "rb") as f:
            return f.read()
    finally:
        os.unlink(tmp)


def export_fast(net: nn.Module, size: int, input_name: str = "input", output_name: str = "output",
                dynamic_hw: bool = False, example: torch.Tensor | None = None) -> bytes:
    """``net`` as ONNX bytes for CPU inference: static "SAME" padding, pads folded into convs.

    The batch axis is dynamic, and with ``dynamic_hw`` the spatial axes too (the static pads are
    then those of ``size``, which is right for the crops of :mod:`pneumoscan.explain.incremental`, aligned
    to the network's stride). ``example`` is the input traced (default zeros, 3 channels).
    """
    import onnx

    net = static_same_padding(net, size)
    x = example if example is not None else torch.zeros(2, 3, size, size)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(net, (x,), buf, input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: axes, output_name: axes if dynamic_hw else {0: "batch"}},
                          opset_version=17,
                          dynamo=False)
    return fold_pads(onnx.load_from_string(optimize_basic(buf.getvalue()))).SerializeToString()
