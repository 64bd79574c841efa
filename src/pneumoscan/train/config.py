"""The settings of everything that trains or combines models: frozen dataclasses, one default each.

Torch-free, so that the command line checks every option before anything heavy is imported; each
config is saved in the model's config.json, and the CLI's options are generated from these fields
(:mod:`pneumoscan.cli.flags`).
"""
from __future__ import annotations

import itertools
import math
import typing
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar, Literal

from ..data.index import VAL_FRACTION, check_val_fraction
from ..errors import ConfigError
from ..metrics import check_method
from ..nets.registry import DEFAULT_BACKBONE, get_spec
from ..preprocess import PreprocessConfig

DROPOUT = 0.2  # dropout before the dense layer of the study's head


def _check_choices(cfg, *names: str) -> None:
    """Each named field's value must be one of its ``Literal`` annotation's values."""
    hints = typing.get_type_hints(type(cfg))
    for name in names:
        allowed = typing.get_args(hints[name])
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name.replace('_', ' ')} {getattr(cfg, name)!r} is unknown; use one of "
                                  + ", ".join(map(str, allowed)))


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; 0 switches a transform off."""

    rotate: float = 10.0  # max rotation in degrees
    scale: float = 0.10  # max relative zoom in or out
    translate: float = 0.06  # max shift as a fraction of the side
    brightness: float = 0.10  # max additive shift on [0, 1] intensities
    contrast: float = 0.20  # max relative contrast change around the image mean
    gamma: float = 0.25  # max |log gamma|: gamma drawn log-uniformly in [e^-g, e^g]
    flip: bool = False  # horizontal flip (hearts are on the left: off by default)
    blur: float = 0.0  # max Gaussian blur sigma in px (drawn uniformly per image; 0 = off)
    noise: float = 0.0  # max Gaussian pixel-noise sigma on [0, 1] intensities (drawn per image; 0 = off)
    erase: float = 0.0  # probability of erasing one random rectangle (2-20 % of the image) per image

    # the largest strength each transform means anything at (a negative one crashed torch's sampler mid-run)
    LIMITS: ClassVar[dict[str, float]] = {"rotate": 180.0, "scale": 0.9, "translate": 0.5, "brightness": 1.0,
                                          "contrast": 0.9, "gamma": 2.0, "blur": 20.0, "noise": 1.0, "erase": 1.0}

    def __post_init__(self) -> None:
        for name, high in self.LIMITS.items():
            v = getattr(self, name)
            if not 0 <= v <= high:  # nan fails too
                raise ConfigError(f"--{name} {v} must lie in [0, {high:g}] (0 switches it off)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Top-model training settings; saved in every model's config.json."""

    FLAGS: ClassVar[dict[str, str]] = {"batch_size": "--head-batch-size", "max_epochs": "--epochs",
                                       "pretrained": "--no-pretrained"}

    backbone: str = DEFAULT_BACKBONE  # registered backbone (see 'pneumoscan backbones')
    size: int | None = None  # input side in px; None = the backbone's default
    intensity: Literal["none", "equalize", "clahe"] = "none"  # intensity normalisation after resizing
    lr: float = 2e-3  # Adam learning rate
    weight_decay: float = 0.0  # L2 penalty of Adam
    dropout: float = DROPOUT  # dropout before the dense layer
    batch_size: int = 256  # head-training batch size (256 with lr 2e-3: validation figures within a
    # seed's variation of 64 with 1e-3, in a quarter of the optimizer steps)
    max_epochs: int = 200  # upper bound on epochs; early stopping usually ends far sooner
    patience: int = 15  # epochs without validation-loss improvement before stopping
    schedule: Literal["none", "step"] = "none"  # step: multiply lr by step_gamma every step_size epochs
    step_size: int = 10  # epochs between step-decay drops
    step_gamma: float = 0.5  # step-decay factor
    class_weight: Literal["none", "balanced"] = "balanced"  # inverse class frequency in the loss
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    threshold_method: Literal["youden", "sensitivity"] = "youden"  # how the pneumonia threshold is chosen on validation
    target_sensitivity: float | None = None  # with threshold method sensitivity, e.g. 0.97
    val_fraction: float = VAL_FRACTION  # patient-grouped validation share when indexing a folder
    seed: int = 0  # seeds the split, the head's initialisation and the batch order
    pretrained: bool = True  # False: random backbone weights (tests only; results are meaningless)
    weights: str | None = None  # ImageNet weights file (.pth/.safetensors) for backbones without offline weights

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.size is not None:
            PreprocessConfig(size=self.size)  # validates the side
        if not 0 < self.lr < 10:
            raise ConfigError(f"learning rate {self.lr} must be above 0 and below 10 (e.g. 2e-3)")
        for name, v in (("dropout", self.dropout), ("label smoothing", self.label_smoothing)):
            if not 0 <= v < 1:
                raise ConfigError(f"{name} {v} must lie in [0, 1)")
        if self.weight_decay < 0 or self.step_gamma <= 0:
            raise ConfigError("weight decay must be >= 0 and the step-decay factor > 0")
        _check_choices(self, "intensity", "schedule", "class_weight", "threshold_method")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1 or self.step_size < 1:
            raise ConfigError("head batch size, epochs, patience and step size must be at least 1")
        check_val_fraction(self.val_fraction)
        check_method(self.threshold_method, self.target_sensitivity)


PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def check_machine(accelerator: str, devices, strategy: str, precision: str = "32-true") -> None:
    """Refuse, before any data is read, what this machine cannot run: a GPU accelerator without a
    GPU, more devices than it has, an unknown strategy (a typo would otherwise start DDP workers)."""
    import torch
    from lightning.pytorch.strategies import StrategyRegistry

    from ..runtime import cpu_count

    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"--accelerator {accelerator} but this machine has no GPU; use cpu or auto")
    on_gpu = gpus > 0 and accelerator != "cpu"
    have = gpus if on_gpu else cpu_count()
    what = "GPUs" if on_gpu else "CPU cores (one DDP process each)"
    if isinstance(devices, int) and devices > have:
        raise ConfigError(f"--devices {devices} but this machine has {have} {what}; use at most {have}")
    known = {"auto", *StrategyRegistry.available_strategies()}
    if strategy not in known:
        raise ConfigError(f"strategy {strategy!r} is unknown to Lightning; use one of "
                          + ", ".join(sorted(s for s in known if "offload" not in s)[:12]) + ", ...")
    if precision.startswith(("16", "bf16")) and not on_gpu and precision != "bf16-mixed":
        raise ConfigError(f"--precision {precision} needs a GPU; use 32-true or bf16-mixed on a CPU")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings; saved in the model's config.json."""

    FLAGS: ClassVar[dict[str, str]] = {"pretrained": "--no-pretrained"}

    backbone: str = DEFAULT_BACKBONE  # registered backbone (see 'pneumoscan backbones')
    size: int | None = None  # input side in px; None = the backbone's default
    intensity: Literal["none", "equalize", "clahe"] = "none"  # intensity normalisation after resizing
    epochs: int = 10  # training epochs (the best EMA epoch on validation loss is kept)
    batch_size: int = 32  # batch size per device
    lr: float = 3e-4  # peak AdamW learning rate of the backbone
    head_lr_mult: float = 10.0  # the head learns this many times faster (a fresh head needs it; LP-FT: 1)
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms and biases)
    warmup_epochs: float = 1.0  # linear warm-up length in epochs
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"  # learning-rate schedule after the warm-up
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    class_weight: Literal["none", "balanced"] = "balanced"  # inverse class frequency in the loss
    dropout: float = DROPOUT  # dropout before the dense layer
    ema_decay: float = 0.998  # EMA of the weights per step (the EMA weights are validated and kept); 0 = off
    unfreeze: str = "all"  # "all", or the backbone child from which on to train (earlier ones frozen)
    freeze_bn: bool = False  # keep batch-norm statistics at their initial values (LP-FT: the features the head was fitted on)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # batch augmentation strengths
    patience: int = 0  # early stopping on validation loss after this many epochs without gain; 0 = off
    threshold_method: Literal["youden", "sensitivity"] = "youden"  # how the pneumonia threshold is chosen on validation
    target_sensitivity: float | None = None  # with threshold method sensitivity, e.g. 0.97
    val_fraction: float = VAL_FRACTION  # patient-grouped validation share when indexing a folder
    seed: int = 0  # seeds the split, the initialisation, the batch order and the augmentation
    pretrained: bool = True  # False: random initial weights (tests only; results are meaningless)
    weights: str | None = None  # ImageNet weights file (.pth/.safetensors) for backbones without offline weights
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"  # Lightning accelerator
    devices: int | Literal["auto"] = 1  # devices per node ("auto": all of them)
    num_nodes: int = 1  # machines (DDP)
    strategy: str = "auto"  # Lightning strategy: auto, ddp, ddp_spawn, fsdp, ...
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16-mixed on a GPU, 32-true on a CPU
    max_steps: int = -1  # stop after this many optimizer steps (smoke tests); -1 = no limit
    workers: int = 2  # decoding worker processes
    init_from: str | None = None  # model dir whose weights start the run (LP-FT: a 'pneumoscan train' head)
    layer_decay: float = 1.0  # layer-wise lr decay: each earlier backbone block learns this times slower (1 = off)
    loss: Literal["ce", "gce"] = "ce"  # ce, or gce (generalised cross-entropy: tolerates label noise)
    gce_q: float = 0.7  # GCE exponent q in (0, 1]: 1 = MAE (most tolerant), towards 0 = cross-entropy
    mixup: float = 0.0  # mixup Beta(alpha, alpha) on batches, e.g. 0.2; 0 = off
    cutmix: float = 0.0  # cutmix Beta(alpha, alpha) on batches, e.g. 1.0; 0 = off (with mixup: one per batch)
    drop_noisy: float = 0.0  # share of each class's training images dropped as likely mislabelled, e.g. 0.05
    augment_order: Literal["augment-then-intensity", "intensity-then-augment"] = "augment-then-intensity"
    # augment, then normalise intensity (noise and blur reach CLAHE as in real films); the shipped v0.1 members:
    # intensity-then-augment

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.size is not None:
            PreprocessConfig(size=self.size)  # validates the side
        if self.epochs < 1 or self.batch_size < 1 or self.num_nodes < 1:
            raise ConfigError("epochs, batch size and nodes must be at least 1")
        if self.workers < 0:
            raise ConfigError(f"workers {self.workers} must be 0 or more")
        if not 0 < self.lr < 1:
            raise ConfigError(f"learning rate {self.lr} must lie in (0, 1), e.g. 3e-4")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"EMA decay {self.ema_decay} must lie in [0, 1)")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("label smoothing and dropout must lie in [0, 1)")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer decay {self.layer_decay} must lie in (0, 1] (1 = off, e.g. 0.8)")
        if not 0 < self.gce_q <= 1:
            raise ConfigError(f"GCE q {self.gce_q} must lie in (0, 1] (e.g. 0.7)")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("mixup and cutmix alphas must be 0 (off) or positive (e.g. 0.2)")
        if not 0 <= self.drop_noisy < 0.5:
            raise ConfigError(f"drop-noisy share {self.drop_noisy} must lie in [0, 0.5) (e.g. 0.05)")
        check_val_fraction(self.val_fraction)
        _check_choices(self, "intensity", "schedule", "class_weight", "accelerator", "precision", "loss",
                       "augment_order", "threshold_method")
        if not (self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1)):
            raise ConfigError(f"devices {self.devices!r} must be a positive integer or 'auto'")
        check_method(self.threshold_method, self.target_sensitivity)

    def check_machine(self) -> None:
        """Refuse, before any data is read, what this machine cannot run (see :func:`check_machine`)."""
        check_machine(self.accelerator, self.devices, self.strategy, self.precision)


