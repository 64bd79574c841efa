"""FastAPI app: one page, a prediction API on ONNX Runtime, an explanation overlay, health probes.

Hardening lives here rather than in a proxy so that ``pneumoscan serve`` is safe on its own:

- every error is RFC 9457 problem details (:mod:`.problems`), and an unexpected exception is a
  logged, generic 500 that shows no internals;
- request bodies are bounded in size, in bytes held across requests and in time
  (:class:`BodyLimitMiddleware`); the HTTP protocol bounds header time and connections
  (:mod:`.server`); only the Host names the bind implies are served (DNS rebinding);
- images are sniffed, allow-listed and pixel-counted before decoding, blank ones refused
  (:mod:`pneumoscan.data.imaging`);
- predictions run in dynamic batches (:class:`Batcher`), explanations on their own pool (:class:`Limiter`),
  both with bounded queues:
  past a queue a request is refused at once with 503 + ``Retry-After``; past its deadline, 503;
- client file names are only ever shown (sanitised), never used as paths; nothing is fetched
  from a URL; weights load only after their SHA-256 matches ``config.json``; /docs and /redoc
  are served from the package (no CDN).
"""
from __future__ import annotations

import asyncio
import html
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import INTENDED_USE, LABELS, __version__
from ..errors import ImageTooLargeError, OutOfScopeError, PneumoscanError, UnsupportedFormatError
from ..predict import ALLOWED_FORMATS, BlankImageError
from .batching import Batcher
from .config import ServeConfig
from .limits import (
    PAGE_CSP,
    BodyLimitMiddleware,
    BusyError,
    DeadlineError,
    InFlight,
    Limiter,
    SecurityHeadersMiddleware,
    TrustedHostsMiddleware,
    safe_name,
)
from .problems import document_problems, problem, responses
from .schema import Health, Info, Prediction, Ready
from .service import Service

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD_ERRORS = responses(400, 408, 413, 415, 422, 500, 503)


def _refusal(e: PneumoscanError, path: str):
    """The problem response for an error caused by the upload (never a 500)."""
    if isinstance(e, ImageTooLargeError):
        return problem(413, str(e), "image_too_large", path)
    if isinstance(e, UnsupportedFormatError):
        return problem(415, str(e), "unsupported_format", path)
    if isinstance(e, BlankImageError):
        return problem(422, str(e), "blank_image", path)
    if isinstance(e, OutOfScopeError):
        return problem(422, str(e), "out_of_scope", path)
    return problem(400, str(e), "bad_image", path)


def internal_error(path: str, exc: BaseException) -> Response:
    """A logged, generic 500: the traceback goes to the log under an id, the client sees only the id."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s", ref, path, exc_info=(type(exc), exc, exc.__traceback__))
    return problem(500, f"internal error (logged as {ref}); please report it", "internal", path)


class _Assets(StaticFiles):
    """The page's scripts, styles and icon; not the page's template (served filled in, with its CSP, at /)."""

    async def get_response(self, path: str, scope):
        if path == "index.html":
            raise StarletteHTTPException(404)
        return await super().get_response(path, scope)


def _say(msg: str) -> str:
    """A validation message in the user's terms (pydantic's speak of Python types)."""
    if "Expected UploadFile" in msg:  # a part named 'file' without a file name arrives as text
        return "the form field holds text, not a file: send the image as a file part (with a file name)"
    return msg


def _install_error_handlers(app: FastAPI) -> None:
    """Every error the framework raises, in the one schema."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = str(exc.detail)
        if detail == "Invalid multipart data.":  # python-multipart refuses e.g. a part header over 4 KiB
            detail = ("the upload is not valid multipart form data (or a part header is too long, e.g. a file name "
                      "of thousands of characters); send the image as the form field 'file'")
        r = problem(exc.status_code, detail, "http_error" if exc.status_code != 404 else "not_found", request.url.path)
        r.headers.update(exc.headers or {})
        return r

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": [str(x) if not isinstance(x, int) else x for x in e.get("loc", ())],
                   "msg": _say(e.get("msg", ""))} for e in exc.errors()]
        what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return problem(422, f"{what} (send the image as the multipart form field 'file')", "invalid_request",
                       request.url.path, errors=errors)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return internal_error(request.url.path, exc)


