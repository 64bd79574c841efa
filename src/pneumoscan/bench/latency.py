"""Single-image latency: PyTorch eager vs ONNX Runtime, forward only and from JPEG bytes to
probabilities (decode + preprocess + forward + softmax), p50/p90/p99 over many calls."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import make_images, percentiles, time_calls, write_result

log = logging.getLogger(__name__)


def _network(model: str | None, backbone: str, pretrained: bool):
    """(PneumoNet, PreprocessConfig, description): a model directory's, or the backbone + a fresh head."""
    import torch

    from ..nets.backbones import create_backbone, default_preprocess
    from ..nets.checkpoint import load_model
    from ..nets.heads import Head, PneumoNet

    if model:
        b = load_model(model)
        return b.net.eval(), b.preprocess, f"model dir {model}"
    net, _ = create_backbone(backbone, pretrained=pretrained)
    prep = default_preprocess(backbone)
    with torch.inference_mode():
        dim = net(torch.zeros(1, 3, prep.size, prep.size)).shape[1]
    torch.manual_seed(0)
    return PneumoNet(net, Head(dim)).eval(), prep, f"{backbone} + untrained head"


def _onnx_file(net, prep, model: str | None, folder: Path) -> tuple[Path, str]:
    """The model's ONNX export: pneumoscan.export when it is there, else torch.onnx.export here."""
    if model:
        try:
            from ..export.onnx import export_onnx  # the project's exporter, when present
        except ImportError:
            export_onnx = None
        if export_onnx is not None:
            copy = folder / "model"  # export a copy: a benchmark never writes into the user's model directory
            shutil.copytree(model, copy)
            try:
                export_onnx(copy)
                found = sorted(copy.rglob("*.onnx"))
                if found:
                    return found[0], "pneumoscan.export.onnx.export_onnx"
            except Exception as e:  # the benchmark measures the runtime, not the exporter
                log.warning("pneumoscan.export failed (%s); exporting with torch.onnx.export", e)
    from ..features.engines import export_backbone_onnx

    return export_backbone_onnx(net, prep.size, folder), "torch.onnx.export (bench)"


def run(model: str | None = None, backbone: str = "efficientnet_lite0", iters: int = 200, warmup: int = 10,
        threads: int | None = None, pretrained: bool = True, out_dir=None) -> tuple[str, Path]:
    """Run the latency benchmark; returns (one-line summary, JSON path)."""
    import torch

    from ..data.imaging import load_xray
    from ..features.engines import OnnxEngine
    from ..preprocess import Preprocess
    from ..runtime import cpu_count

    threads = threads or cpu_count()
    torch.set_num_threads(threads)
    net, prep, what = _network(model, backbone, pretrained)
    pre = Preprocess(prep)
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as tmp:
        jpeg = Path(make_images(Path(tmp) / "img", 1, 224)[0].path).read_bytes()
        x = pre(load_xray(jpeg, size_hint=prep.size).pixels)[None]
        onnx_path, exporter = _onnx_file(net, prep, model, Path(tmp))
        ort = OnnxEngine(onnx_path, threads=threads)
        with torch.inference_mode():
            ref = net(x).float().numpy()
        diff = float(np.abs(ort(x) - ref).max())
        cl = net.to(memory_format=torch.channels_last)

        def torch_fwd(t=x):
            with torch.inference_mode():
                return cl(t.contiguous(memory_format=torch.channels_last)).softmax(-1)

        def e2e(fwd):
            return lambda: fwd(pre(load_xray(jpeg, size_hint=prep.size).pixels)[None])

        res = {
            "torch_forward": percentiles(time_calls(torch_fwd, iters, warmup)),
            "onnx_forward": percentiles(time_calls(lambda: ort(x), iters, warmup)),
            "torch_end_to_end": percentiles(time_calls(e2e(torch_fwd), iters, warmup)),
            "onnx_end_to_end": percentiles(time_calls(e2e(ort), iters, warmup)),
        }
    o, t = res["onnx_end_to_end"], res["torch_end_to_end"]
    path = write_result("latency", {"network": what, "size": prep.size, "threads": threads, "exporter": exporter,
                                    "onnx_vs_torch_max_abs_diff": diff, **res}, out_dir)
    line = (f"latency {what}@{prep.size}, {threads} threads, JPEG to probabilities: ONNX Runtime p50 {o['p50_ms']} ms "
            f"p99 {o['p99_ms']} ms; PyTorch eager p50 {t['p50_ms']} ms p99 {t['p99_ms']} ms "
            f"(forward only: {res['onnx_forward']['p50_ms']} vs {res['torch_forward']['p50_ms']} ms)")
    return line, path
