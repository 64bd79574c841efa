"""One error schema for every refusal: RFC 9457 problem details (``application/problem+json``).

Routes, exception handlers, the ASGI middlewares and the HTTP protocol all answer with
:func:`problem` or :func:`send_problem`, so a client parses one shape whatever refused it:
``type`` (``about:blank``: the status says it all), ``title`` (the status phrase), ``status``,
``detail`` (one line for a person: what was wrong and what to do), ``instance`` (the path), and
two extensions: ``code`` (a stable machine name) and, for 422, ``errors`` (the fields at fault).
"""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Callable

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    """One field of a request that failed validation."""

    loc: list[str | int] = Field(description="where: e.g. ['body', 'file']")
    msg: str = Field(description="what is wrong with it")


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error response."""

    type: str = Field("about:blank", description="problem type URI; about:blank = the HTTP status is the type")
    title: str = Field(description="the HTTP status phrase, e.g. 'Payload Too Large'")
    status: int = Field(description="the HTTP status code, repeated")
    detail: str = Field(description="one line for a person: what was wrong and what to do")
    instance: str | None = Field(None, description="the request path")
    code: str = Field(description="stable machine-readable reason, e.g. image_too_large, busy, deadline")
    errors: list[FieldError] | None = Field(None, description="422 only: the fields that failed validation")


def body(status: int, detail: str, code: str, instance: str | None = None, **extra: Any) -> dict:
    """The problem document as a dict (``None`` members left out)."""
    doc = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, instance=instance, code=code, **extra)
    return doc.model_dump(exclude_none=True)


def problem(status: int, detail: str, code: str, instance: str | None = None, retry_after: int | None = None,
            **extra: Any) -> JSONResponse:
    """A problem-details response; ``retry_after`` adds the ``Retry-After`` header (seconds)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body(status, detail, code, instance, **extra), status_code=status, headers=headers,
                        media_type=MEDIA_TYPE)


async def send_problem(send: Callable, status: int, detail: str, code: str, instance: str | None = None,
                       retry_after: int | None = None, close: bool = False) -> None:
    """A problem-details response straight onto an ASGI ``send`` (middlewares, before any route).

    No ``Connection: close`` unless ``close``: a refusal sent before the body was read keeps the
    connection, the server discards the rest of the body, and the client reads the status instead
    of a reset (closing with unread data makes the kernel send RST).
    """
    data = json.dumps(body(status, detail, code, instance)).encode()
    headers = [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses`` entries documenting ``statuses`` as problem details."""
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase, "content": {MEDIA_TYPE: {}}} for s in statuses}


def document_problems(app) -> None:
    """Make ``app.openapi()`` list error bodies under ``application/problem+json`` only (FastAPI puts a
    ``responses`` model under the route's own media type, ``application/json``)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    for code, resp in op.get("responses", {}).items():
                        content = resp.get("content", {})
                        if code[0] in "45" and MEDIA_TYPE in content and "application/json" in content:
                            content[MEDIA_TYPE] = content.pop("application/json")
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
