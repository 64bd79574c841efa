"""The model behind the app: loaded (and exported if needed) once, warmed, then shared by the workers.

Predictions are decoded on worker threads and run in dynamic batches on ``runners`` inference threads
(:class:`~pneumoscan.web.batching.Batcher`: uploads that arrive within a few milliseconds share
one forward pass); explanations run on their own bounded pool (:class:`Limiter`), so they can
never take the workers that predictions need. The graph is the export's INT8 copy where it passed
its validation gate and the CPU has VNNI-class instructions, else fp32 (``/api/info`` says which).
On the ONNX backend explanations come from the
export's ``cam`` output (Grad-CAM as a class activation map, :mod:`pneumoscan.export.onnx`) and
the server never imports torch. A model exported before that output existed (the shipped one)
serves predictions at once, while a copy is re-exported with it in a child process in the
background (about a minute on two cores); explanations answer 503 + ``Retry-After`` meanwhile,
and the new export then serves both (its logits pass the same parity check).
"""
from __future__ import annotations

import base64
import io
import logging
import threading
import time

from .. import LABELS
from ..errors import OutOfScopeError, PneumoscanError
from ..explain.maps import PREVIEW_SIDE, Explanation, heat_layer_png, overlay_png
from ..predict import Predictor, cpu_count, resolve_model_dir, stop_exports
from .batching import Batcher, Job
from .config import ServeConfig
from .limits import Limiter

log = logging.getLogger(__name__)

EXPLAIN_STATES = ("loading", "preparing", "ready", "unavailable")


