"""GPU figures (CUDA): bare forward throughput in bf16 + channels_last, end-to-end extraction
through :func:`pneumoscan.features.extract.extract_features` (decoding workers feed the GPU), and
single-image latency. Skipped cleanly without CUDA. Needs only torch, timm and this package;
synthetic images, so it runs on a machine without the data or a network."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from . import make_images, percentiles, write_result

log = logging.getLogger(__name__)


def _backbone(name: str, pretrained: bool):
    from ..errors import WeightsError
    from ..nets.backbones import create_backbone

    try:
        net, wid = create_backbone(name, pretrained=pretrained)
    except WeightsError as e:  # speed does not depend on the weights' values
        log.warning("%s; timing random weights instead", e)
        net, wid = create_backbone(name, pretrained=False)
    return net, wid


def forward_rate(net, size: int, batch: int, dtype, iters: int = 30) -> float:
    """Images/s of a bare forward pass (CUDA events around ``iters`` batches, after warm-up)."""
    import torch

    x = torch.randn(batch, 3, size, size, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(5):
            net(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            net(x)
        end.record()
        torch.cuda.synchronize()
    return round(batch * iters / (start.elapsed_time(end) / 1e3), 1)


def run(backbone: str = "efficientnet_lite0", size: int | None = None, batches=(256, 512, 1024),
        images: int = 4096, workers: int | None = None, pretrained: bool = True, compile: bool = False,
        out_dir=None) -> tuple[str, Path | None]:
    """Run the GPU benchmark; returns (one-line summary, JSON path or None when skipped)."""
    import torch

    if not torch.cuda.is_available():
        return "gpu: skipped (no CUDA device)", None
    from ..features.extract import extract_features
    from ..nets.backbones import default_preprocess
    from ..runtime import cpu_count

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    prep = default_preprocess(backbone, size)
    net, wid = _backbone(backbone, pretrained)
    fp32 = net.cuda().eval().to(memory_format=torch.channels_last)
    res: dict = {"backbone": backbone, "size": prep.size, "weights": wid, "gpu_name": torch.cuda.get_device_name(0)}
    res["forward_fp32_tf32"] = {b: forward_rate(fp32, prep.size, b, torch.float32) for b in batches[:1]}
    bf16 = net.to(torch.bfloat16)
    if compile:
        bf16 = torch.compile(bf16, mode="max-autotune-no-cudagraphs")
    res["forward_bf16"] = {b: forward_rate(bf16, prep.size, b, torch.bfloat16) for b in batches}
    best_b = max(res["forward_bf16"], key=res["forward_bf16"].get)
    # single image, bf16: what one request costs on the GPU (forward only)
    x1 = torch.randn(1, 3, prep.size, prep.size, device="cuda").to(torch.bfloat16)
    x1 = x1.contiguous(memory_format=torch.channels_last)

    def one():
        with torch.inference_mode():
            bf16(x1)
        torch.cuda.synchronize()
    from . import time_calls
    res["latency_bf16_batch1"] = percentiles(time_calls(one, 200, 20))
    # end to end through the real extraction path (fp32 features, as cached): decode-bound
    fp32 = net.float().cuda().eval()
    w = workers if workers is not None else max(1, min(12, cpu_count() - 2))
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-gpu-") as tmp:
        t = time.perf_counter()
        samples = make_images(Path(tmp) / "img", images, 224)
        res["generate_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        feats, ok, info = extract_features(samples, backbone, size=prep.size, cache_dir=Path(tmp) / "cache",
                                           net=fp32, weights_id=wid, device="cuda", workers=w, batch_size=256,
                                           progress=False)
        dt = time.perf_counter() - t
    res["extract_end_to_end"] = {"images": int(ok.sum()), "workers": w, "batch_size": 256, "seconds": round(dt, 2),
                                 "images_per_s": round(int(ok.sum()) / dt, 1), "engine": info["engine"]}
    res["compiled"] = compile
    path = write_result("gpu", res, out_dir)
    line = (f"gpu {res['gpu_name']} {backbone}@{prep.size}: bf16 channels_last forward "
            f"{res['forward_bf16'][best_b]:.0f} img/s (batch {best_b}); fp32/TF32 "
            f"{next(iter(res['forward_fp32_tf32'].values())):.0f} img/s; end-to-end extraction "
            f"{res['extract_end_to_end']['images_per_s']:.0f} img/s with {w} decoding workers; "
            f"batch-1 latency p50 {res['latency_bf16_batch1']['p50_ms']} ms")
    return line, path
