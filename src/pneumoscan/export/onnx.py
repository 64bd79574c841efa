"""Export a model directory to one ONNX graph, checked against PyTorch before it is kept.

The graph (backbone + head, a fine-tuned net, or an :class:`~pneumoscan.nets.heads.Ensemble`)
takes ``input`` (N x 3 x S x S, float32, normalised as in the model's config) and returns
``logits`` (N x classes); the batch axis is dynamic. Export writes ``model.onnx`` into the
model directory only after a parity check (max absolute probability difference and identical
predicted class on seeded sample inputs), records its SHA-256 in ``config.json["files"]`` and
the export facts in ``config.json["onnx"]``. Every file is written atomically.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..io import atomic_path, atomic_write_json, file_digest
from ..labels import softmax
from ..nets.checkpoint import load_model
from ..nets.modeldir import CONFIG_NAME, read_config
from ..runtime import ort_session
from .config import ExportConfig

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


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


def _export_graph(net: torch.nn.Module, path: Path, size: int, opset: int) -> str:
    """torch.onnx with a dynamic batch axis, weights inside the one file; returns the exporter used.

    The torch.export-based exporter is PyTorch's supported path; the TorchScript one is the
    fallback for a network it cannot trace. Either way the parity check decides.
    """
    x = torch.zeros(2, 3, size, size)
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False)
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
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **common)
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
    with atomic_path(d / ONNX_NAME) as tmp_path:
        exporter = _export_graph(net, tmp_path, size, cfg.opset)
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
        digest = file_digest(tmp_path)
    # Re-read the config so that nothing written meanwhile is lost; write it atomically.
    conf = read_config(d)
    conf["files"] = {**conf.get("files", {}), ONNX_NAME: digest}
    conf["onnx"] = {"file": ONNX_NAME, "opset": int(opset), "input": INPUT_NAME, "output": OUTPUT_NAME,
                    "dynamic_batch": True, "exporter": exporter, "torch_version": torch.__version__, "parity": check}
    atomic_write_json(d / CONFIG_NAME, conf)
    log.info("exported %s (opset %d, parity max diff %.2e)", d / ONNX_NAME, opset, check["max_abs_prob_diff"])
    return d / ONNX_NAME
