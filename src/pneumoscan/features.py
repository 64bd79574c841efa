"""Frozen-backbone feature extraction with an on-disk cache.

Features (the globally average-pooled bottleneck, the study's "bottleneck features" after its
GAP layer, which has no parameters) are cached by (backbone weights, preprocessing, file
content). The cache is a folder of shards, each a safetensors file written atomically for one
batch of images: a second run is a cache hit, a changed or added file is recomputed, and an
interrupted run resumes from the last complete shard.

Speed (measured by ``pneumoscan bench extract``): on a CPU the frozen backbone runs in ONNX
Runtime (exported once into the cache folder, checked against PyTorch to 1e-4), which takes
half to a third of eager PyTorch's CPU time for EfficientNet-Lite; decoding workers are single-threaded
so that they never fight the inference threads for the cores.
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
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import create_backbone, default_preprocess
from .errors import ImageError, PneumoscanError
from .imaging import load_xray
from .modeling import atomic_write_bytes
from .onnxgraph import export_fast
from .preprocess import Preprocess, PreprocessConfig, normalize_batch

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan" / "features"))


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
            x = load_xray(self.paths[i], size_hint=self.prep.size)  # JPEG draft: decode big files at 1/2-1/8 scale
            px = (self._pp.resize if self.intensity else self._pp.resize_only)(x.pixels)
            # px may be Pillow's read-only buffer when no resize was needed
            return i, torch.from_numpy(px if px.flags.writeable else px.copy()), ""
        except ImageError as e:
            return i, None, str(e)


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    xs = torch.stack([x for _, x in ok]) if ok else torch.empty(0)
    return idx, xs, bad


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _worker_init(_: int) -> None:
    """Decoding workers use one thread each: OpenCV's and torch's pools inside workers would fight
    the inference threads of the main process for the same cores (the old run spent most of
    its time in the kernel)."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


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


ENGINES = ("auto", "torch", "onnx")
ONNX_MIN_IMAGES = 128  # "auto" exports only for at least this many images (export costs seconds)


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
    engine: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features for ``samples`` (cached). Returns (features [n, d], ok mask [n], info).

    Images that fail to decode are listed in ``info["failed"]`` and masked out, never silently.
    ``engine`` is "torch", "onnx" (ONNX Runtime, CPU) or "auto" (default, or $PNEUMOSCAN_ENGINE):
    ONNX Runtime on a CPU when there are at least ``ONNX_MIN_IMAGES`` images to compute or the
    backbone was exported before, PyTorch otherwise. Both give the same features within 1e-4.
    ``workers=None`` picks the measured best: decode in-process with ONNX Runtime, else 2 workers.
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
            "cached": len(samples) - len(todo), "computed": 0, "failed": [], "engine": None}
    if todo:
        run = make_engine(net, prep, cache.root, device, engine, len(todo))
        info["engine"] = run.name
        _compute(samples, todo, run, prep, cache, cached, info, batch_size, workers, progress)
    dim = next(iter(cached.values())).shape[0] if cached else 0
    feats = np.zeros((len(samples), dim), np.float32)
    ok = np.zeros(len(samples), bool)
    for i, s in enumerate(samples):
        f = cached.get(s.sha1)
        if f is not None:
            feats[i], ok[i] = f, True
    return feats, ok, info


CPU_CHUNK = 16  # images per forward call on a CPU: same speed as 64, a quarter of the activation memory


