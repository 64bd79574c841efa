"""Predict single images or folders with a model directory: the one inference entry point.

:class:`Predictor` loads a model directory (PyTorch weights, or its ONNX export through ONNX
Runtime), applies the preprocessing stored in the model's JSON and the shared decision rule,
and returns :class:`Prediction` objects. The CLI, the evaluator and the web service all use it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import LABELS
from .errors import ImageError, ModelError
from .imaging import DEFAULT_MAX_PIXELS, XRay, load_xray
from .metrics import decide, pneumonia_score, prior_shift, softmax
from .modeldir import read_config, resolve_model_dir, verify_file
from .preprocess import Preprocess, PreprocessConfig
from .scope import check_scope  # out-of-scope hints: a warning, never a refusal

if TYPE_CHECKING:  # torch loads only for the torch backend: ONNX serving stays light
    import torch

    from .modeling import ModelBundle

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
    """Load once, predict many. ``backend`` is "torch" (default) or "onnx" (ONNX Runtime)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, *, backend: str = "torch",
                 device: str = "cpu", prevalence: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        self.backend = backend
        self.device = device
        self.max_pixels = max_pixels
        self.config = read_config(self.model_dir)
        self.prep_cfg = PreprocessConfig.from_dict(self.config["preprocess"])
        self.pre = Preprocess(self.prep_cfg)
        self.threshold = float(self.config.get("threshold", 0.5))
        self.labels = tuple(self.config.get("labels", LABELS))
        self.prevalence = prevalence
        if prevalence is not None and not 0.0 < prevalence < 1.0:
            raise ModelError(f"prevalence {prevalence} must lie strictly between 0 and 1 (e.g. 0.3)")
        if backend == "torch":
            from .modeling import load_model

            self.bundle: ModelBundle | None = load_model(self.model_dir)
            self.net = self.bundle.net.to(device).eval()
            self._session = None
        elif backend == "onnx":
            self.bundle = None
            self._session = _onnx_session(self.model_dir, self.config, threads)
        else:
            raise ModelError(f"backend {backend!r} is unknown; use torch or onnx")

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
            logits = self._session.run(None, {"input": x.astype(np.float32, copy=False)})[0]
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
        return self.result(name, p, check_scope(x))

    def predict_bytes(self, data: bytes, name: str = "upload") -> Prediction:
        return self.predict_xray(load_xray(data, name=name, max_pixels=self.max_pixels,
                                           size_hint=self.prep_cfg.size), name)

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
                    x = load_xray(p, max_pixels=self.max_pixels, size_hint=self.prep_cfg.size)
                except ImageError as e:
                    errors.append((str(p), str(e)))
                    continue
                xs.append(self.pre.array(x.pixels))
                names.append(str(p))
                warns.append(check_scope(x))
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


def model_prior(config: dict) -> np.ndarray:
    """The class prior the model's probabilities answer to (Saerens et al.'s training prior).

    A loss with inverse-frequency ("balanced") class weights cancels the data's class frequencies,
    so such a model's posteriors are those of equal priors; without weights they follow the
    training frequencies. An explicit ``model_prior`` in config.json (ensembles) wins.
    """
    k = len(config.get("labels", LABELS))
    if "model_prior" in config:
        return np.asarray(config["model_prior"], float)
    if config.get("train_config", {}).get("class_weight") == "balanced" or "train_prior" not in config:
        return np.full(k, 1.0 / k)
    return np.asarray(config["train_prior"], float)


def prevalence_prior(config: dict, prevalence: float) -> np.ndarray:
    """Class prior for a stated pneumonia prevalence; bacterial vs viral keep the training ratio."""
    k = len(config.get("labels", LABELS))
    train_prior = np.asarray(config.get("train_prior", [1.0 / k] * k), float)
    pn = train_prior[1:] / train_prior[1:].sum()
    return np.array([1.0 - prevalence, *(prevalence * pn)])


def _onnx_session(model_dir: Path, config: dict, threads: int | None):
    import onnxruntime as ort

    name = config.get("onnx", {}).get("file", "model.onnx")
    if not (model_dir / name).is_file():
        raise ModelError(f"{model_dir} has no ONNX export; run 'pneumoscan export --model {model_dir}' first")
    path = verify_file(model_dir, name, config)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{path} cannot be loaded by ONNX Runtime: {e}") from None
