"""The feature cache: a folder of safetensors shards per (backbone weights, preprocessing).

Features are keyed by the SHA-1 of each image's content, so a renamed or moved file is still a
hit and a changed one is recomputed. Each batch becomes one shard written atomically: an
interrupted run loses at most one batch and resumes from there.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write_bytes
from ..preprocess import PreprocessConfig

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$PNEUMOSCAN_CACHE``, else ``~/.cache/pneumoscan/features``."""
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan" / "features"))


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

    LOCK_NAME = ".lock"

    def lock(self):
        """An inter-process lock on this cache folder (released when the holder exits, even by a crash)."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / self.LOCK_NAME))

    def summary(self) -> dict:
        """Shards, features and bytes on disk, and when it was last written."""
        shards = sorted(self.root.glob("part-*.safetensors"))
        size = sum(f.stat().st_size for f in self.root.iterdir() if f.is_file())
        return {"path": str(self.root), "shards": len(shards), "features": len(self.load()) if shards else 0,
                "mb": round(size / 2**20, 1), "modified": max((f.stat().st_mtime for f in shards), default=None),
                "onnx_exports": len(list(self.root.glob("backbone-*.onnx")))}


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[FeatureCache]:
    """Every feature cache folder under ``cache_dir`` (default: :func:`default_cache_dir`)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if not root.is_dir():
        return []
    return [FeatureCache(d) for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("part-*.safetensors"))
            or (d.is_dir() and any(d.glob("backbone-*.onnx")))]