class TorchEngine:
    """Eager PyTorch, channels_last, under ``inference_mode`` (GPU: pinned memory, async copies)."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            parts = x.split(self.chunk) if self.chunk else (x,)
            return torch.cat([self.net(p).float() for p in parts]).cpu().numpy()


class OnnxEngine:
    """The backbone in ONNX Runtime (all graph optimisations, one intra-op thread per core)."""

    name = "onnx"
    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or cpu_count()
        # spinning threads burn the cores between batches that a decoding worker needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        a = x.numpy()
        return np.concatenate([self.session.run(None, {self.input: a[i:i + CPU_CHUNK]})[0]
                               for i in range(0, len(a), CPU_CHUNK)])


def net_digest(net: torch.nn.Module) -> str:
    """SHA-1 of every parameter and buffer (names, shapes, bytes): identifies an exported copy."""
    h = hashlib.sha1()
    for k, v in net.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


GRAPH_VERSION = "g2"  # in the export's file name: g2 = static padding folded into the convs (onnxgraph)


def export_backbone_onnx(net: torch.nn.Module, size: int, folder: Path, atol: float = 1e-4) -> Path:
    """Export ``net`` (dynamic batch) to ``folder/backbone-<digest>.onnx`` once; reuses the file after.

    The export is checked against PyTorch on two random images before it is kept; a mismatch
    above ``atol`` raises :class:`PneumoscanError` and keeps nothing.
    """
    import onnxruntime as ort

    path = Path(folder) / f"backbone-{net_digest(net)[:16]}-s{size}-{GRAPH_VERSION}.onnx"
    if path.is_file():
        return path
    net = net.cpu().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(export_fast(net, size, "input", "features"))
        with torch.inference_mode():
            ref = net(x).float().numpy()
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        err = float(np.abs(got - ref).max())
        if not err <= atol:
            raise PneumoscanError(f"ONNX export of the backbone differs from PyTorch by {err:.2e} (> {atol}); "
                                  "set PNEUMOSCAN_ENGINE=torch")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("exported the backbone for ONNX Runtime to %s", path)
    return path


def make_engine(net: torch.nn.Module, prep: PreprocessConfig, folder: Path, device: str = "cpu",
                engine: str | None = None, n_images: int = 0):
    """The inference engine for extraction (see :func:`extract_features` for the rule)."""
    engine = engine or os.environ.get("PNEUMOSCAN_ENGINE", "auto")
    if engine not in ENGINES:
        raise PneumoscanError(f"engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if engine == "torch" or str(device) != "cpu":
        return TorchEngine(net, device)
    if engine == "auto" and n_images < ONNX_MIN_IMAGES and not any(Path(folder).glob("backbone-*.onnx")):
        return TorchEngine(net, device)
    try:
        return OnnxEngine(export_backbone_onnx(net, prep.size, Path(folder)))
    except Exception as e:
        if engine == "onnx":
            raise PneumoscanError(f"ONNX Runtime cannot run this backbone ({e}); set PNEUMOSCAN_ENGINE=torch") from None
        log.warning("ONNX Runtime unavailable for this backbone (%s); extracting with PyTorch", e)
        return TorchEngine(net, device)


def _compute(samples, todo, run, prep, cache, cached, info, batch_size, workers, progress) -> None:
    if workers is None:
        # measured (bench extract --compare): with ONNX Runtime, decoding in-process costs the least
        # CPU per image (decode is ~2 ms of ~50); extra processes only contend with its threads
        workers = 0 if run.name == "onnx" else min(2, cpu_count())
    info["workers"] = workers
    pin = run.device.type == "cuda"
    ds = ImageFiles([samples[i].path for i in todo], prep)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=pin,
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    bar = tqdm(total=len(todo), desc=f"extract {info['backbone']}@{prep.size}", unit="img", disable=not progress)
    for idx, xs, bad in loader:
        for j, err in bad:
            info["failed"].append((samples[todo[j]].path, err))
            log.warning("skipped %s", err)
        if len(idx):
            # on a GPU the uint8 batch travels (4x fewer bytes, pinned, async) and is normalised there
            f = run(normalize_batch(xs.to(run.device, non_blocking=True), prep))
            keys = [samples[todo[int(j)]].sha1 for j in idx]
            cache.add(keys, f)  # one atomic shard per batch: an interruption loses one batch at most
            cached.update(zip(keys, f))
            info["computed"] += len(keys)
        bar.update(len(idx) + len(bad))
    bar.close()
