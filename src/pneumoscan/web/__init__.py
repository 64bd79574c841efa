"""The web service: a FastAPI app over :class:`pneumoscan.predict.Predictor` (ONNX Runtime).

``app`` (routes), ``service`` (the model and its two worker pools), ``limits`` (pools, body
bounds, Host and security headers), ``problems`` (the one error schema), ``schema`` (response
models), ``server`` (uvicorn with header/connection bounds: ``serve(cfg)``), ``config``.
``create_app`` is imported lazily so that reading :class:`ServeConfig` stays cheap.
"""
from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(name)
