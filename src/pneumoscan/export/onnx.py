"""Export a model directory to one ONNX graph, checked against PyTorch before it is kept.

The graph (backbone + head, a fine-tuned net, or an :class:`~pneumoscan.nets.heads.Ensemble`)
takes ``input`` (N x 3 x S x S, float32, normalised as in the model's config) and returns

- ``logits`` (N x classes), always output 0: what the network's ``forward`` returns;
- ``features`` (N x F): the backbone's globally pooled features; for an ensemble each member's
  (of the unflipped image) side by side, their column ranges in ``config.json["onnx"]["features"]``;
- ``cam`` (N x classes x S x S), when exact (:class:`ServingGraph`): every class's Grad-CAM,
  computed without gradients. For a backbone whose last feature maps ``A`` are global-average
  pooled into a linear head ``W``, Grad-CAM's weights are ``W[c] / (h w)``, so its map is
  ``relu(sum_k W[c, k] A_k) / (h w)`` (a class activation map), upsampled bilinearly to the input;
  an ensemble averages its views' maps, each scaled to a maximum of 1 (mirrored views mirrored
  back), as :class:`pneumoscan.explain.gradcam.GradCAM` does. The server explains with it and
  never needs PyTorch.

The batch axis is dynamic. Export writes ``model.onnx`` into the model directory only after a
parity check (max absolute probability difference and identical predicted class on seeded
sample inputs, and the maps against PyTorch's), records its SHA-256 in ``config.json["files"]``
and the export facts in ``config.json["onnx"]``. Every file is written atomically.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..io import atomic_path, atomic_write_json, file_digest
from ..labels import softmax
from ..nets.backbones import gradcam_layer
from ..nets.checkpoint import load_model
from ..nets.heads import Ensemble, Head, View, views_of
from ..nets.modeldir import CONFIG_NAME, read_config
from ..runtime import ort_session
from .config import ExportConfig
from .int8 import INT8_NAME

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"
CAM_NAME = "cam"
CAM_TOLERANCE = 1e-3  # max |cam_torch - cam_onnx| after scaling each map to a maximum of 1: a quarter of one grey
# level of the 8-bit overlay; 1e-4 refused the frozen Lite0 model of 'pneumoscan run' on an AVX-512 machine (3.0e-4:
# float32 kernels differ where a map's weighted sum of activations cancels)


def _pools_linearly(member: nn.Module, size: int) -> bool:
    """Whether Grad-CAM of ``member`` is exactly its class activation map: the Grad-CAM layer's
    output is the backbone's last feature map, the backbone global-average-pools it, and the head
    is dropout + one linear layer (checked on a probe input, not assumed from the class)."""
    backbone = getattr(member, "backbone", None)
    if not isinstance(getattr(member, "head", None), Head) or not hasattr(backbone, "forward_features"):
        return False
    seen = []
    try:
        hook = gradcam_layer(backbone).register_forward_hook(lambda m, i, o: seen.append(o))
    except Exception:  # no Grad-CAM layer for this backbone
        return False
    try:
        with torch.inference_mode():
            z = sample_inputs(size, 1, seed=1)
            a = backbone.forward_features(torch.from_numpy(z))
            pooled = backbone.forward_head(a)
    finally:
        hook.remove()
    return (len(seen) == 1 and seen[0].shape == a.shape and torch.equal(seen[0], a) and pooled.shape == a.shape[:2]
            and torch.allclose(pooled, a.mean((2, 3)), rtol=1e-5, atol=1e-6))


class ServingGraph(nn.Module):
    """What is exported: ``logits`` as ``net(x)``, pooled ``features``, and (when exact) ``cam``.

    Built from :meth:`Ensemble.views` and :meth:`Ensemble.combine` (or the one view of a
    single network), so the graph runs each view's backbone once for all three outputs.
    """

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net = net.eval()
        self.size = int(size)
        self.ensemble = isinstance(net, Ensemble)
        self.members = [v.net for v in views_of(net) if not v.flipped]
        self.with_features = all(isinstance(getattr(m, "head", None), Head)
                                 and hasattr(getattr(m, "backbone", None), "forward_features") for m in self.members)
        self.with_cam = self.with_features and all(_pools_linearly(m, size) for m in self.members)

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_NAME] + [FEATURES_NAME] * self.with_features + [CAM_NAME] * self.with_cam

    def feature_ranges(self) -> list[list[int]]:
        """[start, end) columns of each member in ``features``."""
        out, start = [], 0
        for m in self.members:
            width = int(m.head.fc.in_features)
            out.append([start, start + width])
            start += width
        return out

    def _view(self, v: View, x: torch.Tensor):
        """(logits, pooled features, upsampled non-negative CAM of every class or None) of one view."""
        member = v.net
        if not self.with_features:
            return member(v.input(x)), None, None
        a = member.backbone.forward_features(v.input(x))
        pooled = member.backbone.forward_head(a)
        logits = member.head(pooled)
        if not self.with_cam:
            return logits, pooled, None
        w = member.head.fc.weight  # (classes, F): Grad-CAM's weights times h w
        cam = torch.einsum("kf,nfhw->nkhw", w, a) / float(a.shape[-2] * a.shape[-1])
        cam = F.interpolate(torch.relu(cam), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return logits, pooled, (cam.flip(-1) if v.flipped else cam)

    def forward(self, x: torch.Tensor):
        views = views_of(self.net)
        outs = [self._view(v, x) for v in views]
        if self.ensemble:
            logits = self.net.combine([o[0].softmax(-1) for o in outs]).clamp_min(1e-12).log()
        else:
            logits = outs[0][0]
        result = [logits]
        if self.with_features:
            result.append(torch.cat([o[1] for v, o in zip(views, outs) if not v.flipped], dim=1))
        if self.with_cam:
            maps = [o[2] for o in outs]
            if self.ensemble:
                maps = [m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) for m in maps]
                result.append(torch.stack(maps).mean(0))
            else:
                result.append(maps[0])
        return tuple(result)


def sample_inputs(size: int, n: int, seed: int = 0) -> np.ndarray:
    """Seeded inputs in the normalised range: smooth 'images' plus noise (not only zeros)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1.5, 1.5, (n, 1, 1, 1))
    ramp = np.linspace(-1, 1, size, dtype=np.float32)[None, None, :, None] * rng.uniform(-1, 1, (n, 1, 1, 1))
    x = base + ramp + rng.normal(0, 0.5, (n, 1, size, size))
    return np.repeat(x, 3, axis=1).astype(np.float32)


