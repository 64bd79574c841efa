"""FastAPI app: one page, a prediction API on ONNX Runtime, an explanation overlay, health probes.

Hardening lives here rather than in a proxy so that ``pneumoscan serve`` is safe on its own:

- request bodies are counted as they arrive (:class:`BodyLimitMiddleware`): over the limit is a
  413 before the body is held in memory, whatever ``Content-Length`` says or if it is absent;
- images are sniffed, allow-listed and pixel-counted before decoding (:mod:`pneumoscan.imaging`);
- inference runs on a fixed pool of threads with a bounded queue (:class:`Limiter`): past the
  queue a request is refused at once with 503 + ``Retry-After``; past its deadline it gets 503;
- client file names are only ever shown (sanitised), never used as paths; nothing is fetched
  from a URL; weights load only after their SHA-256 matches ``config.json``.
"""
from __future__ import annotations

import asyncio
import html
import io
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import INTENDED_USE, LABELS, __version__
from ..errors import ImageTooLargeError, PneumoscanError, UnsupportedFormatError
from ..imaging import ALLOWED_FORMATS, load_xray
from ..modeldir import WEIGHTS_NAME, read_config, resolve_model_dir, verify_file
from .config import ServeConfig

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
API_PATHS = ("/api/predict", "/api/explain")  # the POST endpoints that take an upload


class BusyError(Exception):
    """The queue is full: the request is refused without waiting."""


class DeadlineError(Exception):
    """The request did not finish within its deadline."""


class Limiter:
    """A fixed pool of worker threads with a bounded number of pending jobs.

    ``submit`` is thread-safe and never blocks: it raises :class:`BusyError` when
    ``workers + queue`` jobs are already pending. A job whose deadline passed while it waited
    is dropped without running.
    """

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise PneumoscanError(f"workers ({workers}) must be >= 1 and queue ({queue}) >= 0")
        self.workers = workers
        self.capacity = workers + queue
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pneumoscan-infer")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def full(self) -> bool:
        return self._pending >= self.capacity

    def submit(self, fn: Callable[..., Any], *args: Any, deadline: float = math.inf) -> Future:
        """Run ``fn(*args)`` on a worker; ``deadline`` is a ``time.monotonic()`` value."""
        with self._lock:
            if self._pending >= self.capacity:
                raise BusyError(f"{self._pending} requests are already in progress or queued")
            self._pending += 1

        def job() -> Any:
            if time.monotonic() > deadline:
                raise DeadlineError("deadline passed while queued")
            return fn(*args)

        try:
            fut = self._pool.submit(job)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _f: self._release())  # also runs when cancelled before start
        return fut

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def safe_name(name: str | None) -> str:
    """A client file name made safe to show in messages (never used as a path)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._ ()+-]", "_", base).strip(" .")[:80]
    return base or "upload"


def check_model_dir(model_dir: str | None) -> Path:
    """Fail fast (ModelError) on a missing model or weights whose SHA-256 does not match."""
    d = resolve_model_dir(model_dir)
    cfg = read_config(d)
    verify_file(d, WEIGHTS_NAME, cfg)
    onnx_name = cfg.get("onnx", {}).get("file")
    if onnx_name and (d / onnx_name).exists():
        verify_file(d, onnx_name, cfg)
    return d


class Service:
    """The model behind the app: loaded (and exported if needed) once, then shared by the workers."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model_dir)
        self.limiter = Limiter(cfg.workers, cfg.queue)
        self.predictor = None
        self.ready = threading.Event()
        self.error: str | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._explainer = None
        self._explain_lock = threading.Lock()

    def load(self) -> None:
        """Load, export if needed, and warm; errors are kept in ``self.error`` and logged."""
        from ..predict import Predictor

        try:
            t0 = time.perf_counter()
            model_dir = self._onnx_dir() if self.cfg.backend == "onnx" else self.model_dir
            self.predictor = Predictor(model_dir, backend=self.cfg.backend, max_pixels=self.cfg.max_pixels,
                                       threads=self.cfg.ort_threads)
            if self.cfg.backend == "torch":
                import torch
                torch.set_num_threads(max(1, self.cfg.ort_threads))
            self._warm()
            self.ready.set()
            log.info("model %s ready (%s backend) in %.1f s", self.predictor.model_id, self.cfg.backend,
                     time.perf_counter() - t0)
        except PneumoscanError as e:
            self.error = str(e)
            log.error("model failed to load: %s", e)
        except Exception as e:  # keep the server answering /readyz with the reason
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model failed to load")

    def _onnx_dir(self) -> Path:
        """The model dir if it has a verified ONNX export; otherwise a temp copy exported now."""
        from ..modeldir import has_onnx

        if has_onnx(self.model_dir):
            return self.model_dir
        from ..export import export_onnx  # imports torch: only when an export must be made
        log.warning("%s has no ONNX export; exporting into a temporary folder (run 'pneumoscan export "
                    "--model %s' once to skip this)", self.model_dir, self.model_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="pneumoscan-serve-")
        tmp = Path(self._tmp.name)
        for f in self.model_dir.iterdir():
            if f.is_file() and f.name in ("config.json", WEIGHTS_NAME, "MODEL_CARD.md"):
                shutil.copy2(f, tmp / f.name)
        export_onnx(tmp)
        return tmp

    def _warm(self) -> None:
        """First-call allocations of ONNX Runtime, Pillow and OpenCV happen here, not on a user."""
        import numpy as np
        from PIL import Image

        self.predictor.warmup(self.cfg.warmup)
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32), 128, np.uint8)).save(buf, "JPEG")  # small: under any pixel limit
        self.predictor.predict_bytes(buf.getvalue(), "warmup")

    def predict(self, data: bytes, name: str) -> dict:
        t0 = time.perf_counter()
        p = self.predictor.predict_bytes(data, name)
        return {"label": p.label, "probabilities": p.probabilities, "pneumonia": p.pneumonia,
                "pneumonia_probability": p.pneumonia_probability, "threshold": p.threshold,
                "model": self.predictor.model_id, "warnings": p.warnings,
                "compute_ms": (time.perf_counter() - t0) * 1e3}

    def explain(self, data: bytes, name: str) -> bytes:
        """Grad-CAM overlay PNG from the PyTorch model (loaded once, on first use)."""
        from ..explain import explain_overlay_png
        from ..predict import Predictor

        xray = load_xray(data, name=name, max_pixels=self.cfg.max_pixels)
        with self._explain_lock:  # one explanation at a time: hooks and gradients on a shared net
            if self._explainer is None:
                self._explainer = Predictor(self.model_dir, backend="torch", max_pixels=self.cfg.max_pixels)
            return explain_overlay_png(self._explainer, xray, method="gradcam")

    def close(self) -> None:
        self.limiter.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()


