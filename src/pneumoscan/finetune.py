"""End-to-end fine-tuning of a backbone + head with PyTorch Lightning.

AdamW with linear warm-up then cosine decay (or one-cycle), label smoothing, class weighting,
batch augmentation on the device (:mod:`pneumoscan.augment`), an exponential moving average of
the weights (Lightning's ``EMAWeightAveraging``; the averaged weights are the ones validated and
kept), bf16 mixed precision on GPU. ``devices``, ``num_nodes`` and ``strategy`` go straight to
Lightning's ``Trainer``, so the same code runs on one CPU, several GPUs, or DDP across machines.
The output is the same model directory format as :func:`pneumoscan.train.train`.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import LABELS
from .augment import AugmentConfig, BatchAugment
from .backbones import create_backbone, default_preprocess, get_spec
from .card import write_card
from .data import Manifest, resolve_manifest
from .errors import DataError, PneumoscanError
from .features import ImageFiles, _collate
from .metrics import choose_threshold, compute_metrics
from .modeling import Head, PneumoNet, save_model
from .preprocess import PreprocessConfig
from .train import KeepBest, _hardware, class_weights, write_history

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings; saved in the model's config.json."""

    backbone: str = "efficientnet_lite0"  # registered backbone
    size: int | None = None  # input side; None = the backbone's default
    intensity: str = "none"  # "none", "equalize" or "clahe"
    epochs: int = 10  # training epochs (the best EMA epoch on validation loss is kept)
    batch_size: int = 32  # per device
    lr: float = 3e-4  # peak AdamW learning rate of the backbone
    head_lr_mult: float = 10.0  # the freshly initialised head learns this much faster
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms and biases)
    warmup_epochs: float = 1.0  # linear warm-up length
    schedule: str = "cosine"  # "cosine" (after warm-up), "onecycle" or "constant"
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    class_weight: str = "balanced"  # "none" or "balanced"
    dropout: float = 0.2  # dropout before the dense layer
    ema_decay: float = 0.998  # EMA of the weights per step; 0 disables
    unfreeze: str = "all"  # "all", or the backbone child from which on to train (earlier ones frozen)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # batch augmentation strengths
    patience: int = 0  # early stopping on validation loss; 0 = run all epochs
    threshold_method: str = "youden"  # pneumonia threshold on validation
    target_sensitivity: float | None = None  # with threshold_method="sensitivity"
    val_fraction: float = 0.2  # patient-grouped validation share when indexing a folder
    seed: int = 0  # split, init, batch order and augmentation
    pretrained: bool = True  # False only with --no-pretrained (tests)
    weights: str | None = None  # ImageNet weights file for backbones without offline weights
    accelerator: str = "auto"  # Lightning accelerator: auto, cpu, gpu
    devices: int | str = 1  # devices per node ("auto" takes all)
    num_nodes: int = 1  # machines (DDP)
    strategy: str = "auto"  # Lightning strategy: auto, ddp, ddp_spawn, ...
    precision: str = "auto"  # "auto" = bf16-mixed on GPU, 32-true on CPU
    max_steps: int = -1  # stop after this many optimizer steps (tests); -1 = no limit
    workers: int = 2  # data-loading workers per device

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.epochs < 1 or self.batch_size < 1:
            raise PneumoscanError("epochs and batch size must be at least 1")
        if not 0 < self.lr < 1:
            raise PneumoscanError(f"learning rate {self.lr} must lie in (0, 1)")
        if self.schedule not in ("cosine", "onecycle", "constant"):
            raise PneumoscanError(f"schedule {self.schedule!r} is unknown; use cosine, onecycle or constant")
        if not 0 <= self.ema_decay < 1:
            raise PneumoscanError(f"EMA decay {self.ema_decay} must lie in [0, 1)")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise PneumoscanError("label smoothing and dropout must lie in [0, 1)")


def set_trainable(backbone: nn.Module, unfreeze: str) -> list[str]:
    """Freeze the backbone's children before ``unfreeze`` (a child name); returns the trained ones."""
    names = [n for n, _ in backbone.named_children()]
    if unfreeze == "all":
        return names
    if unfreeze not in names:
        raise PneumoscanError(f"--unfreeze {unfreeze!r} is not a child of this backbone; choose all or one of "
                              + ", ".join(names))
    start = names.index(unfreeze)
    for i, (n, child) in enumerate(backbone.named_children()):
        for p in child.parameters():
            p.requires_grad_(i >= start)
    return names[start:]


