"""Fast ONNX graphs of the backbones for ONNX Runtime on a CPU.

TensorFlow-ported timm backbones (``tf_efficientnet_lite*``, ``tf_*``) pad their strided
convolutions "SAME" at run time: the exported graph computes the padding from the input shape
and runs a separate ``Pad`` before each such ``Conv``. ONNX Runtime then cannot keep the whole
network in its blocked NCHWc layout: every ``Pad`` costs a copy and a pair of layout reorders.

For a fixed input side the padding is a constant, so :func:`static_same_padding` swaps every
``Conv2dSame`` for a convolution with constant padding, and :func:`fold_pads` moves each
constant zero ``Pad`` into the following ``Conv``'s (possibly asymmetric) ``pads`` attribute.
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def fold_pads(model) -> int:
    """Move every constant zero spatial ``Pad`` that feeds only a ``Conv`` into that ``Conv``'s
    ``pads``; drops the ``Pad`` nodes and initializers left unused. Returns how many were folded.

    ``model`` is an ``onnx.ModelProto`` whose pads are initializers or ``Constant`` nodes (run
    ONNX Runtime's basic, hardware-independent optimisation first: :func:`optimize_basic`).
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts and consts[name].attribute and consts[name].attribute[0].name == "value":
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    folded = []
    for n in g.node:
        if n.op_type != "Pad" or len(n.input) < 2:
            continue
        mode = next((a.s for a in n.attribute if a.name == "mode"), b"constant")
        pads = value(n.input[1])
        fill = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(())
        if len(n.input) > 3 and n.input[3]:  # explicit axes (opset 18): keep it simple, leave it alone
            continue
        nxt = users.get(n.output[0], [])
        if mode != b"constant" or pads is None or fill is None or float(np.asarray(fill).reshape(-1)[0]) != 0:
            continue
        if len(nxt) != 1 or nxt[0].op_type != "Conv" or nxt[0].input[0] != n.output[0] or pads.size != 8:
            continue
        p = [int(v) for v in pads.tolist()]  # (N, C, H, W) begins, then ends
        if p[0] or p[1] or p[4] or p[5] or min(p) < 0:
            continue
        conv = nxt[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        for a in [a for a in conv.attribute if a.name in ("pads", "auto_pad")]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", [old[0] + p[2], old[1] + p[3], old[2] + p[6], old[3] + p[7]]))
        conv.input[0] = n.input[0]
        folded.append(n)
    for n in folded:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    return len(folded)


def optimize_basic(model_bytes: bytes) -> bytes:
    """ONNX Runtime's basic graph optimisations (constant folding, redundant-node removal) saved
    as a plain ONNX model: hardware independent, standard operators only."""
    import onnxruntime as ort

    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix="pneumoscan-basic-")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = tmp
        so.log_severity_level = 3
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        with open(tmp, "rb") as f:
            return f.read()
    finally:
        os.unlink(tmp)


def export_fast(net: nn.Module, size: int, input_name: str = "input", output_name: str = "output",
                dynamic_hw: bool = False, example: torch.Tensor | None = None) -> bytes:
    """``net`` as ONNX bytes for CPU inference: static "SAME" padding, pads folded into convs.

    The batch axis is dynamic, and with ``dynamic_hw`` the spatial axes too (the static pads are
    then those of ``size``, which is right for the crops of :mod:`pneumoscan.occlusion`, aligned
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
    model = onnx.load_from_string(optimize_basic(buf.getvalue()))
    fold_pads(model)
    return model.SerializeToString()
