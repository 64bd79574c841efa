"""The model behind the app: loaded (and exported if needed) once, warmed, then shared by the workers."""
from __future__ import annotations

import io
import logging
import threading
import time

from ..errors import PneumoscanError
from ..predict import Predictor, resolve_model_dir
from .config import ServeConfig
from .limits import Limiter

log = logging.getLogger(__name__)


class Service:
    """The model behind the app: loaded (and exported if needed) once, then shared by the workers."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model_dir)
        self.limiter = Limiter(cfg.workers, cfg.queue)
        self.predictor = None
        self.ready = threading.Event()
        self.error: str | None = None
        self._explain_lock = threading.Lock()

    def load(self) -> None:
        """Load, export if needed, and warm; errors are kept in ``self.error`` and logged."""
        try:
            t0 = time.perf_counter()
            self.predictor = Predictor(self.model_dir, backend=self.cfg.backend, max_pixels=self.cfg.max_pixels,
                                       threads=self.cfg.ort_threads, export_missing=self.cfg.backend == "onnx")
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
        """Grad-CAM overlay PNG of the upload's predicted class."""
        from ..explain.figures import model_overlay_png

        xray = self.predictor.decode(data, name)
        with self._explain_lock:  # one explanation at a time: hooks and gradients on a shared net
            return model_overlay_png(self.model_dir, xray, method="gradcam")

    def close(self) -> None:
        self.limiter.shutdown()
        if self.predictor is not None:
            self.predictor.close()


def explain_available() -> bool:
    """Whether the explanation extra (Captum, PyTorch) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "captum"))
