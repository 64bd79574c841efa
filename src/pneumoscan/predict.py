"""Predict single images or folders with a model directory: the one inference entry point.

:class:`Predictor` loads a model directory (its ONNX export through ONNX Runtime, or the PyTorch
weights), applies the preprocessing stored in the model's JSON and the shared decision rule,
and returns :class:`Prediction` objects. The CLI, the evaluator, the explainers and the web
service all use it. On the ONNX backend nothing here imports torch: a model that has to be
exported first is exported in a child process when this one has not loaded torch.

Blank images are refused (:class:`~pneumoscan.data.imaging.BlankImageError`); decoder notes
(a truncated JPEG, an unusable DICOM window) join the out-of-scope hints in each prediction's
``warnings``. An ONNX export with a ``cam`` output (:mod:`pneumoscan.export.onnx`) also gives
Grad-CAM maps (:meth:`Predictor.explain_xray`), still without torch.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from .data.imaging import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, BlankImageError, XRay, check_content, load_xray  # noqa: F401  (some: for the web layer)
from .errors import ImageError, ModelError
from .io import atomic_write_json
from .labels import DEFAULT_THRESHOLD, LABELS, decide, pneumonia_score, softmax
from .metrics import model_prior, prevalence_prior, prior_shift
from .nets.modeldir import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, has_onnx, onnx_name, read_config, resolve_model_dir, verify_file
from .preprocess import Preprocess, PreprocessConfig
from .runtime import ort_session
from .scope import check_scope  # out-of-scope hints: a warning, never a refusal

if TYPE_CHECKING:  # torch loads only for the torch backend: ONNX serving stays light
    import torch

    from .nets.checkpoint import ModelBundle

BACKENDS = ("auto", "onnx", "torch")  # auto: ONNX Runtime when the model has a verified export, else PyTorch
CAM_OUTPUT = "cam"  # the export's Grad-CAM output (pneumoscan.export.onnx.CAM_NAME)
EXPORT_TIMEOUT_S = 1800  # an export in a child process that takes longer is stopped


@dataclass(frozen=True)
class PredictConfig:
    """How images are predicted (``pneumoscan predict``; evaluation and robustness take the same engine)."""

    backend: Literal["auto", "onnx", "torch"] = "auto"  # auto: ONNX Runtime when the model has a verified export, else PyTorch
    batch_size: int = 32  # images per inference batch
    prevalence: float | None = None  # expected share of pneumonia in your data: corrects probabilities for the prior shift

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ModelError(f"batch size {self.batch_size} must be at least 1")
        if self.prevalence is not None and not 0.0 < self.prevalence < 1.0:
            raise ModelError(f"prevalence {self.prevalence} must lie strictly between 0 and 1 (e.g. 0.3)")

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One image's result. ``probabilities`` follow LABELS order."""

    path: str
    label: str
    probabilities: dict[str, float]
    pneumonia: bool
    pneumonia_probability: float
    threshold: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """Load once, predict many.

    ``backend`` is "auto" (ONNX Runtime when the model directory has a verified export, else
    PyTorch), "onnx" or "torch". With ``export_missing`` an "onnx"/"auto" predictor of a model
    without an export exports one into a temporary folder first (the model directory is never
    written to); with ``need_cam`` too, an export without a ``cam`` output (older exports, such
    as the shipped model's) is re-exported the same way, so that :meth:`explain_xray` works.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, *, backend: str = "auto",
                 device: str = "cpu", prevalence: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None, export_missing: bool = False, need_cam: bool = False) -> None:
        if backend not in BACKENDS:
            raise ModelError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if prevalence is not None and not 0.0 < prevalence < 1.0:
            raise ModelError(f"prevalence {prevalence} must lie strictly between 0 and 1 (e.g. 0.3)")
        self.model_dir = resolve_model_dir(model_dir)
        self.config = read_config(self.model_dir)
        if backend == "auto":
            backend = "onnx" if has_onnx(self.model_dir) or export_missing else "torch"
        self.backend = backend
        self.device = device
        self.max_pixels = max_pixels
        self.prep_cfg = PreprocessConfig.from_dict(self.config["preprocess"])
        self.pre = Preprocess(self.prep_cfg)
        self.threshold = float(self.config.get("threshold", DEFAULT_THRESHOLD))
        self.labels = LABELS  # read_config checked that the model's outputs are in this order
        self.prevalence = prevalence
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.bundle: ModelBundle | None = None
        self._session = None
        self.outputs: list[str] = []  # the ONNX graph's outputs (logits first)
        self.onnx_path: Path | None = None  # the ONNX file that runs (a temporary export with export_missing)
        if backend == "torch":
            from .nets.checkpoint import load_model

            self.bundle = load_model(self.model_dir)
            self.net = self.bundle.net.to(device).eval()
        else:
            stale = need_cam and has_onnx(self.model_dir) and CAM_OUTPUT not in self.config.get("onnx", {}).get("outputs", [])
            fresh = export_missing and (stale or not has_onnx(self.model_dir))
            onnx_dir = self._exported_copy() if fresh else self.model_dir
            onnx_cfg = read_config(onnx_dir)
            self.onnx_path = onnx_dir / (onnx_name(onnx_cfg) or "model.onnx")
            self._session = _onnx_session(onnx_dir, onnx_cfg, threads)
            self.outputs = [o.name for o in self._session.get_outputs()]

    @property
    def has_cam(self) -> bool:
        """Whether :meth:`explain_xray` can run (an ONNX graph with the ``cam`` output)."""
        return CAM_OUTPUT in self.outputs

    def _exported_copy(self) -> Path:
        """A temporary copy of the model directory with an ONNX export (torch runs in a child process
        unless this process has imported it already)."""
        log.warning("%s has no ONNX export%s; exporting into a temporary folder (run 'pneumoscan export "
                    "--model %s' on a copy once to skip this)", self.model_dir,
                    "" if not has_onnx(self.model_dir) else " with a Grad-CAM output", self.model_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="pneumoscan-onnx-")
        tmp = Path(self._tmp.name)
        for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
            if (self.model_dir / name).is_file():
                shutil.copy2(self.model_dir / name, tmp / name)
        cfg = read_config(tmp)
        cfg.pop("onnx", None)
        cfg.get("files", {}).pop(onnx_name(self.config) or "model.onnx", None)
        atomic_write_json(tmp / CONFIG_NAME, cfg)  # the copy describes no export until its own is made
        if "torch" in sys.modules:
            from .export.onnx import export_onnx

            export_onnx(tmp)
        else:  # keep this process torch-free (a server stays small): export in a child process
            _export_in_child(tmp)
        return tmp

    def close(self) -> None:
        """Remove the temporary export, if one was made."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __repr__(self) -> str:
        return f"Predictor(model={self.model_id!r}, backend={self.backend!r}, size={self.prep_cfg.size})"

    @property
    def model_id(self) -> str:
        return str(self.config.get("model_id", self.model_dir.name))

    @property
    def card_path(self) -> str:
        return str(self.model_dir / "MODEL_CARD.md")

    def probabilities(self, batch: "np.ndarray | torch.Tensor") -> np.ndarray:
        """Class probabilities for a normalised float batch (N, 3, S, S)."""
        if self._session is not None:
            x = np.asarray(batch.numpy() if hasattr(batch, "numpy") else batch, np.float32)
            logits = self._session.run(self.outputs[:1], {"input": x.astype(np.float32, copy=False)})[0]
            p = softmax(logits)
        else:
            import torch

            x = torch.as_tensor(batch).to(self.device)
            with torch.inference_mode():
                p = self.net(x).float().softmax(-1).cpu().numpy()
        return self._adjust(p)

    def _adjust(self, p: np.ndarray) -> np.ndarray:
        if self.prevalence is None:
            return p
        return prior_shift(p, model_prior(self.config), prevalence_prior(self.config, self.prevalence))

    def tensor(self, x: XRay) -> "torch.Tensor":
        return self.pre(x.pixels)

    def result(self, path: str, p: np.ndarray, warns: list[str] | None = None) -> Prediction:
        k = int(decide(p[None], self.threshold)[0])
        return Prediction(path=path, label=self.labels[k],
                          probabilities={lab: float(v) for lab, v in zip(self.labels, p)},
                          pneumonia=k != 0, pneumonia_probability=float(pneumonia_score(p[None])[0]),
                          threshold=self.threshold, warnings=list(warns or []))

    def predict_xray(self, x: XRay, name: str = "image") -> Prediction:
        p = self.probabilities(self.pre.array(x.pixels)[None])[0]
        return self.result(name, p, check_scope(x) + x.notes)

    def explain_xray(self, x: XRay, name: str = "image") -> tuple[Prediction, np.ndarray]:
        """The prediction and the Grad-CAM map (float32, S x S, non-negative) of its predicted class,
        from one run of the ONNX graph (:attr:`has_cam`); torch-free."""
        if not self.has_cam:
            raise ModelError(f"{self.onnx_path or self.model_dir} has no '{CAM_OUTPUT}' output; re-export the "
                             "model with 'pneumoscan export' (or load it with need_cam=True)")
        x_in = self.pre.array(x.pixels)[None]
        logits, cam = self._session.run([self.outputs[0], CAM_OUTPUT], {"input": x_in})
        pred = self.result(name, self._adjust(softmax(logits))[0], check_scope(x) + x.notes)
        return pred, np.ascontiguousarray(cam[0, list(self.labels).index(pred.label)], dtype=np.float32)

    def decode(self, data: bytes | str | os.PathLike, name: str | None = None) -> XRay:
        """Decode an upload or a file with this predictor's pixel limit (JPEG draft at the model size);
        a blank image is refused (:class:`BlankImageError`)."""
        x = load_xray(data, name=name, max_pixels=self.max_pixels, size_hint=self.prep_cfg.size)
        return check_content(x, name or (data if isinstance(data, (str, os.PathLike)) else "upload"))

    def predict_bytes(self, data: bytes, name: str = "upload") -> Prediction:
        return self.predict_xray(self.decode(data, name), name)

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 32,
                      progress: bool = False) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files in batches; returns (predictions, [(path, error)]) for undecodable files."""
        from tqdm.auto import tqdm

        preds: list[Prediction] = []
        errors: list[tuple[str, str]] = []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            xs, names, warns = [], [], []
            for p in chunk:
                try:
                    x = self.decode(p, str(p))
                except ImageError as e:
                    errors.append((str(p), str(e)))
                    continue
                xs.append(self.pre.array(x.pixels))
                names.append(str(p))
                warns.append(check_scope(x) + x.notes)
            if xs:
                probs = self.probabilities(np.stack(xs))
                preds.extend(self.result(n, p, w) for n, p, w in zip(names, probs, warns))
            bar.update(len(chunk))
        bar.close()
        return preds, errors

    def warmup(self, n: int = 3) -> float:
        """Run a few dummy inferences (first-call allocations); returns the last one's seconds."""
        s = self.prep_cfg.size
        x = np.zeros((1, 3, s, s), np.float32)
        dt = 0.0
        for _ in range(n):
            t = time.perf_counter()
            self.probabilities(x)
            dt = time.perf_counter() - t
        return dt


