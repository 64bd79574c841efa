"""How features are extracted: settings that change speed, never results (torch-free).

GPU defaults come from ``pneumoscan bench gpu`` on one H200 with 16 cores (benchmarks/results/gpu.json,
20,480 JPEGs end to end): 14 CPU decoding workers fed it 8,158 images/s at batch 256 or 512, nvJPEG
on the device 4,465 (its Huffman stage runs on one CPU thread)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import PneumoscanError

ENGINES = ("auto", "torch", "onnx")
DECODERS = ("cpu", "gpu")
CPU_BATCH = 64  # images per batch on a CPU (ONNX Runtime runs it in chunks of 16)
GPU_BATCH = 256  # images per batch on a GPU (256 and 512 tie on an H200)
GPU_MAX_WORKERS = 14  # decoding workers on a GPU machine: its cores less two, at most this many
GPU_READ_THREADS = 8  # with --decode gpu: file-reading threads (at most this many, at least 2)
OVERLAP_DEPTH = 2  # on a GPU: batches whose copy back and cache shard may still be in flight
ONNX_MIN_IMAGES = 128  # "auto" exports only for at least this many images (export costs seconds)


@dataclass(frozen=True)
class ExtractConfig:
    """How features are computed; speed only: every engine and setting gives the same features (up to
    floating-point rounding: on a GPU, cuDNN's convolutions run in TF32 by default)."""

    cache: str | None = None  # feature cache folder (default ~/.cache/pneumoscan/features, or $PNEUMOSCAN_CACHE)
    batch_size: int | None = None  # images decoded and run per batch (default: 64 on a CPU, 256 on a GPU)
    workers: int | None = None  # decoding workers (default: in-process with ONNX Runtime, 2 with PyTorch on a CPU,
    #                             cores - 2, at most 14, on a GPU; with --decode gpu: file-reading threads)
    engine: Literal["auto", "torch", "onnx"] = "auto"  # auto: ONNX Runtime on a CPU for 128+ images, else PyTorch
    device: str = "auto"  # where the backbone runs: auto (the first CUDA device when there is one), cpu, cuda, cuda:N
    decode: Literal["cpu", "gpu"] = "cpu"  # JPEG decoding: CPU worker processes, or nvJPEG on the CUDA device

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise PneumoscanError(f"batch size {self.batch_size} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise PneumoscanError(f"workers {self.workers} must be 0 or more")
        if self.engine not in ENGINES:
            raise PneumoscanError(f"engine {self.engine!r} is unknown; use one of {', '.join(ENGINES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise PneumoscanError(f"device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N")
        if self.decode not in DECODERS:
            raise PneumoscanError(f"decode {self.decode!r} is unknown; use one of {', '.join(DECODERS)}")