@dataclass(frozen=True)
class CompareConfig:
    """The grid of a comparison; saved in compare.json."""

    backbones: tuple[str, ...] = (DEFAULT_BACKBONE,)  # registered backbones to compare, comma-separated
    # (the study's five: resnet50,inception_v3,xception,inception_resnet_v2,vgg16)
    sizes: tuple[int | None, ...] = (None,)  # image sides, comma-separated, e.g. 224,299,320; none = each backbone's own
    lrs: tuple[float, ...] = (TrainConfig.lr,)  # Adam learning rates, comma-separated
    dropouts: tuple[float, ...] = (TrainConfig.dropout,)  # dropouts before the dense layer, comma-separated
    schedules: tuple[str, ...] = (TrainConfig.schedule,)  # learning-rate schedules, comma-separated: none,step
    select_by: Literal["loss", "auc"] = "loss"  # validation criterion: loss (the early-stopping loss, lower wins) or auc
    base: TrainConfig = field(default_factory=TrainConfig)  # everything else (epochs, patience, class weight, seed...)
    weights: dict[str, str] = field(default_factory=dict)  # backbone -> ImageNet weights file (--weights)

    def __post_init__(self) -> None:
        for name, vals in (("backbones", self.backbones), ("sizes", self.sizes), ("learning rates", self.lrs),
                           ("dropouts", self.dropouts), ("schedules", self.schedules)):
            if not vals:
                raise ConfigError(f"the list of {name} to compare is empty; give at least one value")
        for b in self.backbones:
            get_spec(b)
        for b in self.weights:
            if b not in self.backbones:
                raise ConfigError(f"--weights names backbone {b!r}, which is not among --backbones")
        _check_choices(self, "select_by")
        for b, s, lr, d, sch in self.grid():  # validates every point now, not after an hour of work
            self.train_config(b, s, lr, d, sch)

    def grid(self) -> list[tuple]:
        return list(itertools.product(self.backbones, self.sizes, self.lrs, self.dropouts, self.schedules))

    def train_config(self, backbone: str, size: int | None, lr: float, dropout: float, schedule: str) -> TrainConfig:
        return replace(self.base, backbone=backbone, size=size, lr=lr, dropout=dropout, schedule=schedule,
                       weights=self.weights.get(backbone, self.base.weights))