def parity(net: torch.nn.Module, onnx_path: str | os.PathLike, size: int, cfg: ExportConfig = ExportConfig()) -> dict:
    """Compare PyTorch and ONNX Runtime probabilities on seeded inputs (batch 1 and batch N)."""
    sess = ort_session(onnx_path)
    x = sample_inputs(size, cfg.samples, cfg.seed)
    with torch.inference_mode():
        p_torch = net(torch.from_numpy(x)).float().softmax(-1).numpy()
    p_batch = softmax(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    p_single = np.concatenate([softmax(sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 1]})[0])
                               for i in range(len(x))])
    diff = float(max(np.abs(p_torch - p_batch).max(), np.abs(p_torch - p_single).max()))
    same = bool((p_torch.argmax(1) == p_batch.argmax(1)).all() and (p_torch.argmax(1) == p_single.argmax(1)).all())
    return {"samples": int(cfg.samples), "batch_sizes": [1, int(cfg.samples)], "max_abs_prob_diff": diff,
            "same_class": same, "tolerance": cfg.tolerance, "passed": bool(same and diff <= cfg.tolerance)}


def cam_parity(graph: ServingGraph, onnx_path: str | os.PathLike, cfg: ExportConfig = ExportConfig()) -> dict:
    """Max difference of the ONNX maps from PyTorch's, each map scaled to a maximum of 1."""
    sess = ort_session(onnx_path)
    x = sample_inputs(graph.size, min(cfg.samples, 4), cfg.seed)
    with torch.inference_mode():
        ref = graph(torch.from_numpy(x))[-1].numpy()
    got = sess.run([CAM_NAME], {INPUT_NAME: x})[0]

    def unit(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(m.max(axis=(2, 3), keepdims=True), 1e-12)

    diff = float(np.abs(unit(ref) - unit(got)).max())
    return {"max_abs_diff_scaled": diff, "tolerance": CAM_TOLERANCE, "passed": bool(diff <= CAM_TOLERANCE)}


def _export_graph(net: nn.Module, path: Path, size: int, opset: int, output_names: list[str]) -> str:
    """torch.onnx with a dynamic batch axis, weights inside the one file; returns the exporter used.

    The torch.export-based exporter is PyTorch's supported path; the TorchScript one is the
    fallback for a network it cannot trace. Either way the parity check decides.
    """
    x = torch.zeros(2, 3, size, size)
    common = dict(input_names=[INPUT_NAME], output_names=output_names, opset_version=opset, verbose=False)
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(net, (x,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch},), optimize=True, **common)
        return "torch.export"
    except Exception as e:  # the exporter raises many types; keep the trace in the log
        log.warning("torch.export-based ONNX export failed (%s: %s); trying the TorchScript exporter",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        log.debug("export failure", exc_info=True)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (x,), str(path), dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *output_names]}, **common)
        return "torchscript"
    except Exception as e:
        log.debug("ONNX export failed", exc_info=True)
        raise ModelError(f"ONNX export of the model failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def export_onnx(model_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig()) -> Path:
    """Export ``model_dir`` to ``model_dir/model.onnx`` and record it in config.json; returns the path.

    Raises :class:`ModelError` when the weights fail their integrity check, the export fails,
    or the parity check does not pass (nothing is written in that case).
    """
    import onnx

    d = Path(model_dir)
    bundle = load_model(d)  # verifies the safetensors SHA-256 first
    net = bundle.net.eval()
    size = int(bundle.config["preprocess"]["size"])
    graph = ServingGraph(net, size).eval()
    if not graph.with_cam:
        log.warning("%s: Grad-CAM is not a plain class activation map for this architecture; the export has no "
                    "'cam' output (the server explains with PyTorch instead)", d)
    with atomic_path(d / ONNX_NAME) as tmp_path:
        exporter = _export_graph(graph, tmp_path, size, cfg.opset, graph.output_names)
        Path(str(tmp_path) + ".data").unlink(missing_ok=True)  # never left behind: weights are inline
        model = onnx.load(str(tmp_path))
        onnx.checker.check_model(model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset != cfg.opset:
            raise ModelError(f"the exporter produced opset {opset}, not the requested {cfg.opset}; "
                             f"nothing was exported (use --opset {opset})")
        check = parity(net, tmp_path, size, cfg)
        if not check["passed"]:
            raise ModelError(f"ONNX parity check failed for {d}: max probability difference "
                             f"{check['max_abs_prob_diff']:.2e} (tolerance {cfg.tolerance:.0e}), "
                             f"same class: {check['same_class']}; the model was not exported")
        cam_check = cam_parity(graph, tmp_path, cfg) if graph.with_cam else None
        if cam_check is not None and not cam_check["passed"]:
            raise ModelError(f"ONNX class-activation maps differ from PyTorch's for {d} (max difference "
                             f"{cam_check['max_abs_diff_scaled']:.2e} > {CAM_TOLERANCE:.0e} of a map's maximum); "
                             "the model was not exported")
        digest = file_digest(tmp_path)
    # Re-read the config so that nothing written meanwhile is lost; write it atomically.
    conf = read_config(d)
    conf["files"] = {k: v for k, v in conf.get("files", {}).items() if k != INT8_NAME}  # an INT8 copy of the old graph
    conf["files"][ONNX_NAME] = digest
    conf["onnx"] = {"file": ONNX_NAME, "opset": int(opset), "input": INPUT_NAME, "output": OUTPUT_NAME,
                    "outputs": graph.output_names, "dynamic_batch": True, "exporter": exporter,
                    "torch_version": torch.__version__, "parity": check}
    if graph.with_features:
        conf["onnx"]["features"] = {"members": graph.feature_ranges(), "view": "unflipped image, globally pooled"}
    if cam_check is not None:
        conf["onnx"]["cam"] = {"layer": "last feature map (Grad-CAM's layer)", "classes": "LABELS order",
                               "scaled": "each view's map to max 1, then averaged" if graph.ensemble else "raw",
                               "parity": cam_check}
    atomic_write_json(d / CONFIG_NAME, conf)
    (d / INT8_NAME).unlink(missing_ok=True)  # stale now; 'export --int8' makes a new one
    log.info("exported %s (opset %d, parity max diff %.2e)", d / ONNX_NAME, opset, check["max_abs_prob_diff"])
    return d / ONNX_NAME
