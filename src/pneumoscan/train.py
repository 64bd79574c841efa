"""Train the study's top model on cached bottleneck features (PyTorch Lightning).

Global average pooling happens in the (frozen) backbone, so the head is dropout + a dense
softmax layer, trained with Adam and cross-entropy; early stopping on validation loss keeps the
best epoch; an optional step-decay schedule divides the learning rate every few epochs.
"""
from __future__ import annotations

import copy
import csv
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from . import LABELS
from .backbones import create_backbone, default_preprocess, get_spec
from .card import write_card
from .data import Manifest, resolve_manifest
from .errors import DataError, PneumoscanError
from .features import extract_features
from .metrics import choose_threshold, compute_metrics
from .modeling import Head, PneumoNet, save_model
from .plots import plot_history

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Top-model training settings; saved in every model's config.json."""

    backbone: str = "efficientnet_lite0"  # registered backbone (pneumoscan backbones)
    size: int | None = None  # input side; None = the backbone's default
    intensity: str = "none"  # "none", "equalize" or "clahe" preprocessing
    lr: float = 2e-3  # Adam learning rate
    weight_decay: float = 0.0  # L2 penalty of Adam
    dropout: float = 0.2  # dropout before the dense layer
    batch_size: int = 256  # head-training batch size (256 with lr 2e-3: validation figures within a
    # seed's variation of 64 with 1e-3, in a quarter of the optimizer steps)
    max_epochs: int = 200  # upper bound; early stopping usually ends far sooner
    patience: int = 15  # epochs without validation-loss improvement before stopping
    schedule: str = "none"  # "none" or "step" (multiply lr by step_gamma every step_size epochs)
    step_size: int = 10  # epochs between step-decay drops
    step_gamma: float = 0.5  # step-decay factor
    class_weight: str = "balanced"  # "none" or "balanced" (inverse class frequency in the loss)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    threshold_method: str = "youden"  # "youden" or "sensitivity" (pneumonia threshold on validation)
    target_sensitivity: float | None = None  # with threshold_method="sensitivity"
    val_fraction: float = 0.2  # patient-grouped validation share when indexing a folder
    seed: int = 0  # seeds the split, the head's initialisation and the batch order
    pretrained: bool = True  # False only with --no-pretrained (random backbone, for tests)
    weights: str | None = None  # ImageNet weights file for backbones without offline weights

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        for name, v, lo, hi in (("lr", self.lr, 0, 10), ("dropout", self.dropout, 0, 1),
                                ("label smoothing", self.label_smoothing, 0, 1)):
            if not (lo <= v < hi) or (name == "lr" and v == 0):
                raise PneumoscanError(f"{name} {v} is out of range [{lo}, {hi})")
        if self.schedule not in ("none", "step"):
            raise PneumoscanError(f"schedule {self.schedule!r} is unknown; use none or step")
        if self.class_weight not in ("none", "balanced"):
            raise PneumoscanError(f"class weight {self.class_weight!r} is unknown; use none or balanced")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise PneumoscanError("batch size, max epochs and patience must be at least 1")


def class_weights(y: np.ndarray, n_classes: int = len(LABELS)) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 (sklearn's "balanced")."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    w = len(y) / (n_classes * np.clip(counts, 1, None))
    return torch.tensor(w, dtype=torch.float32)


def _lightning():
    import lightning.pytorch as pl
    return pl


def make_head_module(head: Head, cfg: TrainConfig, weight: torch.Tensor | None):
    pl = _lightning()

    class HeadModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = head
            self.loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

        # Per-step self.log costs about 2 ms (Lightning's result collection), more than the step
        # itself on a 1280 x 3 head: sums are kept here and logged once per epoch instead.
        def on_train_epoch_start(self) -> None:
            self.sums = {"train": torch.zeros(3), "val": torch.zeros(3)}  # loss x n, correct, n

        def _step(self, batch, split: str):
            x, y = batch
            logits = self.head(x)
            loss = self.loss(logits, y)
            with torch.no_grad():
                self.sums[split] += torch.stack([loss.detach() * len(y), (logits.argmax(-1) == y).sum(),
                                                 torch.tensor(float(len(y)))])
            return loss

        def training_step(self, batch, _):
            return self._step(batch, "train")

        def validation_step(self, batch, _):
            self._step(batch, "val")

        def on_validation_epoch_end(self) -> None:  # training's epoch is complete when validation runs
            for split, (loss, correct, n) in self.sums.items():
                if n > 0:
                    self.log(f"{split}_loss", loss / n, prog_bar=True)
                    self.log(f"{split}_acc", correct / n, prog_bar=True)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            if cfg.schedule == "step":
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.step_gamma)
                return {"optimizer": opt, "lr_scheduler": sched}
            return opt

    return HeadModule()


class KeepBest:
    """Lightning callback factory: keeps the best state in memory and the per-epoch history."""

    @staticmethod
    def create(monitor: str = "val_loss"):
        pl = _lightning()

        class _KeepBest(pl.Callback):
            def __init__(self) -> None:
                self.best = float("inf")
                self.best_epoch = -1
                self.state: dict | None = None
                self.history: list[dict] = []
                self.epoch_lr = float("nan")

            def on_train_epoch_start(self, trainer, module) -> None:
                # the lr this epoch trains with; by validation's end an epoch-interval scheduler has stepped
                self.epoch_lr = float(trainer.optimizers[0].param_groups[0]["lr"])

            def on_validation_end(self, trainer, module) -> None:  # after every epoch-end log
                if trainer.sanity_checking:
                    return
                m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("_loss", "_acc"))}
                m["epoch"] = trainer.current_epoch + 1
                m["lr"] = self.epoch_lr
                self.history.append(m)
                if m.get(monitor, float("inf")) < self.best:
                    self.best, self.best_epoch = m[monitor], m["epoch"]
                    self.state = copy.deepcopy(module.state_dict())

            def on_train_epoch_end(self, trainer, module) -> None:
                # train metrics arrive after validation in Lightning's order: patch the last row
                if self.history and self.history[-1]["epoch"] == trainer.current_epoch + 1:
                    for k, v in trainer.callback_metrics.items():
                        if k.startswith("train_"):
                            self.history[-1][k] = float(v)

        return _KeepBest()