@dataclass(frozen=True)
class EnsembleConfig:
    """How members are combined (``pneumoscan ensemble`` / ``pneumoscan soup``)."""

    tta: Literal["none", "flip"] = "none"  # ensemble: also average the horizontally flipped image (inside the graph)
    coefficients: tuple[float, ...] | None = None  # soup: one weight per model, comma-separated (default uniform)
    max_auc_drop: float = 0.003  # soup: normal-vs-pneumonia AUC on validation may fall at most this below its weakest member's
    max_accuracy_drop: float = 0.01  # soup: 3-class validation accuracy may fall at most this below its weakest member's

    def __post_init__(self) -> None:
        _check_choices(self, "tta")
        w = self.coefficients
        if w is not None and not (all(math.isfinite(v) and v >= 0 for v in w) and sum(w) > 0):
            raise ConfigError(f"--coefficients {','.join(f'{v:g}' for v in w)}: give non-negative numbers, one per "
                              "model, not all 0 (e.g. 0.5,0.5)")
        for name in ("max_auc_drop", "max_accuracy_drop"):
            v = getattr(self, name)
            if not -1 <= v <= 1:  # nan fails too; negative: the soup must beat its weakest member by that much
                raise ConfigError(f"--{name.replace('_', '-')} {v} must lie in [-1, 1], e.g. 0.003")

    def check_members(self, n: int) -> None:
        """Refuse, before any work, weights that do not match the ``n`` models given."""
        if self.coefficients is not None and len(self.coefficients) != n:
            raise ConfigError(f"--coefficients has {len(self.coefficients)} numbers for {n} models; give one per model")

_MEMBER_DROP = ("files",)  # per-directory bookkeeping that means nothing inside the ensemble