class Service:
    """The model behind the app: loaded (and exported if needed) once, then shared by the workers."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model_dir)
        self.threads = cfg.ort_threads or max(1, cpu_count() // cfg.runners)  # intra-op threads per runner
        self.limiter = Batcher(self._forward, cfg.workers, cfg.queue, cfg.max_batch, cfg.max_wait_ms, "predictions",
                               runners=cfg.runners)
        self.explain_limiter = Limiter(cfg.explain_workers, cfg.explain_queue, "explanations")
        self.predictor: Predictor | None = None
        self.ready = threading.Event()
        self.error: str | None = None
        self.explain_state = "loading"  # one of EXPLAIN_STATES
        self.explain_error: str | None = None
        self._explain_lock = threading.Lock()  # torch backend only: hooks and gradients on a shared net

    def load(self) -> None:
        """Load, export if needed, and warm; then make explanations available. Errors are kept in
        ``self.error`` / ``self.explain_error`` and logged."""
        try:
            t0 = time.perf_counter()
            self.predictor = Predictor(self.model_dir, backend=self.cfg.backend, max_pixels=self.cfg.max_pixels,
                                       threads=self.threads, export_missing=self.cfg.backend == "onnx",
                                       precision=self.cfg.precision, varying_batches=True)
            if self.cfg.backend == "torch":
                import torch
                torch.set_num_threads(self.threads)
            self._warm(self.predictor)
            self.ready.set()
            log.info("model %s ready (%s backend, %s: %s; batches of up to %d) in %.1f s", self.predictor.model_id,
                     self.cfg.backend, self.predictor.precision, self.predictor.precision_reason, self.cfg.max_batch,
                     time.perf_counter() - t0)
        except PneumoscanError as e:
            self.error = str(e)
            log.error("model failed to load: %s", e)
            return
        except Exception as e:  # keep the server answering /readyz with the reason
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model failed to load")
            return
        self._prepare_explanations()

    def _prepare_explanations(self) -> None:
        p = self.predictor
        if self.cfg.backend == "torch":
            ok = _torch_explain_installed()
            self._explain_done(None if ok else "Captum is not installed (pip install captum)")
            return
        if p.has_cam:
            self._explain_done(None)
            return
        self.explain_state = "preparing"
        log.info("%s has no Grad-CAM output; re-exporting a copy in the background for explanations", self.model_dir)
        try:
            fresh = Predictor(self.model_dir, backend="onnx", max_pixels=self.cfg.max_pixels,
                              threads=self.threads, export_missing=True, need_cam=True, precision=self.cfg.precision,
                              varying_batches=True)
            self._warm(fresh)
        except Exception as e:
            log.warning("explanations unavailable: %s", e)
            self._explain_done(str(e) if isinstance(e, PneumoscanError) else f"{type(e).__name__}: {e}")
            return
        self.predictor = fresh  # the same logits (parity-checked export); one session from now on
        p.close()
        self._explain_done(None)

    def _explain_done(self, error: str | None) -> None:
        self.explain_error = error
        self.explain_state = "unavailable" if error else "ready"
        log.info("explanations %s%s", self.explain_state, f": {error}" if error else "")

    def _warm(self, predictor: Predictor) -> None:
        """First-call allocations of ONNX Runtime, Pillow and OpenCV happen here, not on a user."""
        import numpy as np
        from PIL import Image

        predictor.warmup(self.cfg.warmup)
        buf = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)  # small: under any pixel limit
        Image.fromarray(noise).save(buf, "JPEG")
        predictor.predict_bytes(buf.getvalue(), "warmup")

    def _forward(self, batch):
        """One batch through the network: calibrated probabilities and (for the learned gate) features."""
        pred = self.predictor
        return pred.forward(batch, features=pred.ood is not None)

    def prepare(self, data: bytes, name: str, preview: bool = False) -> Job:
        """Decode and check one upload (on a worker thread; errors are this upload's alone), and say how its
        row of the batch becomes its response: its own gate result, reasons and warnings."""
        t0 = time.perf_counter()
        pred = self.predictor
        x = pred.decode(data, name)
        reasons, warns = pred.screen(x)
        image = {"format": x.format, "mode": x.mode, "width": x.size[0], "height": x.size[1]}
        shown = preview_data_url(x.pixels) if preview else None

        def finish(p, features) -> dict:
            out = {**pred.result(name, p, reasons, warns, features).to_dict(), "model": pred.model_id, "image": image}
            out.pop("path")
            if shown is not None:
                out["preview"] = shown
            out["compute_ms"] = (time.perf_counter() - t0) * 1e3  # queueing for the batch included
            return out

        return Job(pred.pre.array(x.pixels), finish)

    def predict(self, data: bytes, name: str, preview: bool = False) -> dict:
        """One upload through the batcher, waited for (tests, scripts; the app awaits the future instead)."""
        return self.limiter.submit(self.prepare, data, name, preview).result()

    def explain(self, data: bytes, name: str, layer: bool = False) -> bytes:
        """Grad-CAM of the upload's predicted class as a PNG: the overlay figure (X-ray, map, colour bar,
        prediction), or with ``layer`` the map alone, transparent, to lay over the page's preview."""
        pred = self.predictor
        xray = pred.decode(data, name)
        if pred.has_cam:
            p, heat = pred.explain_xray(xray, name)
            if not p.in_scope:
                raise OutOfScopeError(f"{name}: {p.verdict} ({'; '.join(p.reasons)}): there is no diagnosis to explain")
        else:  # torch backend: torch is loaded already
            p = pred.predict_xray(xray, name)
            if not p.in_scope:
                raise OutOfScopeError(f"{name}: {p.verdict} ({'; '.join(p.reasons)}): there is no diagnosis to explain")
            from ..explain.figures import explainer_for

            with self._explain_lock:
                (e,) = explainer_for(pred)(xray, ("gradcam",))
            p, heat = e, e.heatmap
        if layer:
            return heat_layer_png(xray.pixels, heat, PREVIEW_SIDE)
        e = Explanation("gradcam", heat, target=list(LABELS).index(p.label), label=p.label,
                        probabilities=p.probabilities)
        return overlay_png(xray.pixels, e)

    def close(self) -> None:
        stop_exports()  # a background export still running must not outlive the server
        self.limiter.shutdown()
        self.explain_limiter.shutdown()
        if self.predictor is not None:
            self.predictor.close()


def preview_data_url(gray, side: int = PREVIEW_SIDE) -> str:
    """The decoded image as a small JPEG data URL: what the model saw, also for DICOM."""
    import cv2

    h, w = gray.shape
    k = min(1.0, side / max(h, w))
    small = cv2.resize(gray, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA) if k < 1 else gray
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise PneumoscanError("could not encode the preview")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _torch_explain_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "captum"))