def explain_available() -> bool:
    """Whether ``pneumoscan.explain.explain_overlay_png`` exists in this installation."""
    try:
        from .. import explain
    except ImportError:
        return False
    return callable(getattr(explain, "explain_overlay_png", None))


def _error(status: int, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _send_json(send: Callable, status: int, detail: str, extra_headers: list | None = None) -> None:
    body = JSONResponse({"detail": detail}).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """ASGI middleware: 413 once a body passes ``max_bytes`` (counted), 503 when the queue is full.

    A declared ``Content-Length`` over the limit is refused before anything is received. The
    bytes actually received are counted too, so a lying or absent length is caught as soon as
    the limit is crossed; whatever the app was doing with the partial body is discarded.
    """

    def __init__(self, app, max_bytes: int, service: Service | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit_msg = f"upload larger than the limit of {self.max_bytes / 2**20:g} MiB; send a smaller image"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if n > self.max_bytes:
                await _send_json(send, 413, limit_msg)
                return
        if self.service is not None and scope["path"] in API_PATHS and self.service.limiter.full():
            await _send_json(send, 503, "server busy: too many requests queued; retry shortly",
                             [(b"retry-after", b"1")])
            return
        received = 0
        too_large = False
        started = False

        async def counting_receive():
            nonlocal received, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge()
            return msg

        async def guarded_send(msg):
            nonlocal started
            if too_large:  # the app's reaction to the cut-off body (e.g. a 400) is replaced by the 413
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _send_json(send, 413, limit_msg)


class SecurityHeadersMiddleware:
    """Headers that keep browsers from sniffing types or framing the page."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *self.HEADERS]}
            await send(msg)

        await self.app(scope, receive, add_headers)


PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _status_for(e: Exception) -> int:
    if isinstance(e, ImageTooLargeError):
        return 413
    if isinstance(e, UnsupportedFormatError):
        return 415
    return 400


def create_app(cfg: ServeConfig = ServeConfig(), service: Service | None = None) -> FastAPI:
    """The ASGI app. The model loads in the background from the lifespan; /readyz says when."""
    service = service or Service(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(None, service.load)
        try:
            yield
        finally:
            service.close()
            if not loading.done():
                log.info("shutting down while the model was still loading")

    app = FastAPI(title="pneumoscan", version=__version__, lifespan=lifespan,
                  description=f"**{INTENDED_USE}**\n\nPediatric chest X-ray classifier (normal / bacterial / "
                              "viral pneumonia). Upload a JPEG, PNG or DICOM file as the multipart field `file`.")
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes, service=service)
    app.add_middleware(SecurityHeadersMiddleware)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{INTENDED_USE}}", html.escape(INTENDED_USE))

    def not_ready() -> JSONResponse:
        if service.error:
            return _error(503, f"model failed to load: {service.error}")
        return _error(503, "model is loading; retry shortly", retry_after=2)

    async def run(fn: Callable, data: bytes, name: str):
        """Run ``fn(data, name)`` on the worker pool within the deadline; a Response on refusal."""
        deadline = time.monotonic() + cfg.deadline_s
        try:
            fut = asyncio.wrap_future(service.limiter.submit(fn, data, name, deadline=deadline))
        except BusyError:
            return _error(503, "server busy: too many requests queued; retry shortly", retry_after=1)
        try:
            return await asyncio.wait_for(fut, timeout=max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineError):
            return _error(503, f"request took longer than the {cfg.deadline_s:g} s deadline; retry",
                          retry_after=1)
        except PneumoscanError as e:  # ImageError and its kinds: the upload's fault, never a 500
            return _error(_status_for(e), str(e))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/healthz", summary="Process is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and warmed (503 until then)")
    async def readyz():
        if not service.ready.is_set():
            return not_ready()
        return {"status": "ready", "model": service.predictor.model_id}

    @app.get("/api/info", summary="Model, threshold, labels and limits")
    async def info() -> dict:
        p = service.predictor if service.ready.is_set() else None
        return {"intended_use": INTENDED_USE, "ready": p is not None, "model": p.model_id if p else None,
                "backend": cfg.backend, "threshold": p.threshold if p else None, "labels": list(LABELS),
                "formats": list(ALLOWED_FORMATS), "max_upload_bytes": cfg.max_upload_bytes,
                "max_pixels": cfg.max_pixels, "explain": explain_available()}

    @app.post("/api/predict", summary="Classify one X-ray (multipart field `file`: JPEG, PNG or DICOM)")
    async def predict(file: UploadFile = File(..., description="the X-ray image")):
        t0 = time.perf_counter()
        if not service.ready.is_set():
            return not_ready()
        data = await file.read()
        result = await run(service.predict, data, safe_name(file.filename))
        if isinstance(result, Response):
            return result
        result["elapsed_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        result["compute_ms"] = round(result["compute_ms"], 2)
        return result

    @app.post("/api/explain", summary="Explanation overlay (Grad-CAM) as PNG",
              responses={200: {"content": {"image/png": {}}}, 501: {"description": "explanations not installed"}})
    async def explain(file: UploadFile = File(..., description="the X-ray image")):
        if not explain_available():
            return _error(501, "explanations are not available in this installation (pneumoscan.explain "
                               "has no explain_overlay_png)")
        if not service.ready.is_set():
            return not_ready()
        data = await file.read()
        result = await run(service.explain, data, safe_name(file.filename))
        if isinstance(result, Response):
            return result
        return Response(result, media_type="image/png", headers={"Cache-Control": "no-store"})

    return app


__all__ = ["ServeConfig", "Service", "Limiter", "BodyLimitMiddleware", "create_app", "check_model_dir",
           "safe_name", "BusyError", "DeadlineError"]