def _ssl_augment() -> AugmentConfig:
    """Stronger views than for supervised training: SimCLR learns what survives them."""
    return AugmentConfig(rotate=15.0, scale=0.3, translate=0.12, brightness=0.2, contrast=0.4, gamma=0.4,
                         blur=1.5, noise=0.03, erase=0.3)


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining of a backbone on the training X-rays (SimCLR, lightly's loss)."""

    FLAGS: ClassVar[dict[str, str]] = {"pretrained": "--no-pretrained"}

    backbone: str = DEFAULT_BACKBONE  # registered backbone (see 'pneumoscan backbones'), started from ImageNet
    size: int | None = None  # input side in px; None = the backbone's default
    intensity: Literal["none", "equalize", "clahe"] = "none"  # intensity normalisation, after the augmentation
    epochs: int = 100  # passes over the training split's images (a GPU job: about 100 to 200)
    batch_size: int = 256  # images per step; each gives two views, the rest of the batch are the negatives
    lr: float = 1e-3  # AdamW learning rate (cosine after a one-epoch warm-up)
    weight_decay: float = 1e-4  # AdamW weight decay
    temperature: float = 0.2  # NT-Xent temperature
    projection_dim: int = 128  # output side of the projection head (thrown away after pretraining)
    augment: AugmentConfig = field(default_factory=_ssl_augment)  # the two random views of each image
    val_fraction: float = VAL_FRACTION  # when DATA is a folder: the split whose validation images are left out
    seed: int = 0  # seeds the views and the batch order
    pretrained: bool = True  # False: start from random weights instead of ImageNet (tests only)
    weights: str | None = None  # ImageNet weights file for backbones without offline weights
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"  # Lightning accelerator
    devices: int | Literal["auto"] = 1  # devices per node
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16-mixed on a GPU, 32-true on a CPU
    max_steps: int = -1  # stop after this many steps (smoke tests); -1 = no limit
    max_minutes: float | None = None  # stop after this long and keep the weights reached (a lent GPU's budget)
    workers: int = 2  # decoding worker processes

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max minutes {self.max_minutes} must be positive")
        if self.size is not None:
            PreprocessConfig(size=self.size)
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("epochs must be at least 1 and the batch at least 2 images (negatives are needed)")
        if not 0 < self.lr < 1 or not self.temperature > 0 or self.projection_dim < 1:
            raise ConfigError("the learning rate must lie in (0, 1), the temperature and projection size be positive")
        check_val_fraction(self.val_fraction)
        _check_choices(self, "intensity", "accelerator", "precision")


@dataclass(frozen=True)
class QatConfig:
    """Quantisation-aware training by distillation (``pneumoscan qat``): a copy whose INT8 graph keeps the
    teacher's verdicts."""

    epochs: int = 3  # passes over the training split (about 4 minutes each for Lite0 at 224 px on 2 CPU cores)
    lr: float = 5e-5  # peak AdamW learning rate (warm-up over a tenth of the steps, then cosine), from the teacher's weights
    batch_size: int = 32  # images per step and device
    fp32_share: float = 0.5  # share of the steps run without fake quantisation (the fp32 graph follows the teacher too)
    feature_weight: float = 0.0  # weight of the pooled features' squared distance from the teacher's, in the metric of
    # the out-of-scope gate (per dimension), beside the KL loss; 0: off (needs a calibrated teacher)
    calibration_images: int = 256  # training images (seeded sample) the ranges are fitted on, as export --int8 fits them
    weight_range: Literal["auto", "full", "reduced"] = "auto"  # s8 weights emulated as export --int8 --weight-range
    # makes them: full (-127..127, VNNI CPUs) or reduced (-64..64, exact on any CPU); auto: by this CPU, as export does
    seed: int = 0  # seeds the calibration sample, the batch order and the fp32 steps
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"  # Lightning accelerator
    devices: int | Literal["auto"] = 1  # devices per node ("auto": all of them)
    strategy: str = "auto"  # Lightning strategy: auto, ddp, ...
    max_steps: int = -1  # stop after this many optimizer steps (smoke tests); -1 = no limit
    workers: int = 2  # decoding worker processes

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.calibration_images < 1:
            raise ConfigError("epochs, batch size and calibration images must be at least 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"learning rate {self.lr} must lie in (0, 1), e.g. 5e-5")
        if not 0 <= self.fp32_share < 1:
            raise ConfigError(f"fp32 share {self.fp32_share} must lie in [0, 1) (e.g. 0.5)")
        if not 0 <= self.feature_weight < 1e3:
            raise ConfigError(f"feature weight {self.feature_weight} must lie in [0, 1000) (e.g. 0.02; 0 = off)")
        if self.workers < 0:
            raise ConfigError(f"workers {self.workers} must be 0 or more")
        _check_choices(self, "accelerator", "weight_range")
        if not (self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1)):
            raise ConfigError(f"devices {self.devices!r} must be a positive integer or 'auto'")

    def check_machine(self) -> None:
        """Refuse, before any data is read, what this machine cannot run (see :func:`check_machine`)."""
        check_machine(self.accelerator, self.devices, self.strategy)
