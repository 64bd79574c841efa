"""Settings of evaluation, robustness and the operating point (torch-free, one default each)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..errors import DataError, PneumoscanError
from ..metrics import N_BOOT, check_method


@dataclass(frozen=True)
class EvaluateConfig:
    """How a folder is evaluated (``pneumoscan evaluate``)."""

    FLAGS: ClassVar[dict[str, str]] = {"use_cache": "--no-cache"}

    backend: Literal["auto", "onnx", "torch"] = "auto"  # auto: the feature cache for frozen models, else the fastest engine
    batch_size: int = 32  # images per inference batch
    prevalence: float | None = None  # expected share of pneumonia in your data: corrects probabilities for the prior shift
    n_boot: int = N_BOOT  # bootstrap resamples for the 95 % intervals (0 = none)
    cache: str | None = None  # feature cache for frozen-backbone models (default ~/.cache/pneumoscan/features)
    use_cache: bool = True  # False: always full-image inference, never the feature cache

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_boot < 0:
            raise DataError("batch size must be at least 1 and --n-boot 0 or more")


@dataclass(frozen=True)
class RobustnessConfig:
    """How the robustness report is run (``pneumoscan robustness``)."""

    seed: int = 0  # seed of the noise shifts
    n_boot: int = 0  # bootstrap resamples per condition (0 = none, fastest)
    backend: Literal["auto", "onnx", "torch"] = "auto"  # auto: ONNX Runtime (exported on the fly when the model has none)
    batch_size: int = 64  # images per inference batch

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_boot < 0:
            raise PneumoscanError("batch size must be at least 1 and --n-boot 0 or more")


@dataclass(frozen=True)
class ThresholdConfig:
    """How a pneumonia threshold is chosen on validation (threshold, ensemble and soup commands)."""

    method: str = "youden"  # youden: max sensitivity + specificity; sensitivity: highest threshold meeting a target
    target_sensitivity: float | None = None  # with --method sensitivity, e.g. 0.97
    force: bool = False  # use data whose manifest differs from the model's (validation may overlap training)
    batch_size: int = 32  # inference batch size

    def __post_init__(self) -> None:
        check_method(self.method, self.target_sensitivity)


@dataclass(frozen=True)
class CalibrateConfig:
    """How a model learns when not to answer, on its validation split (``pneumoscan calibrate``)."""

    FLAGS: ClassVar[dict[str, str]] = {"temperature": "--no-temperature"}

    alpha: float = 0.1  # conformal error rate: prediction sets hold the true class for 1 - alpha of exchangeable images
    conformal: Literal["lac", "aps"] = "lac"  # set score: lac (every class with p >= 1 - q) or aps (adaptive sets)
    temperature: bool = True  # fit temperature scaling (--no-temperature: sets and threshold on the raw probabilities)
    scaling: Literal["auto", "bias-corrected", "temperature"] = "auto"  # auto: lower-ECE fit of T alone vs T + class bias
    ood_quantile: float = 0.985  # share of validation images the learned score lets through (issue 14: <= 2 % flagged)
    pca_dim: int = 128  # PCA dimensions of the pooled features the Mahalanobis score works in
    force: bool = False  # use data whose manifest differs from the model's (validation may overlap training)
    batch_size: int = 32  # images per inference batch

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise PneumoscanError(f"alpha {self.alpha} must lie in (0, 0.5), e.g. 0.1")
        if not 0.5 < self.ood_quantile < 1:
            raise PneumoscanError(f"--ood-quantile {self.ood_quantile} must lie in (0.5, 1), e.g. 0.98")
        if self.pca_dim < 2 or self.batch_size < 1:
            raise PneumoscanError("--pca-dim must be at least 2 and --batch-size at least 1")
        if not self.temperature and self.scaling != "auto":  # the card would describe a scaling never fitted
            raise PneumoscanError(f"--no-temperature fits no scaling, so --scaling {self.scaling} cannot apply; drop "
                                  "one of the two")


@dataclass(frozen=True)
class ScopeSuiteConfig:
    """The out-of-scope suite (``pneumoscan scope-suite``): which inputs, how many."""

    n_transformed: int = 100  # validation X-rays rotated, inverted, cropped and blurred (each way)
    seed: int = 0  # the generated inputs and the choice of X-rays to transform
    record: bool = False  # also store the rates in the model's config.json and card
    force: bool = False  # use data whose manifest differs from the model's (validation may overlap training)

    def __post_init__(self) -> None:
        if self.n_transformed < 1:
            raise PneumoscanError(f"--n-transformed {self.n_transformed} must be at least 1")
