"""Frozen-backbone feature extraction with an on-disk cache.

Features (the globally average-pooled bottleneck, the study's "bottleneck features" after its
GAP layer, which has no parameters) are cached by (backbone weights, preprocessing, file
content). The cache is a folder of shards, each a safetensors file written atomically for one
batch of images: a second run is a cache hit, a changed or added file is recomputed, and an
interrupted run resumes from the last complete shard.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import create_backbone, default_preprocess
from .errors import ImageError, PneumoscanError
from .imaging import load_xray
from .modeling import atomic_write_bytes
from .preprocess import Preprocess, PreprocessConfig, normalize_batch

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan" / "features"))


class ImageFiles(Dataset):
    """Decodes and resizes images to uint8 ``size x size``; failures come back as ``None``."""

    def __init__(self, paths: Sequence[str], prep: PreprocessConfig) -> None:
        self.paths = list(paths)
        self.prep = prep
        self._pp: Preprocess | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self._pp is None:
            self._pp = Preprocess(self.prep)
        try:
            x = load_xray(self.paths[i], size_hint=self.prep.size)
            return i, torch.from_numpy(self._pp.resize(x.pixels)), ""
        except ImageError as e:
            return i, None, str(e)


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    xs = torch.stack([x for _, x in ok]) if ok else torch.empty(0)
    return idx, xs, bad


@dataclass
class FeatureCache:
    """A folder of feature shards for one (backbone weights, preprocessing) pair."""

    root: Path

    @classmethod
    def for_key(cls, cache_dir: str | os.PathLike, backbone: str, weights_id: str, prep: PreprocessConfig) -> "FeatureCache":
        key = hashlib.sha1(f"{backbone}|{weights_id}|{prep.key()}".encode()).hexdigest()[:16]
        return cls(Path(cache_dir) / f"{backbone}-{key}")

    def load(self) -> dict[str, np.ndarray]:
        """All cached features, keyed by file SHA-1. Unreadable shards are ignored (recomputed)."""
        from safetensors.numpy import load_file

        out: dict[str, np.ndarray] = {}
        if not self.root.is_dir():
            return out
        for shard in sorted(self.root.glob("part-*.safetensors")):
            try:
                t = load_file(str(shard))
            except Exception:
                log.warning("ignoring unreadable cache shard %s", shard)
                continue
            keys = [bytes(row).hex() for row in t["sha1"]]
            out.update(zip(keys, t["features"]))
        return out

    def add(self, sha1s: Sequence[str], feats: np.ndarray) -> None:
        from safetensors.numpy import save

        sha = np.frombuffer(b"".join(bytes.fromhex(s) for s in sha1s), dtype=np.uint8).reshape(len(sha1s), 20)
        data = save({"sha1": sha, "features": np.ascontiguousarray(feats, dtype=np.float32)})
        name = f"part-{time.time_ns():020d}-{hashlib.sha1(sha.tobytes()).hexdigest()[:8]}.safetensors"
        atomic_write_bytes(self.root / name, data)


def extract_features(
    samples: Sequence,  # objects with .path and .sha1 (manifest samples)
    backbone: str = "efficientnet_lite0",
    *,
    size: int | None = None,
    intensity: str = "none",
    weights: str | None = None,
    pretrained: bool = True,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    net: torch.nn.Module | None = None,
    weights_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features for ``samples`` (cached). Returns (features [n, d], ok mask [n], info).

    Images that fail to decode are listed in ``info["failed"]`` and masked out, never silently.
    """
    prep = default_preprocess(backbone, size, intensity)
    if net is None:
        net, weights_id = create_backbone(backbone, pretrained=pretrained, weights=weights)
    cache = FeatureCache.for_key(cache_dir or default_cache_dir(), backbone, weights_id or "custom", prep)
    cached = cache.load()
    todo = [i for i, s in enumerate(samples) if s.sha1 not in cached]
    # One computation per distinct content: duplicates in the data share a row.
    seen: dict[str, int] = {}
    todo = [i for i in todo if seen.setdefault(samples[i].sha1, i) == i]
    info = {"backbone": backbone, "weights_id": weights_id, "preprocess": prep.to_dict(), "cache": str(cache.root),
            "cached": len(samples) - len(todo), "computed": 0, "failed": []}
    if todo:
        _compute(samples, todo, net, prep, cache, cached, info, batch_size, workers, device, progress)
    dim = next(iter(cached.values())).shape[0] if cached else 0
    feats = np.zeros((len(samples), dim), np.float32)
    ok = np.zeros(len(samples), bool)
    for i, s in enumerate(samples):
        f = cached.get(s.sha1)
        if f is not None:
            feats[i], ok[i] = f, True
    return feats, ok, info


def _compute(samples, todo, net, prep, cache, cached, info, batch_size, workers, device, progress) -> None:
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    net = net.to(device).eval().to(memory_format=torch.channels_last)
    ds = ImageFiles([samples[i].path for i in todo], prep)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    bar = tqdm(total=len(todo), desc=f"extract {info['backbone']}@{prep.size}", unit="img", disable=not progress)
    with torch.inference_mode():
        for idx, xs, bad in loader:
            for j, err in bad:
                info["failed"].append((samples[todo[j]].path, err))
                log.warning("skipped %s", err)
            if len(idx):
                x = normalize_batch(xs, prep).to(device).contiguous(memory_format=torch.channels_last)
                f = net(x).float().cpu().numpy()
                keys = [samples[todo[int(j)]].sha1 for j in idx]
                cache.add(keys, f)  # one atomic shard per batch: an interruption loses one batch at most
                cached.update(zip(keys, f))
                info["computed"] += len(keys)
            bar.update(len(idx) + len(bad))
    bar.close()


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise PneumoscanError(f"batch size {batch_size} must be at least 1")
    return batch_size
