"""How a model is exported to ONNX and checked (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..errors import ModelError
from ..runtime import WEIGHT_RANGES

MAX_PROB_DIFF = 1e-4  # parity tolerance: max |p_torch - p_onnx| over the sample inputs
OPSETS = range(17, 22)  # opsets the torch.export-based exporter produces; others are refused, never altered


@dataclass(frozen=True)
class ExportConfig:
    """How the graph is exported and checked."""

    opset: int = 18  # ONNX opset; 18 is what the torch.export-based exporter targets by default
    samples: int = 8  # seeded sample inputs in the parity check (run as batches of 1 and of all)
    tolerance: float = MAX_PROB_DIFF  # max absolute probability difference accepted
    seed: int = 0  # seed of the sample inputs
    int8: bool = False  # also write an INT8 copy (model.int8.onnx), kept only if it passes the validation gate

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise ModelError(f"--opset {self.opset} cannot be produced by the exporter; use {OPSETS.start}-"
                             f"{OPSETS.stop - 1} (default 18)")
        if self.samples < 1 or not self.tolerance > 0:
            raise ModelError("the parity check needs at least one sample and a positive tolerance")


QUANTISERS = ("onnxruntime", "nncf")  # who makes the QDQ graph
CALIBRATIONS = ("minmax", "percentile", "entropy")  # ONNX Runtime's calibrators (CalibrationMethod)


@dataclass(frozen=True)
class QuantizeConfig:
    """How the INT8 copy of an export is made (static QDQ quantisation: NNCF or ONNX Runtime) and when it is kept."""

    FLAGS: ClassVar[dict[str, str]] = {"per_channel": "--no-per-channel", "seed": "--calibration-seed"}

    quantiser: Literal["onnxruntime", "nncf"] = "onnxruntime"  # nncf: closer to fp32, but ONNX Runtime runs it slowly
    calibration_images: int = 256  # training-split images (seeded sample) the activation ranges are fitted on
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"  # --quantiser onnxruntime: activation ranges
    percentile: float = 99.999  # with --calibration percentile: the share of values inside the range
    per_channel: bool = True  # --quantiser onnxruntime: one weight scale per output channel (NNCF always is)
    weight_range: Literal["auto", "full", "reduced"] = "auto"  # s8 weights -127..127 (full: exact only on a VNNI-class
    # CPU) or -64..64 (reduced: exact on any CPU); auto: full with VNNI, reduced without
    max_auc_drop: float = 0.003  # gate: normal-vs-pneumonia AUC on the validation split may fall this far below fp32's
    min_agreement: float = 0.99  # gate: share of validation images whose verdict must equal fp32's
    guard_quantile: float = 0.9  # images whose INT8 outputs lie within this quantile of INT8's error (on the
    # calibration images) of a decision boundary are run again in fp32; 0: INT8 answers every image alone
    seed: int = 0  # seed of the calibration sample

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ModelError(f"--calibration-images {self.calibration_images} must be at least 1 (e.g. 256)")
        if self.quantiser not in QUANTISERS:
            raise ModelError(f"--quantiser {self.quantiser!r} is unknown; use one of {', '.join(QUANTISERS)}")
        if self.weight_range not in WEIGHT_RANGES:
            raise ModelError(f"--weight-range {self.weight_range!r} is unknown; use one of {', '.join(WEIGHT_RANGES)}")
        if self.calibration not in CALIBRATIONS:
            raise ModelError(f"--calibration {self.calibration!r} is unknown; use one of {', '.join(CALIBRATIONS)}")
        if not 90.0 < self.percentile <= 100.0:
            raise ModelError(f"--percentile {self.percentile} must lie in (90, 100] (e.g. 99.999)")
        if not 0.0 <= self.guard_quantile <= 1.0:
            raise ModelError(f"--guard-quantile {self.guard_quantile} must lie in [0, 1] (default 0.9; 0: no guard)")
        if not 0.0 <= self.max_auc_drop < 1.0 or not 0.0 < self.min_agreement <= 1.0:
            raise ModelError(f"--max-auc-drop {self.max_auc_drop} must lie in [0, 1) and --min-agreement "
                             f"{self.min_agreement} in (0, 1] (defaults 0.003 and 0.99)")
