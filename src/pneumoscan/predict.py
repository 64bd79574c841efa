"""Predict single images or folders with a model directory: the one inference entry point.

:class:`Predictor` loads a model directory (its ONNX export through ONNX Runtime, or the PyTorch
weights), applies the preprocessing stored in the model's JSON and the shared decision rule,
and returns :class:`Prediction` objects. The CLI, the evaluator, the explainers and the web
service all use it. On the ONNX backend nothing here imports torch: a model that has to be
exported first is exported in a child process when this one has not loaded torch.

Every prediction passes the out-of-scope gate first. Blank images are refused outright
(:class:`~pneumoscan.data.imaging.BlankImageError`); an image that fails a check of
:mod:`pneumoscan.scope` (near constant, exposure, noise, colour, size, a damaged file), or whose
pooled features lie beyond the model's out-of-distribution threshold (:mod:`pneumoscan.uncertainty`,
fitted by ``pneumoscan calibrate``), gets ``in_scope=False``, ``label=None`` and its ``reasons``:
no diagnosis. An accepted image gets calibrated probabilities (the model's temperature), its
conformal prediction set, and the verdict "uncertain: refer" when that set holds normal and a
pneumonia class. Decoder notes (an unusable DICOM window) are ``warnings``. An ONNX export with a
``cam`` output (:mod:`pneumoscan.export.onnx`) also gives Grad-CAM maps
(:meth:`Predictor.explain_xray`), still without torch.
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
from .nets.modeldir import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    has_onnx,
    int8_file,
    onnx_name,
    read_config,
    resolve_model_dir,
    verify_file,
)
from .preprocess import Preprocess, PreprocessConfig
from .runtime import INT8_FLAGS, cpu_count, cpu_flags, int8_ready, ort_session  # noqa: F401  (cpu_count: web layer)
from .scope import check_scope, upright_profile  # the image checks of the out-of-scope gate
from .uncertainty import (  # noqa: F401
    UNCERTAIN,
    Int8Guard,
    OODScorer,
    boundary_distances,
    decided_sets,
    decision_settings,
    model_calibration,
    ood_threshold,
    prediction_sets,
    set_verdict,
    temperature_scale,
)

if TYPE_CHECKING:  # torch loads only for the torch backend: ONNX serving stays light
    import torch

    from .nets.checkpoint import ModelBundle

BACKENDS = ("auto", "onnx", "torch")  # auto: ONNX Runtime when the model has a verified export, else PyTorch
PRECISIONS = ("auto", "fp32", "int8")  # auto: INT8 when the model's INT8 export passed its gate and the CPU has VNNI
CAM_OUTPUT = "cam"  # the export's Grad-CAM output (pneumoscan.export.onnx.CAM_NAME)
FEATURES_OUTPUT = "features"  # the export's pooled features (pneumoscan.export.onnx.FEATURES_NAME)
OUT_OF_SCOPE = "not a pediatric frontal chest X-ray"  # the verdict of an input the gate stops
EXPORT_TIMEOUT_S = 1800  # an export in a child process that takes longer is stopped


@dataclass(frozen=True)
class PredictConfig:
    """How images are predicted (``pneumoscan predict``; evaluation and robustness take the same engine)."""

    backend: Literal["auto", "onnx", "torch"] = "auto"  # auto: ONNX Runtime when the model has a verified export, else PyTorch
    batch_size: int = 32  # images per inference batch
    prevalence: float | None = None  # expected share of pneumonia in your data: corrects probabilities for the prior shift
    precision: Literal["auto", "fp32", "int8"] = "auto"  # auto: the INT8 export if it passed its gate and the CPU has VNNI

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ModelError(f"precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise ModelError(f"batch size {self.batch_size} must be at least 1")
        if self.prevalence is not None and not 0.0 < self.prevalence < 1.0:
            raise ModelError(f"prevalence {self.prevalence} must lie strictly between 0 and 1 (e.g. 0.3)")

log = logging.getLogger(__name__)


def choose_precision(config: dict, requested: str = "auto", flags: frozenset[str] | None = None,
                     where: str = "the model") -> tuple[str, str]:
    """(precision, why): "int8" when an INT8 export passed its gate and (for "auto") the CPU has a
    VNNI-class instruction set (``flags``: the CPU's, read from /proc/cpuinfo unless given), else "fp32"."""
    if requested not in PRECISIONS:
        raise ModelError(f"precision {requested!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", "fp32 requested"
    name = int8_file(config)
    flags = cpu_flags() if flags is None else flags
    vnni = int8_ready(flags)
    if name is None:
        if requested == "int8":
            raise ModelError(f"{where} has no INT8 export that passed its validation gate; make one with "
                             f"'pneumoscan export --int8 --model DIR --data TRAINING_FOLDER' or use --precision fp32")
        return "fp32", "no INT8 export that passed its validation gate"
    recorded = config["onnx"]["int8"].get("decision")  # None: an export made before it was recorded
    if recorded is not None and recorded != decision_settings(config):
        stale = ("its INT8 export was gated before the model's calibration, threshold or out-of-scope gate last "
                 "changed, so its gate and guard no longer hold")
        if requested == "int8":
            raise ModelError(f"{where}: {stale}; re-export it with 'pneumoscan export --int8 --model DIR --data "
                             "TRAINING_FOLDER' or use --precision fp32")
        return "fp32", stale
    g = config["onnx"]["int8"]["gate"]
    passed = f"INT8 export passed its gate ({g['agreement']:.1%} identical verdicts on {g['images']} validation images)"
    if vnni:
        return "int8", f"{passed}; the CPU has {vnni}"
    if requested == "int8":
        if config["onnx"]["int8"].get("weights", "full") != "reduced":  # older exports: full range
            raise ModelError(f"{where}: its INT8 export has full-range weights, which this CPU (none of "
                             f"{', '.join(INT8_FLAGS)}) computes with saturating sums, so its verdicts would not be "
                             "those its gate measured; use --precision fp32, or re-export on this CPU with "
                             "'pneumoscan export --int8 --weight-range reduced'")
        return "int8", (f"INT8 requested; {passed}; its weights are exact on any CPU, but this one has none of "
                        f"{', '.join(INT8_FLAGS)}, so it may be no faster than fp32")
    return "fp32", f"the CPU has none of {', '.join(INT8_FLAGS)} (INT8 would gain little); {passed}"


@dataclass
class Prediction:
    """One image's result. ``probabilities`` follow LABELS order and are calibrated (the model's
    temperature, then the prior shift of ``prevalence``).

    An input the gate stops has ``in_scope=False``, ``label``/``probabilities``/``pneumonia``/
    ``prediction_set`` None and ``verdict`` :data:`OUT_OF_SCOPE`; ``reasons`` say why. ``ood_score`` is
    the out-of-distribution score (None for a model without the learned gate). ``scores`` keeps the
    network's calibrated probabilities even for a stopped input, for evaluation only (not in
    :meth:`to_dict`).
    """

    path: str
    label: str | None
    verdict: str
    in_scope: bool
    probabilities: dict[str, float] | None
    pneumonia: bool | None
    pneumonia_probability: float | None
    threshold: float
    prediction_set: list[str] | None = None
    ood_score: float | None = None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("scores")
        return d

    @property
    def predicted(self) -> str:
        """The class the network's probabilities decide, gate or not (evaluation; never shown to a user)."""
        if self.label is not None:
            return self.label
        return LABELS[int(decide(self.scores[None], self.threshold)[0])]


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
                 threads: int | None = None, export_missing: bool = False, need_cam: bool = False,
                 precision: str = "auto", cpu_flags: frozenset[str] | None = None,
                 varying_batches: bool = False) -> None:
        if backend not in BACKENDS:
            raise ModelError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if prevalence is not None and not 0.0 < prevalence < 1.0:
            raise ModelError(f"prevalence {prevalence} must lie strictly between 0 and 1 (e.g. 0.3)")
        self.model_dir = resolve_model_dir(model_dir)
        self.config = read_config(self.model_dir)
        outputs = self.config.get("onnx", {}).get("outputs", [])
        lacks_features = bool(self.config.get("ood")) and has_onnx(self.model_dir) and FEATURES_OUTPUT not in outputs
        if backend == "auto":
            backend = "onnx" if (has_onnx(self.model_dir) and not lacks_features) or export_missing else "torch"
            if lacks_features and not export_missing:
                log.info("%s: the ONNX export has no '%s' output for the out-of-scope gate; using PyTorch (re-export "
                         "to serve it with ONNX Runtime)", self.model_dir, FEATURES_OUTPUT)
        self.backend = backend
        self.device = device
        self.max_pixels = max_pixels
        self.prep_cfg = PreprocessConfig.from_dict(self.config["preprocess"])
        self.pre = Preprocess(self.prep_cfg)
        self.threshold = float(self.config.get("threshold", DEFAULT_THRESHOLD))
        self.labels = LABELS  # read_config checked that the model's outputs are in this order
        self.prevalence = prevalence
        # fitted by 'pneumoscan calibrate' (1 = none); the class bias of bias-corrected scaling (None: T alone)
        self.temperature, self.class_bias = model_calibration(self.config)
        self.qhat: float | None = (self.config.get("conformal") or {}).get("qhat")  # None: no prediction sets
        self.conformal_method: str = (self.config.get("conformal") or {}).get("method", "aps")
        self.ood: OODScorer | None = None
        self.ood_threshold: float | None = None
        self.upright_threshold: float | None = None
        if self.config.get("ood"):
            self.ood_threshold = ood_threshold(self.config)
            self.upright_threshold = self.config["ood"].get("upright_threshold")
            self.ood = OODScorer.load(verify_file(self.model_dir, self.config["ood"]["file"], self.config))
        self.gate = True  # False: nothing is stopped (calibrate fits on every image)
        self._graph = None  # the torch backend's ServingGraph: logits and pooled features in one pass
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.bundle: ModelBundle | None = None
        self._session = None
        self.outputs: list[str] = []  # the ONNX graph's outputs (logits first)
        self.onnx_path: Path | None = None  # the ONNX file that runs (a temporary export with export_missing)
        self.precision = "fp32"  # the graph that runs: "fp32", or "int8" (the export's gated INT8 copy)
        self.precision_reason = "PyTorch backend"  # why that precision was chosen
        self._threads = threads
        self._varying = varying_batches  # batches of many sizes (the service): no per-size memory plans
        self._fp32_session = None  # with INT8: the fp32 graph, for Grad-CAM maps and the guard's images
        self._guard: Int8Guard | None = None  # with INT8: which images fp32 answers (the export's margins)
        self._int8_ood_threshold: float | None = None  # the out-of-scope threshold on INT8 features (the guard's)
        self._rechecks = [0, 0]  # images INT8 answered, and of them sent back to fp32 by the guard
        self._rechecks_lock = threading.Lock()
        if backend == "torch":
            from .nets.checkpoint import load_model

            self.bundle = load_model(self.model_dir)
            self.net = self.bundle.net.to(device).eval()
            if self.ood is not None and not self._torch_graph().with_features:
                raise ModelError(f"{self.model_dir} has an out-of-distribution gate but its network gives no pooled "
                                 "features in PyTorch; re-run 'pneumoscan calibrate' or use the ONNX backend")
        else:
            stale = has_onnx(self.model_dir) and ((need_cam and CAM_OUTPUT not in outputs) or lacks_features)
            fresh = export_missing and (stale or not has_onnx(self.model_dir))
            onnx_dir = self._exported_copy() if fresh else self.model_dir
            onnx_cfg = read_config(onnx_dir)
            self.precision, self.precision_reason = choose_precision(onnx_cfg, precision, cpu_flags, str(self.model_dir))
            if self.precision == "int8":
                self._guard = int8_guard(onnx_cfg)
            if self.ood is not None:  # INT8 features are noisier: the export mapped the threshold to them
                self._int8_ood_threshold = ood_threshold(onnx_cfg, self.precision)
                # with the guard, fp32 answers near the threshold and INT8 far from it: fp32's threshold decides
                self.ood_threshold = ood_threshold(onnx_cfg, "fp32" if self._guard else self.precision)
            name = int8_file(onnx_cfg) if self.precision == "int8" else onnx_name(onnx_cfg)
            self.onnx_path = onnx_dir / (name or "model.onnx")
            self._onnx_dir, self._onnx_cfg = onnx_dir, onnx_cfg
            # two sessions take turns on the same cores: idle threads that spin would slow the other's (-17 %)
            spin = False if self._guard is not None else None
            self._session = _onnx_session(onnx_dir, onnx_cfg, threads, name, varying_batches, spin)
            if self._guard is not None:
                self._fp32_session = _onnx_session(onnx_dir, onnx_cfg, threads, None, varying_batches, spin)
                self.precision_reason += "; images near a decision boundary are run again in fp32 (the INT8 guard)"
            log.info("%s: %s graph (%s)", self.model_dir, self.precision.upper(), self.precision_reason)
            self.outputs = [o.name for o in self._session.get_outputs()]
            if self.ood is not None and FEATURES_OUTPUT not in self.outputs:
                raise ModelError(f"{self.onnx_path} has no '{FEATURES_OUTPUT}' output, which the model's out-of-"
                                 "distribution gate needs; re-export it with 'pneumoscan export' (or use --backend torch)")

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
        return (f"Predictor(model={self.model_id!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"size={self.prep_cfg.size})")

    @property
    def model_id(self) -> str:
        return str(self.config.get("model_id", self.model_dir.name))

    @property
    def card_path(self) -> str:
        return str(self.model_dir / "MODEL_CARD.md")

    def _torch_graph(self):
        if self._graph is None:
            from .export.onnx import ServingGraph

            self._graph = ServingGraph(self.net, self.prep_cfg.size)
            self._graph.with_cam = False  # Grad-CAM comes from pneumoscan.explain on this backend
        return self._graph

    def forward(self, batch: "np.ndarray | torch.Tensor", features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities, pooled features or None) of a normalised float batch (N, 3, S, S).
        Features come from the same pass (the export's ``features`` output, or the torch graph)."""
        feats = None
        if self._session is not None:
            x = np.asarray(batch.numpy() if hasattr(batch, "numpy") else batch, np.float32)
            gated = features or (self._guard is not None and self.ood is not None)  # the guard reads the score too
            want = self.outputs[:1] + ([FEATURES_OUTPUT] if gated and FEATURES_OUTPUT in self.outputs else [])
            out = self._session.run(want, {"input": x})
            p = self._adjust(softmax(out[0]))
            feats = out[1] if len(out) > 1 else None
            if self._guard is not None:
                p, feats = self._recheck(x, p, feats, want)
            return p, feats if features else None
        else:
            import torch

            x = torch.as_tensor(batch).to(self.device)
            with torch.inference_mode():
                graph = self._torch_graph() if features else None
                if graph is not None and graph.with_features:
                    logits, f = graph(x)[:2]
                    feats = f.float().cpu().numpy()
                else:
                    logits = self.net(x)
                p = logits.float().softmax(-1).cpu().numpy()
        return self._adjust(p), feats

    def _recheck(self, x: np.ndarray, p: np.ndarray, feats: np.ndarray | None,
                 want: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """INT8's answers, with fp32's for the rows the guard sends back (near a boundary of the verdict)."""
        scores = self.ood.score(feats) if self.ood is not None and feats is not None else None
        redo = self._guard.needs_fp32(boundary_distances(p, self.threshold, self.qhat, self.conformal_method, scores,
                                                         self._int8_ood_threshold))
        with self._rechecks_lock:
            self._rechecks[0] += len(p)
            self._rechecks[1] += int(redo.sum())
        if redo.any():
            out = self._fp32_session.run(want, {"input": x[redo]})
            p = p.copy()
            p[redo] = self._adjust(softmax(out[0]))
            if feats is not None:
                feats = feats.copy()
                feats[redo] = out[1]
        return p, feats

    @property
    def rechecked(self) -> dict[str, int] | None:
        """How many images INT8 answered, and how many of them the guard sent back to fp32, so far (None: no guard
        runs). A share that rises above the export's (``config.json["onnx"]["int8"]["gate"]["guard"]``) says the
        inputs lie nearer the decision boundaries than the validation images did."""
        if self._guard is None:
            return None
        with self._rechecks_lock:
            return {"images": self._rechecks[0], "fp32": self._rechecks[1]}

    def probabilities(self, batch: "np.ndarray | torch.Tensor") -> np.ndarray:
        """Calibrated class probabilities for a normalised float batch (N, 3, S, S)."""
        return self.forward(batch)[0]

    def _adjust(self, p: np.ndarray) -> np.ndarray:
        """The model's temperature (and class bias), then the prior shift to ``prevalence``."""
        p = temperature_scale(p, self.temperature, self.class_bias)
        if self.prevalence is None:
            return p
        return prior_shift(p, model_prior(self.config), prevalence_prior(self.config, self.prevalence))

    def tensor(self, x: XRay) -> "torch.Tensor":
        return self.pre(x.pixels)

    def result(self, path: str, p: np.ndarray, reasons: Sequence[str] = (), warnings: Sequence[str] = (),
               features: np.ndarray | None = None, score: float | None = None) -> Prediction:
        """The gate and the decision for one image's calibrated probabilities ``p``: ``reasons`` from the
        image checks, the out-of-distribution ``score`` (a batch's scores come from one call of ``ood.score``) or
        the pooled ``features`` it is computed from."""
        reasons = list(reasons)
        if score is None and features is not None and self.ood is not None:
            score = self.ood.score(features[None])[0]
        if score is not None:
            score = float(score)
            if score > self.ood_threshold:
                reasons.append(f"its features are unlike the training X-rays (out-of-distribution score {score:.2f} "
                               f"> {self.ood_threshold:.2f})")
        if self.gate and reasons:
            return Prediction(path=path, label=None, verdict=OUT_OF_SCOPE, in_scope=False, probabilities=None,
                              pneumonia=None, pneumonia_probability=None, threshold=self.threshold, ood_score=score,
                              reasons=reasons, warnings=list(warnings), scores=p)
        k = int(decide(p[None], self.threshold)[0])
        label = self.labels[k]
        pset = self.prediction_sets(p[None])[0] if self.qhat is not None else None
        return Prediction(path=path, label=label, verdict=set_verdict(label, pset or [label]), in_scope=True,
                          probabilities={lab: float(v) for lab, v in zip(self.labels, p)},
                          pneumonia=k != 0, pneumonia_probability=float(pneumonia_score(p[None])[0]),
                          threshold=self.threshold, prediction_set=pset, ood_score=score,
                          reasons=reasons, warnings=list(warnings), scores=p)

    def prediction_sets(self, probs: np.ndarray) -> list[list[str]]:
        """Conformal prediction sets (LABELS order) of calibrated probabilities; the decided class is
        always in its set (the threshold rule may pick a class APS would not have reached)."""
        return decided_sets(probs, self.threshold, self.qhat, self.conformal_method)

    def screen(self, x: XRay) -> tuple[list[str], list[str]]:
        """(reasons the image checks and the upside-down check stop ``x``, decoder notes that are only warnings)."""
        reasons = check_scope(x)
        if not reasons and self.ood is not None and self.ood.upright is not None:
            p = float(self.ood.upside_down(upright_profile(x.pixels)[None])[0])
            if p > self.upright_threshold:
                reasons.append(f"upside down (P = {p:.2f} > {self.upright_threshold:.2f} by the learned upside-down "
                               "check): send the frontal film upright")
        return reasons, [n for n in x.notes if not any(n in r for r in reasons)]

    def predict_xray(self, x: XRay, name: str = "image") -> Prediction:
        p, f = self.forward(self.pre.array(x.pixels)[None], features=self.ood is not None)
        return self.result(name, p[0], *self.screen(x), features=None if f is None else f[0])

    def explain_xray(self, x: XRay, name: str = "image") -> tuple[Prediction, np.ndarray | None]:
        """The prediction and the Grad-CAM map (float32, S x S, non-negative) of its predicted class,
        from one run of the ONNX graph (:attr:`has_cam`); torch-free. An input the gate stops gets no
        map (None): there is no diagnosis to explain."""
        if not self.has_cam:
            raise ModelError(f"{self.onnx_path or self.model_dir} has no '{CAM_OUTPUT}' output; re-export the "
                             "model with 'pneumoscan export' (or load it with need_cam=True)")
        x_in = self.pre.array(x.pixels)[None]
        names = [self.outputs[0], CAM_OUTPUT] + ([FEATURES_OUTPUT] if self.ood is not None else [])
        out = self._cam_session().run(names, {"input": x_in})
        pred = self.result(name, self._adjust(softmax(out[0]))[0], *self.screen(x),
                           features=out[2][0] if len(out) > 2 else None)
        if not pred.in_scope:
            return pred, None
        return pred, np.ascontiguousarray(out[1][0, list(self.labels).index(pred.label)], dtype=np.float32)

    def _cam_session(self):
        """The session whose maps are explained: the fp32 graph (with INT8, a second session, made once)."""
        if self.precision != "int8":
            return self._session
        if self._fp32_session is None:
            self._fp32_session = _onnx_session(self._onnx_dir, self._onnx_cfg, self._threads, None, self._varying)
        return self._fp32_session

    def decode(self, data: bytes | str | os.PathLike, name: str | None = None) -> XRay:
        """Decode an upload or a file with this predictor's pixel limit (JPEG draft at the model size);
        a blank image is refused (:class:`BlankImageError`)."""
        x = load_xray(data, name=name, max_pixels=self.max_pixels, size_hint=self.prep_cfg.size)
        return check_content(x, name or (data if isinstance(data, (str, os.PathLike)) else "upload"))

    def predict_bytes(self, data: bytes, name: str = "upload") -> Prediction:
        return self.predict_xray(self.decode(data, name), name)

    def _batches(self, paths: Sequence[str | os.PathLike], batch_size: int, progress: bool,
                 errors: list[tuple[str, str]], features: bool):
        """Decode and run ``paths`` in batches: yields (names, probabilities, features or None, screens) per
        batch, and appends undecodable files to ``errors`` as (path, error)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        size = self.prep_cfg.size
        buf = np.empty((min(batch_size, len(paths)), 3, size, size), np.float32)  # every batch's input, in turn
        try:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                xs, names, screens = [], [], []
                for p in chunk:
                    try:
                        x = self.decode(p, str(p))
                    except ImageError as e:
                        errors.append((str(p), str(e)))
                        continue
                    xs.append(self.pre.resize(x.pixels))
                    names.append(str(p))
                    screens.append(self.screen(x))
                if xs:  # normalised once per batch, from uint8, into the same buffer each time
                    probs, feats = self.forward(self.pre.normalize_np(np.stack(xs), out=buf[:len(xs)]),
                                                features=features)
                    yield names, probs, feats, screens
                bar.update(len(chunk))
        finally:
            bar.close()

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 32,
                      progress: bool = False) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files in batches; returns (predictions, [(path, error)]) for undecodable files."""
        preds: list[Prediction] = []
        errors: list[tuple[str, str]] = []
        for names, probs, feats, screens in self._batches(paths, batch_size, progress, errors, self.ood is not None):
            scores = self.ood.score(feats) if self.ood is not None and feats is not None else [None] * len(names)
            for n, pr, (reasons, warns), score in zip(names, probs, screens, scores):
                preds.append(self.result(n, pr, reasons, warns, score=score))
        return preds, errors

    def arrays(self, paths: Sequence[str | os.PathLike], batch_size: int = 32, progress: bool = False,
               features: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[str], list[tuple[str, str]]]:
        """(calibrated probabilities, pooled features or None, decoded paths, [(path, error)]) of every
        decodable file, gate or not: what thresholds, prior estimates and ``pneumoscan calibrate`` fit on."""
        errors: list[tuple[str, str]] = []
        parts = list(self._batches(paths, batch_size, progress, errors, features))
        names = [n for part in parts for n in part[0]]
        probs = np.concatenate([part[1] for part in parts]) if parts else np.zeros((0, len(LABELS)))
        feats = None if not parts or parts[0][2] is None else np.concatenate([part[2] for part in parts])
        return probs, feats, names, errors

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


def int8_guard(config: dict) -> Int8Guard | None:
    """The guard an INT8 export recorded (None: an export made before it, or with ``--guard-quantile 0``)."""
    g = ((config.get("onnx") or {}).get("int8") or {}).get("guard")
    return Int8Guard.from_dict(g["margins"]) if g else None


def stop_exports() -> None:
    """Stop every export still running in a child process (a server shutting down)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        if child.poll() is None:
            log.info("stopping the ONNX export in process %d", child.pid)
            child.terminate()


def _onnx_session(model_dir: Path, config: dict, threads: int | None, name: str | None = None,
                  varying_shapes: bool = False, spinning: bool | None = None):
    name = name or onnx_name(config) or "model.onnx"
    if not (model_dir / name).is_file():
        raise ModelError(f"{model_dir} has no ONNX export; run 'pneumoscan export --model {model_dir}' first")
    path = verify_file(model_dir, name, config)
    try:
        return ort_session(path, threads=threads, varying_shapes=varying_shapes, spinning=spinning)
    except Exception as e:
        raise ModelError(f"{path} cannot be loaded by ONNX Runtime: {e}") from None


def check_model(model_dir: str | os.PathLike | None) -> Path:
    """Fail fast (:class:`ModelError`) on a missing model or a weight file whose SHA-256 does not
    match its config; returns the model directory. Loads nothing."""
    d = resolve_model_dir(model_dir)
    cfg = read_config(d)
    verify_file(d, WEIGHTS_NAME, cfg)
    for name in (onnx_name(cfg), int8_file(cfg)):
        if name and (d / name).exists():
            verify_file(d, name, cfg)
    if cfg.get("ood"):
        verify_file(d, cfg["ood"]["file"], cfg)
    return d
