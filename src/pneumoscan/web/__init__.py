"""The web service: a FastAPI app over :class:`pneumoscan.predict.Predictor` (ONNX Runtime).

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
