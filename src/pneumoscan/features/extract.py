"""Frozen-backbone feature extraction with an on-disk cache.

Features (the globally average-pooled bottleneck, the study's "bottleneck features" after its
GAP layer, which has no parameters) are cached by (backbone weights, preprocessing, file
content) in a :class:`~pneumoscan.features.cache.FeatureCache`: a second run is a cache hit, a
changed or added file is recomputed, and an interrupted run resumes from the last complete shard.
The backbone runs on the engine :func:`~pneumoscan.features.engines.make_engine` picks; decoding
workers are single-threaded so that they never fight the inference threads for the cores.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.imaging import load_xray
from ..errors import ImageError, PneumoscanError
from ..nets.backbones import DEFAULT_BACKBONE, create_backbone, default_preprocess
from ..preprocess import Preprocess, PreprocessConfig
from ..runtime import cpu_count
from . import gpu_decode
from .cache import FeatureCache, default_cache_dir
from .config import CPU_BATCH, DECODERS, GPU_BATCH, GPU_MAX_WORKERS, GPU_READ_THREADS, OVERLAP_DEPTH
from .engines import make_engine

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Decodes and resizes images to uint8 ``size x size``; failures come back as ``None``."""

    def __init__(self, paths: Sequence[str], prep: PreprocessConfig, intensity: bool = True) -> None:
        self.paths = list(paths)
        self.prep = prep
        self.intensity = intensity  # False: resize only (the fine-tuner normalises intensity per batch)
        self._pp: Preprocess | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self._pp is None:
            self._pp = Preprocess(self.prep)
        try:
            x = load_xray(self.paths[i], size_hint=self.prep.size, colour=False)  # JPEG draft: decode big files at 1/2-1/8 scale
            px = (self._pp.resize if self.intensity else self._pp.resize_only)(x.pixels)
            # px may be Pillow's read-only buffer when no resize was needed
            return i, torch.from_numpy(px if px.flags.writeable else px.copy()), ""
        except ImageError as e:
            return i, None, str(e)


def collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    xs = torch.stack([x for _, x in ok]) if ok else torch.empty(0)
    return idx, xs, bad


