"""Train the study's top model on cached bottleneck features (PyTorch Lightning).

Global average pooling happens in the (frozen) backbone, so the head is dropout + a dense
softmax layer, trained with Adam and cross-entropy; early stopping on validation loss keeps the
best epoch; an optional step-decay schedule divides the learning rate every few epochs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from ..data.index import resolve_manifest
from ..data.manifest import Manifest, check_usable
from ..errors import DataError, PneumoscanError
from ..features.config import ExtractConfig
from ..features.extract import extract_features
from ..labels import LABELS
from ..metrics import choose_threshold, compute_metrics
from ..nets.backbones import create_backbone, default_preprocess
from ..nets.checkpoint import save_model
from ..nets.heads import Head, PneumoNet
from .callbacks import KeepBest, _lightning, fit_interruptible, progress_bar, trainer_kwargs
from .config import TrainConfig
from .record import model_record, write_history

log = logging.getLogger(__name__)


def class_weights(y: np.ndarray, n_classes: int = len(LABELS)) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 (sklearn's "balanced")."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    w = len(y) / (n_classes * np.clip(counts, 1, None))
    return torch.tensor(w, dtype=torch.float32)


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
    bar = [progress_bar()] if progress else []
    trainer = pl.Trainer(max_epochs=cfg.max_epochs, callbacks=[keep, stop, *bar], **trainer_kwargs(progress))
    fit_interruptible(trainer, module, tr, va)
    if keep.state is None:
        raise PneumoscanError("training produced no validation result; check the validation split")
    module.load_state_dict(keep.state)
    return module.head.eval(), keep.history, keep.best_epoch


def predict_head(head: Head, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head.eval()(torch.from_numpy(x)).softmax(-1).numpy()


def split_features(manifest: Manifest, cfg: TrainConfig, extract: ExtractConfig = ExtractConfig(),
                   progress: bool = False):
    """Features and labels of the train and val splits (cache-backed)."""
    samples = manifest.subset(("train", "val"))
    if not samples:
        raise DataError(f"{manifest.root} has no train/val images (only a test/ folder?)")
    manifest.check_files()
    net, weights_id = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, seed=cfg.seed)
    feats, ok, info = extract_features(samples, cfg.backbone, size=cfg.size, intensity=cfg.intensity,
                                       cache_dir=extract.cache, progress=progress, net=net, weights_id=weights_id,
                                       batch_size=extract.batch_size, workers=extract.workers, engine=extract.engine,
                                       device=extract.device, decode=extract.decode)
    y = np.array([s.target for s in samples])
    split = np.array([s.split for s in samples])
    tr, va = ok & (split == "train"), ok & (split == "val")
    info["used"] = check_usable(y[tr], y[va], len(info["failed"]), len(samples))
    return net, weights_id, info, (feats[tr], y[tr]), (feats[va], y[va])


def train(data: str | os.PathLike | Manifest, out: str | os.PathLike, cfg: TrainConfig = TrainConfig(), *,
          extract: ExtractConfig = ExtractConfig(), progress: bool = True, command: str | None = None) -> Path:
    """Index (or read) the data, extract features, train the head, write a model directory.

    The directory holds the weights, config.json, history.csv/png and manifest.csv; the CLI adds
    MODEL_CARD.md (:func:`pneumoscan.evaluate.card.write_card`).
    """
    t0 = time.time()
    manifest = data if isinstance(data, Manifest) else resolve_manifest(data, cfg.val_fraction, cfg.seed)
    net, weights_id, info, (x_tr, y_tr), (x_va, y_va) = split_features(manifest, cfg, extract, progress)
    head, history, best_epoch = fit_head(x_tr, y_tr, x_va, y_va, cfg, progress)
    p_va = predict_head(head, x_va)
    threshold, how = choose_threshold(y_va, p_va, cfg.threshold_method, cfg.target_sensitivity)
    config = model_record(
        kind="single", backbone=cfg.backbone, weights_id=weights_id, finetuned=False,
        prep=default_preprocess(cfg.backbone, cfg.size, cfg.intensity),
        head={"in_features": int(x_tr.shape[1]), "dropout": cfg.dropout}, threshold=threshold,
        threshold_method=how, y_train=y_tr, train_config=asdict(cfg), manifest=manifest,
        failed=len(info["failed"]), used=info["used"], history=history, best_epoch=best_epoch, t0=t0,
        val_metrics=compute_metrics(y_va, p_va, threshold, seed=cfg.seed), command=command)
    out = Path(out)
    save_model(out, PneumoNet(net, head), config)
    write_history(history, out)
    manifest.save(out / "manifest.csv")
    log.info("model written to %s (val AUC %.4f)", out, config["val_metrics"]["normal_vs_pneumonia"]["auc"])
    return out
