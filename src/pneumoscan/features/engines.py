"""Inference engines for feature extraction: eager PyTorch, or the backbone exported to ONNX Runtime.

On a CPU the frozen backbone runs in ONNX Runtime (exported once into the cache folder with
static padding, checked against PyTorch to 1e-4), which takes half to a third of eager PyTorch's
CPU time for EfficientNet-Lite (``pneumoscan bench extract``); on a GPU it runs in PyTorch.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import PneumoscanError
from ..io import atomic_path
from ..nets.graph import export_fast
from ..preprocess import Preprocess, PreprocessConfig, normalize_batch
from ..runtime import cpu_count, ort_session
from .config import ENGINES, ONNX_MIN_IMAGES

log = logging.getLogger(__name__)



CPU_CHUNK = 16  # images per forward call on a CPU: same speed as 64, a quarter of the activation memory


class TorchEngine:
    """Eager PyTorch, channels_last, under ``inference_mode`` (GPU: pinned memory, async copies)."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.forward(x).cpu().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 features of a normalised batch, left where they were computed (on a GPU, possibly
        still being computed: whoever copies them back waits for them)."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            parts = x.split(self.chunk) if self.chunk else (x,)
            return torch.cat([self.net(p).float() for p in parts])

    def encode(self, batch_u8: torch.Tensor, prep: PreprocessConfig) -> np.ndarray:
        """Features of a uint8 (N, S, S) batch: on a GPU the uint8 batch travels (4x fewer bytes,
        pinned, async) and is normalised there."""
        return self.encode_async(batch_u8, prep).cpu().numpy()

    def encode_async(self, batch_u8: torch.Tensor, prep: PreprocessConfig) -> torch.Tensor:
        """As :meth:`encode`, without waiting: the features stay on the device (a writer thread copies
        them back while this thread queues the next batch)."""
        return self.forward(normalize_batch(batch_u8.to(self.device, non_blocking=True), prep))


class OnnxEngine:
    """The backbone in ONNX Runtime (all graph optimisations, one intra-op thread per core)."""

    name = "onnx"
    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True) -> None:
        # spinning threads burn the cores between batches that a decoding worker needs
        self.session = ort_session(path, threads=threads or cpu_count(), spinning=spinning)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        a = x.numpy()
        return np.concatenate([self.session.run(None, {self.input: a[i:i + CPU_CHUNK]})[0]
                               for i in range(0, len(a), CPU_CHUNK)])

    def encode(self, batch_u8: torch.Tensor, prep: PreprocessConfig) -> np.ndarray:
        """Features of a uint8 (N, S, S) batch, normalised with NumPy one chunk at a time: torch's
        normalisation of a 64-image batch took 107 ms beside ONNX Runtime (its OpenMP threads and
        ONNX Runtime's fought for the two cores), NumPy's on the calling thread 12 ms."""
        a, pre = batch_u8.numpy(), Preprocess(prep)
        return np.concatenate([self.session.run(None, {self.input: pre.normalize_np(a[i:i + CPU_CHUNK])})[0]
                               for i in range(0, len(a), CPU_CHUNK)])

    encode_async = encode  # ONNX Runtime returns finished arrays


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
    path = Path(folder) / f"backbone-{net_digest(net)[:16]}-s{size}-{GRAPH_VERSION}.onnx"
    if path.is_file():
        return path
    net = net.cpu().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:
        tmp.write_bytes(export_fast(net, size, "input", "features"))
        with torch.inference_mode():
            ref = net(x).float().numpy()
        got = ort_session(tmp).run(None, {"input": x.numpy()})[0]
        err = float(np.abs(got - ref).max())
        if not err <= atol:
            raise PneumoscanError(f"ONNX export of the backbone differs from PyTorch by {err:.2e} (> {atol}); "
                                  "use --engine torch (or PNEUMOSCAN_ENGINE=torch)")
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