def _worker_init(_: int) -> None:
    """Decoding workers use one thread each: OpenCV's and torch's pools inside workers would fight
    the inference threads of the main process for the same cores (the old run spent most of
    its time in the kernel)."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def extract_features(
    samples: Sequence,  # objects with .path and .sha1 (manifest samples)
    backbone: str = DEFAULT_BACKBONE,
    *,
    size: int | None = None,
    intensity: str = "none",
    weights: str | None = None,
    pretrained: bool = True,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    net: torch.nn.Module | None = None,
    weights_id: str | None = None,
    engine: str | None = None,
    decode: str = "cpu",
    overlap: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features for ``samples`` (cached). Returns (features [n, d], ok mask [n], info).

    Images that fail to decode are listed in ``info["failed"]`` and masked out, never silently.
    ``engine`` is "torch", "onnx" (ONNX Runtime, CPU) or "auto" (default, or $PNEUMOSCAN_ENGINE):
    ONNX Runtime on a CPU when there are at least ``ONNX_MIN_IMAGES`` images to compute or the
    backbone was exported before, PyTorch otherwise. Both give the same features within 1e-4.
    ``workers=None`` picks the measured best: decode in-process with ONNX Runtime, else 2 workers.
    ``device`` "auto" is the first CUDA device when there is one, else the CPU. ``decode`` is "cpu"
    (worker processes; on a GPU, the cores less two, at most ``GPU_MAX_WORKERS``) or "gpu" (nvJPEG,
    :mod:`~pneumoscan.features.gpu_decode`; ``workers`` then counts file-reading threads).
    ``batch_size=None`` is ``CPU_BATCH`` on a CPU and ``GPU_BATCH`` on a GPU. ``overlap`` (default: on a
    GPU) hands each batch's features to a writer thread, so the next batch runs while they are copied
    back and written.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (torch.device(device).index or 0) >= n:
            raise PneumoscanError(f"device {device!r}: this machine has {n} CUDA device(s); use --device auto or cpu")
    if decode not in DECODERS:
        raise PneumoscanError(f"decode {decode!r} is unknown; use one of {', '.join(DECODERS)}")
    on_gpu = decode == "gpu"
    if on_gpu and not gpu_decode.available(device):
        raise PneumoscanError(f"decode 'gpu' needs a CUDA device and torchvision's nvJPEG decoder (extracting on "
                              f"{device}); use --decode cpu or --device cuda")
    prep = default_preprocess(backbone, size, intensity)
    if net is None:
        net, weights_id = create_backbone(backbone, pretrained=pretrained, weights=weights)
    cache = FeatureCache.for_key(cache_dir or default_cache_dir(), backbone, weights_id or "custom", prep)
    cached = cache.load()
    todo = _todo(samples, cached)
    info = {"backbone": backbone, "weights_id": weights_id, "preprocess": prep.to_dict(), "cache": str(cache.root),
            "cached": len(samples) - len(todo), "computed": 0, "failed": [], "engine": None}
    if todo:
        with cache.lock():  # a second run on this cache waits, then finds the first one's features
            cached = cache.load()
            todo = _todo(samples, cached)
            info["cached"] = len(samples) - len(todo)
            if todo:
                run = make_engine(net, prep, cache.root, device, engine, len(todo))
                info["engine"] = run.name
                if batch_size is None:
                    batch_size = GPU_BATCH if run.device.type == "cuda" else CPU_BATCH
                info["batch_size"] = batch_size
                if overlap is None:
                    overlap = run.device.type == "cuda"
                _compute(samples, todo, run, prep, cache, cached, info, batch_size, workers, progress, on_gpu,
                         overlap)
    dim = next(iter(cached.values())).shape[0] if cached else 0
    feats = np.zeros((len(samples), dim), np.float32)
    ok = np.zeros(len(samples), bool)
    for i, s in enumerate(samples):
        f = cached.get(s.sha1)
        if f is not None:
            feats[i], ok[i] = f, True
    return feats, ok, info


def _todo(samples, cached: dict) -> list[int]:
    """Indices to compute: not cached, and one per distinct content (duplicates share a row)."""
    seen: dict[str, int] = {}
    return [i for i, s in enumerate(samples) if s.sha1 not in cached and seen.setdefault(s.sha1, i) == i]


def default_workers(device_type: str, engine: str, decode: str) -> int:
    """Decoding worker processes (with ``decode`` "gpu": file-reading threads) when none are given."""
    if decode == "gpu":
        return min(GPU_READ_THREADS, max(2, cpu_count()))
    if device_type == "cuda":  # measured (bench gpu): decoding is the bottleneck, every core but two decodes
        return max(2, min(GPU_MAX_WORKERS, cpu_count() - 2))
    # measured (bench extract --compare): with ONNX Runtime, decoding in-process costs the least
    # CPU per image (decode is ~2 ms of ~50); extra processes only contend with its threads
    return 0 if engine == "onnx" else min(2, cpu_count())


def _batches(samples, todo, run, prep, batch_size, workers, info, on_gpu):
    """(indices into ``todo``, uint8 batch, failures) from CPU decoding workers or from nvJPEG."""
    paths = [samples[i].path for i in todo]
    if workers is None:
        workers = default_workers(run.device.type, run.name, "gpu" if on_gpu else "cpu")
    info["workers"], info["decode"] = workers, "gpu" if on_gpu else "cpu"
    if on_gpu:  # workers: file-reading threads
        dec = gpu_decode.GpuDecoder(prep, run.device, paths)
        for items in gpu_decode.read_batches(paths, batch_size, workers):
            yield dec(items)
        info["decoded_on_gpu"], info["decoded_on_cpu"] = dec.on_gpu, dec.on_cpu
        return
    yield from DataLoader(ImageFiles(paths, prep), batch_size=batch_size, num_workers=workers, collate_fn=collate,
                          pin_memory=run.device.type == "cuda", worker_init_fn=_worker_init if workers else None,
                          persistent_workers=False, prefetch_factor=2 if workers else None)


def _compute(samples, todo, run, prep, cache, cached, info, batch_size, workers, progress, on_gpu=False,
             overlap=False) -> None:
    """Run the batches and write one atomic cache shard per batch. With ``overlap`` (on a GPU) the copy
    back and the shard of a batch happen in a writer thread while the next batch is decoded and run,
    at most ``OVERLAP_DEPTH`` batches behind; an interruption then loses those, never a half shard."""
    bar = tqdm(total=len(todo), desc=f"extract {info['backbone']}@{prep.size}", unit="img", disable=not progress)
    writer = ThreadPoolExecutor(1, thread_name_prefix="pneumoscan-cache") if overlap else None
    pending: deque = deque()
    info["overlap"] = bool(overlap)

    def store(keys, out):
        f = out if isinstance(out, np.ndarray) else out.cpu().numpy()  # float32 already (TorchEngine.forward)
        cache.add(keys, f)  # one atomic shard per batch
        return keys, f

    def done(keys, f) -> None:
        cached.update(zip(keys, f))
        info["computed"] += len(keys)

    try:
        for idx, xs, bad in _batches(samples, todo, run, prep, batch_size, workers, info, on_gpu):
            for j, err in bad:
                info["failed"].append((samples[todo[j]].path, err))
                log.warning("skipped %s", err)
            if len(idx):
                keys = [samples[todo[int(j)]].sha1 for j in idx]
                if writer is None:
                    done(*store(keys, run.encode(xs, prep)))
                else:
                    pending.append(writer.submit(store, keys, run.encode_async(xs, prep)))
                    while len(pending) > OVERLAP_DEPTH:
                        done(*pending.popleft().result())
            bar.update(len(idx) + len(bad))
        while pending:
            done(*pending.popleft().result())
    finally:
        if writer is not None:
            writer.shutdown(wait=True)  # shards already handed over are finished, never left half written
        bar.close()
