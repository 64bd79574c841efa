"""FastAPI app: one page, a prediction API on ONNX Runtime, an explanation overlay, health probes.

Hardening lives here rather than in a proxy so that ``pneumoscan serve`` is safe on its own:

- request bodies are counted as they arrive (:class:`BodyLimitMiddleware`): over the limit is a
  413 before the body is held in memory, whatever ``Content-Length`` says or if it is absent;
- images are sniffed, allow-listed and pixel-counted before decoding (:mod:`pneumoscan.data.imaging`);
- inference runs on a fixed pool of threads with a bounded queue (:class:`Limiter`): past the
  queue a request is refused at once with 503 + ``Retry-After``; past its deadline it gets 503;
- client file names are only ever shown (sanitised), never used as paths; nothing is fetched
  from a URL; weights load only after their SHA-256 matches ``config.json``.
"""
from __future__ import annotations

import asyncio
import html
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import INTENDED_USE, LABELS, __version__
from ..errors import ImageTooLargeError, PneumoscanError, UnsupportedFormatError
from ..predict import ALLOWED_FORMATS
from .config import ServeConfig
from .limits import PAGE_CSP, BodyLimitMiddleware, BusyError, DeadlineError, SecurityHeadersMiddleware, safe_name
from .service import Service, explain_available

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


def _error(status: int, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


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
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes, limiter=service.limiter)
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


__all__ = ["ServeConfig", "Service", "create_app"]
