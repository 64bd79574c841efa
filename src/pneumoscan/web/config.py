"""Settings of the web service (kept free of heavy imports: the CLI reads the defaults)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the service; each has a CLI option in ``pneumoscan serve``."""

    model_dir: str | None = None  # model directory; None = the shipped default (or $PNEUMOSCAN_MODEL)
    backend: str = "onnx"  # "onnx" (ONNX Runtime, exported on the fly if needed) or "torch" (eager)
    max_upload_bytes: int = 20 * 1024 * 1024  # request bodies above this get 413 (counted as received)
    max_pixels: int = 25_000_000  # decoded-image pixel limit (5000 x 5000), checked before decoding
    workers: int = 2  # inference threads: requests decoded and run at the same time
    queue: int = 16  # requests allowed to wait for a worker; past that: 503 + Retry-After at once
    deadline_s: float = 10.0  # a request not finished in this time (queue wait included) gets 503
    ort_threads: int = 1  # ONNX Runtime intra-op threads per inference (workers x threads ~ cores)
    warmup: int = 3  # warm-up inferences before /readyz turns 200
