"""Settings of the web service (kept free of heavy imports: the CLI reads the defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the service; each has a CLI option in ``pneumoscan serve``."""

    FLAGS: ClassVar[dict[str, str]] = {"deadline_s": "--deadline", "ort_threads": "--threads",
                                       "access_log": "--no-access-log", "model_dir": "--model"}

    model_dir: str | None = None  # model directory; None = the shipped default (or $PNEUMOSCAN_MODEL)
    host: str = "127.0.0.1"  # address to bind: this machine only; 0.0.0.0 exposes the service to the network
    port: int = 8000  # port to bind
    backend: Literal["onnx", "torch"] = "onnx"  # onnx: ONNX Runtime (exported on the fly if needed); torch: eager
    max_upload_mb: float = 20.0  # request bodies above this many MiB get 413 (counted as received)
    max_pixels: int = 25_000_000  # decoded-image pixel limit (5000 x 5000), checked before decoding
    workers: int = 2  # inference threads: requests decoded and run at the same time
    queue: int = 16  # requests allowed to wait for a worker; past that: 503 + Retry-After at once
    deadline_s: float = 10.0  # seconds before a request (queue wait included) gets 503
    ort_threads: int = 1  # ONNX Runtime intra-op threads per inference (workers x threads ~ cores)
    warmup: int = 3  # warm-up inferences before /readyz turns 200
    access_log: bool = True  # log every request

    def __post_init__(self) -> None:
        from ..errors import PneumoscanError

        if self.queue < 0 or self.deadline_s <= 0 or self.max_upload_mb <= 0:
            raise PneumoscanError("--queue must be >= 0, --deadline and --max-upload-mb > 0")
        if self.workers < 1 or self.ort_threads < 1 or self.max_pixels < 1 or self.warmup < 0:
            raise PneumoscanError("--workers, --threads and --max-pixels must be at least 1")
        if not 0 < self.port < 65536:
            raise PneumoscanError(f"--port {self.port} must lie in 1..65535")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)
