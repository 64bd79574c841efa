"""GPU figures (CUDA): bare forward throughput in bf16 + channels_last, end-to-end extraction
through :func:`pneumoscan.features.extract.extract_features` (decode included: nvJPEG on the GPU, or
CPU decoding workers), how far nvJPEG's pixels and features are from the CPU decoder's, and
single-image latency. Skipped cleanly without CUDA. Needs only torch, timm and this package; with
``--data`` the real files (copied to distinct files up to ``images``), else generated images."""
from __future__ import annotations

import hashlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

from . import Sample, dataset_samples, make_images, percentiles, write_result

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


def distinct_copies(samples, folder: Path, n: int) -> list[Sample]:
    """``n`` files cycling through ``samples``, each made distinct by a JPEG comment segment after the
    start-of-image marker (decoders skip it; the feature cache sees new content, so nothing is a hit)."""
    folder.mkdir(parents=True, exist_ok=True)
    datas = [Path(s.path).read_bytes() for s in samples]
    out = []
    for i in range(n):
        d = datas[i % len(datas)]
        tag = f"pneumoscan bench copy {i}".encode()
        b = d[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + d[2:] if d[:2] == b"\xff\xd8" else d + tag
        p = folder / f"c{i:06d}{Path(samples[i % len(samples)].path).suffix}"
        p.write_bytes(b)
        out.append(Sample(str(p), hashlib.sha1(b).hexdigest()))
    return out


def decode_agreement(samples, net, prep, device: str = "cuda") -> dict:
    """nvJPEG + device resize against the CPU decoder on the same files: pixels and features (``device``
    "cpu" runs the same comparison with torchvision's CPU decoder, for the tests)."""
    import numpy as np
    import torch

    from ..features.extract import ImageFiles
    from ..features.gpu_decode import GpuDecoder, read_batches
    from ..preprocess import normalize_batch

    paths = [s.path for s in samples]
    dec = GpuDecoder(prep, device, paths)
    gpu = torch.cat([dec(items)[1] for items in read_batches(paths, 256, 8)]).cpu()
    ds = ImageFiles(paths, prep)
    cpu = torch.stack([ds[i][1] for i in range(len(paths))])
    diff = (gpu.int() - cpu.int()).abs()
    with torch.inference_mode():
        fg, fc = (torch.cat([net(normalize_batch(x[i:i + 256].to(device), prep)).float().cpu()
                             for i in range(0, len(x), 256)]) for x in (gpu, cpu))
    rel = ((fg - fc).norm(dim=1) / fc.norm(dim=1).clamp_min(1e-12)).numpy()
    return {"images": len(paths), "pixels_max_abs_diff": int(diff.max()),
            "pixels_differing": float((diff > 0).float().mean()), "decoded_on_gpu": dec.on_gpu,
            "feature_rel_diff_max": float(rel.max()), "feature_rel_diff_mean": float(np.mean(rel))}


def time_variants(samples, backbone: str, prep, net, wid: str, variants, repeats: int, tmp: Path,
                  device: str = "cuda") -> list[dict]:
    """End-to-end extraction of ``samples`` per (decode, workers, batch, overlap) variant, each run on a
    fresh cache; the median images/s of ``repeats`` runs. A variant that fails is recorded, not fatal."""
    from ..features.extract import extract_features

    runs = []
    for decode, w, b, overlap in variants:
        rates = []
        try:
            for r in range(repeats):
                t = time.perf_counter()
                feats, ok, info = extract_features(samples, backbone, size=prep.size, net=net, weights_id=wid,
                                                   cache_dir=tmp / f"cache-{decode}-{w}-{b}-{overlap}-{r}",
                                                   device=device, workers=w, batch_size=b, decode=decode,
                                                   overlap=overlap, progress=False)
                rates.append(round(int(ok.sum()) / (time.perf_counter() - t), 1))
        except Exception as e:  # one variant failing must not lose the others' figures
            runs.append({"decode": decode, "workers": w, "batch_size": b, "overlap": overlap,
                         "error": f"{type(e).__name__}: {e}"})
            log.warning("extract %s", runs[-1])
            continue
        runs.append({"decode": decode, "workers": w, "batch_size": b, "overlap": overlap, "images": int(ok.sum()),
                     "images_per_s": round(statistics.median(rates), 1), "runs": rates, "engine": info["engine"],
                     "decoded_on_gpu": info.get("decoded_on_gpu"), "decoded_on_cpu": info.get("decoded_on_cpu")})
        log.info("extract %s", runs[-1])
    return runs


def run(backbone: str = "efficientnet_lite0", size: int | None = None, batches=(256, 512, 1024),
        images: int = 20480, workers: int | None = None, pretrained: bool = True, compile: bool = False,
        out_dir=None, data=None, repeats: int = 2) -> tuple[str, Path | None]:
    """Run the GPU benchmark; returns (one-line summary, JSON path or None when skipped)."""
    import torch

    if not torch.cuda.is_available():
        return "gpu: skipped (no CUDA device)", None
    from ..features.extract import default_workers
    from ..nets.backbones import default_preprocess

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
    # end to end through the real extraction path (fp32 features, as cached), decode included
    fp32 = net.float().cuda().eval()
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-gpu-") as tmp:
        t = time.perf_counter()
        real = dataset_samples(data) if data else []
        samples = (distinct_copies(real, Path(tmp) / "img", images) if real
                   else make_images(Path(tmp) / "img", images, 224))
        res["generate_s"] = round(time.perf_counter() - t, 1)
        res["images_source"] = f"{len(real)} files of {data}, copied to {len(samples)} distinct files" if real \
            else f"{len(samples)} generated 224-px JPEGs"
        try:
            res["decode_agreement"] = decode_agreement(samples[:1024], fp32, prep)
        except Exception as e:  # recorded, and the timings still run
            res["decode_agreement"] = {"error": f"{type(e).__name__}: {e}"}
        threads, procs = default_workers("cuda", "torch", "gpu"), default_workers("cuda", "torch", "cpu")
        # (decode, workers, batch, overlap): the defaults, then one change at a time
        variants = [("cpu", procs, 256, True), ("cpu", procs, 256, False), ("cpu", procs, 512, True),
                    ("gpu", threads, 256, True), ("gpu", threads, 512, True)]
        if workers is not None:
            variants = [(d, workers, b, o) for d, _, b, o in variants]
        runs = time_variants(samples, backbone, prep, fp32, wid, variants, repeats, Path(tmp))
    best = max(runs, key=lambda r: r.get("images_per_s", 0.0))
    res["extract_variants"] = runs
    res["extract_end_to_end"] = {**best, "ratio_to_fp32_forward":
                                 round(best["images_per_s"] / next(iter(res["forward_fp32_tf32"].values())), 3)}
    w = (f"{best['decode']} decode, {best['workers']} {'threads' if best['decode'] == 'gpu' else 'workers'}"
         f"{', overlapped' if best.get('overlap') else ''}")
    res["compiled"] = compile
    path = write_result("gpu", res, out_dir)
    line = (f"gpu {res['gpu_name']} {backbone}@{prep.size}: bf16 channels_last forward "
            f"{res['forward_bf16'][best_b]:.0f} img/s (batch {best_b}); fp32/TF32 "
            f"{next(iter(res['forward_fp32_tf32'].values())):.0f} img/s; end-to-end extraction "
            f"{res['extract_end_to_end']['images_per_s']:.0f} img/s ({w}, batch {best['batch_size']}); "
            f"batch-1 latency p50 {res['latency_bf16_batch1']['p50_ms']} ms")
    return line, path