def trainer_kwargs(progress: bool) -> dict:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                deterministic=True)


def fit_head(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, cfg: TrainConfig,
             progress: bool = True) -> tuple[Head, list[dict], int]:
    """Train the head with early stopping; returns (best head, history, best epoch)."""
    pl = _lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    head = Head(x_tr.shape[1], len(LABELS), cfg.dropout)
    weight = class_weights(y_tr) if cfg.class_weight == "balanced" else None
    module = make_head_module(head, cfg, weight)
    g = torch.Generator().manual_seed(cfg.seed)
    # whole batches by one index each (a TensorDataset takes a list of indices), not sample by sample
    train_set = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long())
    batches = BatchSampler(RandomSampler(train_set, generator=g), cfg.batch_size, drop_last=False)
    tr = DataLoader(train_set, sampler=batches, batch_size=None)
    va_set = TensorDataset(torch.from_numpy(x_va), torch.from_numpy(y_va).long())
    va = DataLoader(va_set, sampler=BatchSampler(SequentialSampler(va_set), 1024, drop_last=False), batch_size=None)
    keep = KeepBest.create()
    stop = pl.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min")
    trainer = pl.Trainer(max_epochs=cfg.max_epochs, callbacks=[keep, stop], **trainer_kwargs(progress))
    trainer.fit(module, tr, va)
    if keep.state is None:
        raise PneumoscanError("training produced no validation result; check the validation split")
    module.load_state_dict(keep.state)
    return module.head.eval(), keep.history, keep.best_epoch


def predict_head(head: Head, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head.eval()(torch.from_numpy(x)).softmax(-1).numpy()


def write_history(history: list[dict], out: Path) -> None:
    keys = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    tmp = out / ".history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "history.csv")
    plot_history(history, out / "history.png")


def split_features(manifest: Manifest, cfg: TrainConfig, cache_dir, progress: bool, batch_size: int = 64,
                   workers: int | None = None):
    """Features and labels of the train and val splits (cache-backed)."""
    samples = manifest.subset(("train", "val"))
    if not samples:
        raise DataError(f"{manifest.root} has no train/val images (only a test/ folder?)")
    net, weights_id = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, seed=cfg.seed)
    feats, ok, info = extract_features(samples, cfg.backbone, size=cfg.size, intensity=cfg.intensity,
                                       cache_dir=cache_dir, progress=progress, net=net, weights_id=weights_id,
                                       batch_size=batch_size, workers=workers)
    y = np.array([s.target for s in samples])
    split = np.array([s.split for s in samples])
    tr, va = ok & (split == "train"), ok & (split == "val")
    if tr.sum() == 0 or va.sum() == 0:
        raise DataError("the train or validation split is empty; index more images or change --val-fraction")
    return net, weights_id, info, (feats[tr], y[tr]), (feats[va], y[va])


def train(data: str | os.PathLike | Manifest, out: str | os.PathLike, cfg: TrainConfig = TrainConfig(), *,
          cache_dir: str | os.PathLike | None = None, progress: bool = True, command: str | None = None,
          batch_size: int = 64, workers: int | None = None) -> Path:
    """Index (or read) the data, extract features, train the head, write a model directory."""
    t0 = time.time()
    manifest = data if isinstance(data, Manifest) else resolve_manifest(data, cfg.val_fraction, cfg.seed)
    net, weights_id, info, (x_tr, y_tr), (x_va, y_va) = split_features(manifest, cfg, cache_dir, progress,
                                                                       batch_size, workers)
    head, history, best_epoch = fit_head(x_tr, y_tr, x_va, y_va, cfg, progress)
    p_va = predict_head(head, x_va)
    threshold, how = choose_threshold(y_va, p_va, cfg.threshold_method, cfg.target_sensitivity)
    val_metrics = compute_metrics(y_va, p_va, threshold, n_boot=1000, seed=cfg.seed)
    prep = default_preprocess(cfg.backbone, cfg.size, cfg.intensity)
    config = {
        "name": cfg.backbone,
        "kind": "single",
        "backbone": cfg.backbone,
        "timm_name": get_spec(cfg.backbone).timm_name,
        "weights_source": weights_id,
        "finetuned": False,
        "preprocess": prep.to_dict(),
        "labels": list(LABELS),
        "head": {"in_features": int(x_tr.shape[1]), "dropout": cfg.dropout},
        "threshold": threshold,
        "threshold_method": how,
        "train_prior": (np.bincount(y_tr, minlength=len(LABELS)) / len(y_tr)).tolist(),
        "train_config": asdict(cfg),
        "command": command or " ".join(sys.argv),
        "manifest_sha256": manifest.digest(),
        "data": {"root": manifest.root, "counts": manifest.counts(), "skipped": len(manifest.skipped),
                 "failed_to_decode": len(info["failed"])},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(time.time() - t0, 1),
        "hardware": _hardware(),
        "val_metrics": val_metrics,
    }
    out = Path(out)
    model = PneumoNet(net, head)
    save_model(out, model, config)
    write_history(history, out)
    manifest.save(out / "manifest.csv")
    log.info("model written to %s (val AUC %.4f)", out, val_metrics["normal_vs_pneumonia"]["auc"])
    write_card(out)
    return out


def _hardware() -> dict:
    import platform
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