def _add_middleware(app: FastAPI, cfg: ServeConfig, service: Service) -> None:
    """Outermost last: the Host check, then security headers, then the body bounds."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes,
                       limiters={"/api/predict": service.limiter, "/api/explain": service.explain_limiter},
                       inflight=InFlight(cfg.max_inflight_bytes), body_timeout_s=cfg.body_timeout_s,
                       queue_wait_s=cfg.queue_wait_ms / 1e3)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(TrustedHostsMiddleware, allowed_hosts=cfg.trusted_hosts())


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

    app = FastAPIOffline(title="pneumoscan", version=__version__, lifespan=lifespan,
                         description=f"**{INTENDED_USE}**\n\nPediatric chest X-ray classifier (normal / bacterial / "
                                     "viral pneumonia). Upload one JPEG, PNG or DICOM file as the multipart field "
                                     "`file`. Every error is RFC 9457 problem details (`application/problem+json`).")
    app.state.service = service
    document_problems(app)
    _install_error_handlers(app)
    _add_middleware(app, cfg, service)
    app.mount("/static", _Assets(directory=STATIC), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{INTENDED_USE}}", html.escape(INTENDED_USE))

    def not_ready(path: str):
        if service.error:
            return problem(503, f"model failed to load: {service.error}", "model_failed", path)
        return problem(503, "model is loading; retry shortly", "loading", path, retry_after=2)

    async def run(limiter: Limiter | Batcher, path: str, fn: Callable, *args):
        """Run ``fn(*args)`` on ``limiter``'s pool within the deadline; a problem Response on refusal."""
        deadline = time.monotonic() + cfg.deadline_s
        hold_until = time.monotonic() + cfg.queue_wait_ms / 1e3
        while True:
            try:
                fut = asyncio.wrap_future(limiter.submit(fn, *args, deadline=deadline))
                break
            except BusyError:  # the slot the body middleware saw free was taken meanwhile: wait for the next
                if await limiter.room(hold_until - time.monotonic()):
                    continue
            return problem(503, f"server busy: too many {limiter.name} queued; retry shortly", "busy", path,
                           retry_after=1)
        try:
            return await asyncio.wait_for(fut, timeout=max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineError):
            return problem(503, f"request took longer than the {cfg.deadline_s:g} s deadline; retry", "deadline", path,
                           retry_after=1)
        except PneumoscanError as e:  # ImageError and its kinds: the upload's fault, never a 500
            return _refusal(e, path)
        except Exception as e:  # a bug: logged with its traceback, the client gets a generic 500
            return internal_error(path, e)

    async def one_file(request: Request, file: UploadFile):
        """The upload's bytes and shown name, or a 400 when the form holds more than one file."""
        form = await request.form()  # parsed (and cached) by FastAPI already
        if len(form.getlist("file")) != 1:
            return problem(400, f"send exactly one file as the form field 'file' (got {len(form.getlist('file'))})",
                           "one_file", request.url.path)
        return await file.read(), safe_name(file.filename)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/healthz", summary="Process is up", response_model=Health)
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", summary="Model loaded and warmed (503 until then)", response_model=Ready,
             responses=responses(503))
    async def readyz(request: Request):
        if not service.ready.is_set():
            return not_ready(request.url.path)
        return Ready(model=service.predictor.model_id)

    @app.get("/api/info", summary="Model, threshold, labels, limits and whether explanations are available",
             response_model=Info)
    async def info() -> Info:
        p = service.predictor if service.ready.is_set() else None
        return Info(intended_use=INTENDED_USE, ready=p is not None, model=p.model_id if p else None,
                    backend=cfg.backend, threshold=p.threshold if p else None, labels=list(LABELS),
                    precision=p.precision if p else None, precision_reason=p.precision_reason if p else None,
                    int8_guard=p.rechecked if p else None,
                    max_batch=cfg.max_batch,
                    temperature=p.temperature if p else None, class_bias=p.class_bias if p else None,
                    conformal_alpha=(p.config.get("conformal") or {}).get("alpha") if p else None,
                    ood_threshold=p.ood_threshold if p else None,
                    formats=list(ALLOWED_FORMATS), max_upload_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels,
                    explain=service.explain_state == "ready", explain_status=service.explain_state,
                    explain_error=service.explain_error, card="/api/card" if p else None)

    @app.get("/api/card", summary="The model card (Markdown)", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}}, **responses(404, 503)})
    async def card(request: Request):
        if not service.ready.is_set():
            return not_ready(request.url.path)
        path = Path(service.predictor.card_path)
        if not path.is_file():
            return problem(404, "this model has no MODEL_CARD.md", "not_found", request.url.path)
        return PlainTextResponse(path.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz), ("/api/info", info), ("/api/card", card)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)  # HEAD too (probes, curl -I)

    @app.post("/api/predict", summary="Classify one X-ray (multipart field `file`: JPEG, PNG or DICOM)",
              response_model=Prediction, responses=UPLOAD_ERRORS,
              description="A 200 is a diagnosis or, with `in_scope` false, `label` null and `reasons`, the refusal "
                          "of an input that is not a pediatric frontal chest X-ray. A blank image is a 422 "
                          "(`blank_image`); an unreadable one a 400, 413 or 415.")
    async def predict(request: Request, file: UploadFile = File(..., description="the X-ray image"),
                      preview: bool = Query(False, description="also return the decoded image as a JPEG data URL")):
        t0 = time.perf_counter()
        if not service.ready.is_set():
            return not_ready(request.url.path)
        upload = await one_file(request, file)
        if isinstance(upload, Response):
            return upload
        result = await run(service.limiter, request.url.path, service.prepare, *upload, preview)
        if isinstance(result, Response):
            return result
        result["elapsed_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        result["compute_ms"] = round(result["compute_ms"], 2)
        return result

    @app.post("/api/explain", summary="Explanation overlay (Grad-CAM of the predicted class) as PNG",
              response_class=Response, responses={200: {"content": {"image/png": {}}}, **UPLOAD_ERRORS, **responses(501)})
    async def explain(request: Request, file: UploadFile = File(..., description="the X-ray image"),
                      layer: bool = Query(False, description="the heat map alone (transparent PNG, the size of "
                                                             "/api/predict's preview) instead of the overlay figure")):
        path = request.url.path
        if not service.ready.is_set():
            return not_ready(path)
        if service.explain_state in ("loading", "preparing"):
            return problem(503, "explanations are being prepared (a one-time ONNX export with the Grad-CAM output, "
                                "about a minute); retry shortly", "explain_preparing", path, retry_after=10)
        if service.explain_state != "ready":
            return problem(501, f"explanations are not available: {service.explain_error}", "explain_unavailable", path)
        upload = await one_file(request, file)
        if isinstance(upload, Response):
            return upload
        result = await run(service.explain_limiter, path, service.explain, *upload, layer)
        if isinstance(result, Response):
            return result
        return Response(result, media_type="image/png", headers={"Cache-Control": "no-store"})

    return app


__all__ = ["ServeConfig", "Service", "create_app"]