def load_images(samples, prep: PreprocessConfig, workers: int, progress: bool) -> tuple[torch.Tensor, np.ndarray, list]:
    """All images decoded and resized once into a uint8 tensor (N, S, S); failures listed."""
    from tqdm.auto import tqdm

    out = torch.zeros((len(samples), prep.size, prep.size), dtype=torch.uint8)
    ok = np.zeros(len(samples), bool)
    failed = []
    loader = DataLoader(ImageFiles([s.path for s in samples], prep), batch_size=64, num_workers=workers,
                        collate_fn=_collate)
    with tqdm(total=len(samples), desc="decode", unit="img", disable=not progress) as bar:
        for idx, xs, bad in loader:
            if len(idx):
                out[idx] = xs
                ok[idx.numpy()] = True
            failed += [(samples[j].path, e) for j, e in bad]
            bar.update(len(idx) + len(bad))
    return out, ok, failed


def make_module(net: PneumoNet, cfg: FinetuneConfig, prep: PreprocessConfig, weight: torch.Tensor | None):
    import lightning.pytorch as pl

    class FinetuneModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.augment = BatchAugment(cfg.augment)
            self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)
            self.train_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
            self.val_loss = nn.CrossEntropyLoss()

        def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
            x = x_u8.float().div_(255.0).unsqueeze(1)
            x = self.augment(x)
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
            return self.net(x.contiguous(memory_format=torch.channels_last))

        def training_step(self, batch, _):
            x, y = batch
            self.augment.train()
            logits = self(x)
            loss = self.train_loss(logits, y)
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
            self.log("train_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            self.augment.eval()
            logits = self(x)
            self.log("val_loss", self.val_loss(logits.float(), y), on_epoch=True, sync_dist=True, prog_bar=True)
            self.log("val_acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, sync_dist=True, prog_bar=True)

        def configure_optimizers(self):
            decay, no_decay, head = [], [], []
            for n, p in self.net.named_parameters():
                if not p.requires_grad:
                    continue
                if n.startswith("head."):
                    head.append(p)
                elif p.ndim <= 1:
                    no_decay.append(p)
                else:
                    decay.append(p)
            groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                      {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
                      {"params": head, "weight_decay": 0.0, "lr": cfg.lr * cfg.head_lr_mult}]
            opt = torch.optim.AdamW([g for g in groups if g["params"]])
            total = max(1, int(self.trainer.estimated_stepping_batches))
            if cfg.schedule == "onecycle":
                sched = torch.optim.lr_scheduler.OneCycleLR(
                    opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                    pct_start=min(0.5, max(0.05, cfg.warmup_epochs / cfg.epochs)))
            else:
                warm = max(1, int(total * cfg.warmup_epochs / cfg.epochs))

                def factor(step: int) -> float:
                    if step < warm:
                        return (step + 1) / warm
                    if cfg.schedule == "constant":
                        return 1.0
                    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

                sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return FinetuneModule()


def _ema_callback(decay: float):
    """Lightning's EMA callback (2.6+), or the same thing built on WeightAveraging (2.5)."""
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging
        return EMAWeightAveraging(decay=decay)
    except ImportError:
        from lightning.pytorch.callbacks import WeightAveraging
        from torch.optim.swa_utils import get_ema_multi_avg_fn
        return WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(decay))


def _precision(cfg: FinetuneConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


@torch.inference_mode()
def predict_u8(module, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Probabilities of the (EMA) module for uint8 images, no augmentation."""
    module.eval()
    device = next(module.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(module(images[i:i + batch_size].to(device)).float().softmax(-1).cpu())
    return torch.cat(out).numpy()


def finetune(data: str | os.PathLike | Manifest, out: str | os.PathLike, cfg: FinetuneConfig = FinetuneConfig(), *,
             progress: bool = True, command: str | None = None) -> Path | None:
    """Fine-tune on the train split, select on val, write a model directory (rank 0 only).

    Returns the model directory on the process that wrote it, ``None`` on other DDP ranks.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping

    t0 = time.time()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    manifest = data if isinstance(data, Manifest) else resolve_manifest(data, cfg.val_fraction, cfg.seed)
    samples = manifest.subset(("train", "val"))
    if not samples:
        raise DataError(f"{manifest.root} has no train/val images")
    prep = default_preprocess(cfg.backbone, cfg.size, cfg.intensity)
    images, ok, failed = load_images(samples, prep, cfg.workers, progress)
    y = torch.tensor([s.target for s in samples])
    split = np.array([s.split for s in samples])
    tr, va = np.flatnonzero(ok & (split == "train")), np.flatnonzero(ok & (split == "val"))
    if len(tr) == 0 or len(va) == 0:
        raise DataError("the train or validation split is empty; index more images or change --val-fraction")
    backbone, weights_id = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, seed=cfg.seed)
    trained_children = set_trainable(backbone, cfg.unfreeze)
    with torch.no_grad():
        dim = backbone.eval()(torch.zeros(1, 3, prep.size, prep.size)).shape[1]
    backbone.train()
    net = PneumoNet(backbone, Head(dim, len(LABELS), cfg.dropout))
    weight = class_weights(y[tr].numpy()) if cfg.class_weight == "balanced" else None
    module = make_module(net, cfg, prep, weight)

    g = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(TensorDataset(images[tr], y[tr]), batch_size=cfg.batch_size, shuffle=True, generator=g,
                          drop_last=len(tr) > cfg.batch_size, num_workers=0)
    val_dl = DataLoader(TensorDataset(images[va], y[va]), batch_size=max(64, cfg.batch_size), num_workers=0)
    keep = KeepBest.create()
    callbacks = [keep]  # before EMA: KeepBest copies the state while the EMA weights are swapped in
    if cfg.ema_decay > 0:
        callbacks.append(_ema_callback(cfg.ema_decay))
    if cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min"))
    trainer = pl.Trainer(max_epochs=cfg.epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
                         devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                         precision=_precision(cfg), callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                         log_every_n_steps=10, use_distributed_sampler=True)
    trainer.fit(module, train_dl, val_dl)
    if not trainer.is_global_zero:
        return None
    if keep.state is None:
        raise PneumoscanError("fine-tuning produced no validation result (max steps shorter than one epoch?)")
    module.load_state_dict(keep.state)
    device = torch.device("cuda") if torch.cuda.is_available() and cfg.accelerator != "cpu" else torch.device("cpu")
    p_va = predict_u8(module.to(device), images[va])
    y_va = y[va].numpy()
    threshold, how = choose_threshold(y_va, p_va, cfg.threshold_method, cfg.target_sensitivity)
    val_metrics = compute_metrics(y_va, p_va, threshold, n_boot=1000, seed=cfg.seed)
    config = {
        "name": f"{cfg.backbone}-ft",
        "kind": "single",
        "backbone": cfg.backbone,
        "timm_name": get_spec(cfg.backbone).timm_name,
        "weights_source": weights_id,
        "finetuned": True,
        "trained_children": trained_children,
        "preprocess": prep.to_dict(),
        "labels": list(LABELS),
        "head": {"in_features": int(dim), "dropout": cfg.dropout},
        "threshold": threshold,
        "threshold_method": how,
        "train_prior": (np.bincount(y[tr].numpy(), minlength=len(LABELS)) / len(tr)).tolist(),
        "train_config": {**asdict(cfg), "augment": cfg.augment.to_dict()},
        "command": command or " ".join(sys.argv),
        "manifest_sha256": manifest.digest(),
        "data": {"root": manifest.root, "counts": manifest.counts(), "skipped": len(manifest.skipped),
                 "failed_to_decode": len(failed)},
        "best_epoch": keep.best_epoch,
        "epochs_run": len(keep.history),
        "train_seconds": round(time.time() - t0, 1),
        "hardware": {**_hardware(), "devices": cfg.devices, "num_nodes": cfg.num_nodes,
                     "strategy": cfg.strategy, "precision": _precision(cfg)},
        "val_metrics": val_metrics,
    }
    out = Path(out)
    save_model(out, module.net.cpu().float(), config)
    write_history(keep.history, out)
    manifest.save(out / "manifest.csv")
    write_card(out)
    log.info("fine-tuned model written to %s (val AUC %.4f)", out, val_metrics["normal_vs_pneumonia"]["auc"])
    return out
