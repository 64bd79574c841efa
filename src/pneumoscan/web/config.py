"""Settings of the web service (kept free of heavy imports: the CLI reads the defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the service; each has a CLI option in ``pneumoscan serve``."""

    FLAGS: ClassVar[dict[str, str]] = {"deadline_s": "--deadline", "ort_threads": "--threads",
                                       "access_log": "--no-access-log", "model_dir": "--model",
                                       "header_timeout_s": "--header-timeout", "body_timeout_s": "--body-timeout"}

    model_dir: str | None = None  # model directory; None = the shipped default (or $PNEUMOSCAN_MODEL)
    host: str = "127.0.0.1"  # address to bind: this machine only; 0.0.0.0 exposes the service to the network
    port: int = 8000  # port to bind
    backend: Literal["onnx", "torch"] = "onnx"  # onnx: ONNX Runtime (exported on the fly if needed); torch: eager
    max_upload_mb: float = 20.0  # request bodies above this many MiB get 413 (counted as received)
    max_pixels: int = 25_000_000  # decoded-image pixel limit (5000 x 5000), checked before decoding
    precision: Literal["auto", "fp32", "int8"] = "auto"  # auto: the INT8 export if it passed its gate and the CPU has VNNI
    workers: int = 2  # threads decoding and checking uploads (the runners then take them in batches)
    runners: int = 2  # threads running the model on batches, each with --threads intra-op threads
    queue: int = 6  # requests allowed to wait beyond the workers' (batches included); past that: 503 + Retry-After
    queue_wait_ms: float = 50.0  # how long a request that finds the queue full is held for a free slot before its 503
    max_batch: int = 16  # predictions run as one batch at most (dynamic batching)
    max_wait_ms: float = 4.0  # how long a batch waits for uploads still being decoded before it runs
    explain_workers: int = 1  # explanation threads, apart from the prediction workers (never starve predictions)
    explain_queue: int = 2  # explanations allowed to wait; past that: 503 + Retry-After at once
    deadline_s: float = 10.0  # seconds before a request (queue wait included) gets 503
    ort_threads: int | None = None  # intra-op threads per runner (none: the cores this process may use / --runners)
    warmup: int = 3  # warm-up inferences before /readyz turns 200
    access_log: bool = True  # log every request
    allowed_hosts: tuple[str, ...] | None = None  # Host header values served (DNS-rebinding guard), e.g.
    # xray.example.org,*.example.org; none: derived from --host (127.0.0.1: localhost names; 0.0.0.0: any)
    header_timeout_s: float = 10.0  # seconds a client may take to send a request's headers (slowloris guard)
    body_timeout_s: float = 60.0  # seconds a client may take to send a whole request body (20 MiB at 3 Mbit/s)
    max_connections: int = 128  # open connections at most; past that: 503 + Retry-After, then the connection closes
    max_inflight_mb: float = 100.0  # MiB of request bodies held at once (all requests); past that: 503 + Retry-After

    def __post_init__(self) -> None:
        from ..errors import PneumoscanError

        if self.queue < 0 or self.deadline_s <= 0 or self.max_upload_mb <= 0:
            raise PneumoscanError("--queue must be >= 0, --deadline and --max-upload-mb > 0")
        if self.workers < 1 or (self.ort_threads is not None and self.ort_threads < 1) or self.max_pixels < 1 \
                or self.warmup < 0:
            raise PneumoscanError("--workers, --threads and --max-pixels must be at least 1")
        if self.runners < 1:
            raise PneumoscanError(f"--runners {self.runners} must be at least 1 (default 2)")
        if self.max_batch < 1 or not 0 <= self.max_wait_ms <= 1000:
            raise PneumoscanError(f"--max-batch ({self.max_batch}) must be at least 1 and --max-wait-ms "
                                  f"({self.max_wait_ms:g}) lie in 0..1000 (default 16 and 4)")
        if not 0 <= self.queue_wait_ms <= 1000 * self.deadline_s:
            raise PneumoscanError(f"--queue-wait-ms {self.queue_wait_ms:g} must lie in 0..{1000 * self.deadline_s:g} "
                                  "(the deadline; default 50)")
        if self.explain_workers < 1 or self.explain_queue < 0:
            raise PneumoscanError("--explain-workers must be at least 1 and --explain-queue >= 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise PneumoscanError("--header-timeout and --body-timeout must be > 0 seconds")
        if self.max_connections < 1 or self.max_inflight_mb < self.max_upload_mb:
            raise PneumoscanError(f"--max-connections must be at least 1 and --max-inflight-mb ({self.max_inflight_mb:g}) "
                                  f"at least --max-upload-mb ({self.max_upload_mb:g})")
        for h in self.allowed_hosts or ():
            if not h or "*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*.")):
                raise PneumoscanError(f"--allowed-hosts entry {h!r} is not a host name, an address, '*' or '*.domain'")
        if not 0 < self.port < 65536:
            raise PneumoscanError(f"--port {self.port} must lie in 1..65535")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 2**20)

    def trusted_hosts(self) -> list[str]:
        """Host header values to serve: ``allowed_hosts``, else what ``host`` implies.

        A loopback bind answers only to loopback names, so a page on another site cannot reach
        it through DNS rebinding; a wildcard bind (0.0.0.0, ::) cannot know its names and
        serves any (set --allowed-hosts there); a named host or address serves that name.
        """
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        loopback = ["127.0.0.1", "localhost", "::1"]
        if self.host in ("0.0.0.0", "::", ""):
            return ["*"]
        if self.host in loopback or self.host.startswith("127."):
            return list(dict.fromkeys([self.host, *loopback]))
        return [self.host]