_CHILDREN: set[subprocess.Popen] = set()  # exports running in child processes (stop_exports ends them)
_CHILDREN_LOCK = threading.Lock()


def _export_in_child(model_dir: Path) -> None:
    """``export_onnx(model_dir)`` in a child Python (torch loads there, never here)."""
    code = "import sys; from pneumoscan.export.onnx import export_onnx; export_onnx(sys.argv[1])"
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(model_dir)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    with _CHILDREN_LOCK:
        _CHILDREN.add(child)
    try:
        _, err = child.communicate(timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise ModelError(f"the ONNX export of {model_dir} took over {EXPORT_TIMEOUT_S} s and was stopped") from None
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(child)
    if child.returncode != 0:
        last = (err.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise ModelError(f"the ONNX export failed: {last[:300]}")
    log.info("exported %s in a child process in %.1f s", model_dir, time.perf_counter() - t0)


def stop_exports() -> None:
    """Stop every export still running in a child process (a server shutting down)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        if child.poll() is None:
            log.info("stopping the ONNX export in process %d", child.pid)
            child.terminate()


def _onnx_session(model_dir: Path, config: dict, threads: int | None):
    name = onnx_name(config) or "model.onnx"
    if not (model_dir / name).is_file():
        raise ModelError(f"{model_dir} has no ONNX export; run 'pneumoscan export --model {model_dir}' first")
    path = verify_file(model_dir, name, config)
    try:
        return ort_session(path, threads=threads)
    except Exception as e:
        raise ModelError(f"{path} cannot be loaded by ONNX Runtime: {e}") from None


def check_model(model_dir: str | os.PathLike | None) -> Path:
    """Fail fast (:class:`ModelError`) on a missing model or a weight file whose SHA-256 does not
    match its config; returns the model directory. Loads nothing."""
    d = resolve_model_dir(model_dir)
    cfg = read_config(d)
    verify_file(d, WEIGHTS_NAME, cfg)
    name = onnx_name(cfg)
    if name and (d / name).exists():
        verify_file(d, name, cfg)
    return d
