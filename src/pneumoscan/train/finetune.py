"""End-to-end fine-tuning of a backbone + head with PyTorch Lightning.

AdamW with linear warm-up then cosine decay (or one-cycle), label smoothing, class weighting,
batch augmentation on the device (:mod:`pneumoscan.train.augment`), an exponential moving average of
the weights (Lightning's ``EMAWeightAveraging``; the averaged weights are the ones validated and
kept), bf16 mixed precision on GPU. ``devices``, ``num_nodes`` and ``strategy`` go straight to
Lightning's ``Trainer``, so the same code runs on one CPU, several GPUs, or DDP across machines.
The output is the same model directory format as :func:`pneumoscan.train.head.train`.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data.index import resolve_manifest
from ..data.manifest import Manifest, check_usable
from ..errors import DataError, PneumoscanError
from ..features.extract import ImageFiles, collate
from ..labels import LABELS
from ..metrics import choose_threshold, compute_metrics
from ..nets.backbones import create_backbone, default_preprocess
from ..nets.checkpoint import save_model
from ..nets.heads import Head, PneumoNet
from ..preprocess import PreprocessConfig
from .augment import BatchInput
from .callbacks import KeepBest, ema_callback, fit_interruptible, progress_bar
from .config import FinetuneConfig
from .head import class_weights
from .record import model_record, write_history

log = logging.getLogger(__name__)


def set_trainable(backbone: nn.Module, unfreeze: str) -> list[str]:
    """Freeze the backbone's children before ``unfreeze`` (a child name); returns the trained ones."""
    names = [n for n, _ in backbone.named_children()]
    if unfreeze == "all":
        return names
    if unfreeze not in names:
        raise PneumoscanError(f"--unfreeze {unfreeze!r} is not a child of this backbone; choose all or one of "
                              + ", ".join(names))
    start = names.index(unfreeze)
    for i, (_, child) in enumerate(backbone.named_children()):
        for p in child.parameters():
            p.requires_grad_(i >= start)
    return names[start:]


def load_images(samples, prep: PreprocessConfig, workers: int, progress: bool,
                intensity: bool = True) -> tuple[torch.Tensor, np.ndarray, list]:
    """All images decoded and resized once into a uint8 tensor (N, S, S); failures listed.

    ``intensity=False`` leaves out the intensity normalisation (it then runs per batch, after
    the augmentation)."""
    from tqdm.auto import tqdm

    out = torch.zeros((len(samples), prep.size, prep.size), dtype=torch.uint8)
    ok = np.zeros(len(samples), bool)
    failed = []
    loader = DataLoader(ImageFiles([s.path for s in samples], prep, intensity=intensity), batch_size=64,
                        num_workers=workers,
                        collate_fn=collate)
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

    n_classes = len(LABELS)

    class FinetuneModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            # intensity normalisation per batch, after the augmentation (see FinetuneConfig.augment_order)
            self.inputs = BatchInput(prep, cfg.augment, cfg.augment_order == "augment-then-intensity")
            self.register_buffer("weight", weight if weight is not None else torch.ones(n_classes), persistent=False)
            self.train_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
            self.val_loss = nn.CrossEntropyLoss()

        def prepare(self, x_u8: torch.Tensor, augment: bool) -> torch.Tensor:
            """uint8 (N, S, S) -> normalised (N, 3, S, S): [augmentation], intensity step, mean/std."""
            return self.inputs(x_u8, augment)

        def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
            """Logits for uint8 images, without augmentation (validation and prediction)."""
            return self.net(self.prepare(x_u8, augment=False))

        def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """mixup or cutmix of the batch with a permutation of itself; soft targets, or None when off."""
            modes = [m for m, a in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if a > 0]
            if not modes or len(y) < 2:
                return x, None
            mode = modes[int(torch.randint(len(modes), ()))]
            alpha = cfg.mixup if mode == "mixup" else cfg.cutmix
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
            perm = torch.randperm(len(y), device=x.device)
            if mode == "mixup":
                x = lam * x + (1 - lam) * x[perm]
            else:  # one box from the partner image; lam becomes the kept area
                s = x.shape[-1]
                cut = int(round(s * math.sqrt(1 - lam)))
                cy, cx = (int(v) for v in torch.randint(s, (2,)))
                t, b, lo, r = max(cy - cut // 2, 0), min(cy + cut // 2, s), max(cx - cut // 2, 0), min(cx + cut // 2, s)
                x = x.clone()
                x[..., t:b, lo:r] = x[perm][..., t:b, lo:r]
                lam = 1 - (b - t) * (r - lo) / (s * s)
            onehot = nn.functional.one_hot(y, n_classes).float()
            return x, lam * onehot + (1 - lam) * onehot[perm]

        def _loss(self, logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
            if cfg.loss == "ce" and soft is None:
                return self.train_loss(logits, y)  # hard labels: the weighted mean of nn.CrossEntropyLoss
            t = soft if soft is not None else nn.functional.one_hot(y, n_classes).float()
            t = t * (1 - cfg.label_smoothing) + cfg.label_smoothing / n_classes
            w = (t * self.weight).sum(1)  # each image's class weight (mixed for mixed targets)
            if cfg.loss == "ce":
                per = -(t * self.weight * logits.float().log_softmax(-1)).sum(1)
            else:  # generalised cross-entropy (Zhang & Sabuncu 2018): (1 - p^q) / q, weighted like CE
                p = logits.float().softmax(-1).clamp_min(1e-7)
                per = (t * self.weight * (1 - p ** cfg.gce_q) / cfg.gce_q).sum(1)
            return per.sum() / w.sum().clamp_min(1e-12)

        def training_step(self, batch, _):
            x, y = batch
            if cfg.freeze_bn:  # Lightning puts the whole module in train mode each epoch; statistics stay put
                for m in self.net.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            x, soft = self._mix(self.prepare(x, augment=True), y)
            logits = self.net(x)
            loss = self._loss(logits, y, soft)
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
            self.log("train_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self(x)
            self.log("val_loss", self.val_loss(logits.float(), y), on_epoch=True, sync_dist=True, prog_bar=True)
            self.log("val_acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, sync_dist=True, prog_bar=True)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(param_groups(self.net, cfg))
            total = max(1, int(self.trainer.estimated_stepping_batches))
            if cfg.schedule == "onecycle":
                sched = torch.optim.lr_scheduler.OneCycleLR(
                    opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                    pct_start=min(0.5, max(0.05, cfg.warmup_epochs / cfg.epochs)))
            else:
                warm = max(1, int(total * cfg.warmup_epochs / cfg.epochs))
                sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(total, warm, cfg.schedule))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return FinetuneModule()


def warmup_then(total: int, warm: int, schedule: str = "cosine"):
    """The learning-rate factor per step: linear warm-up over ``warm`` steps, then cosine decay to 0 over
    the rest of ``total`` (or constant)."""
    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return factor


def param_groups(net: PneumoNet, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups: backbone weights with decay, norms and biases without, the head at
    ``head_lr_mult`` times the rate. With ``layer_decay`` < 1 the backbone's groups come from timm's
    layer-wise decay (BEiT's recipe): the last block learns at ``lr``, each earlier one ``layer_decay``
    times slower, so the pretrained early features move least."""
    head = [p for p in net.head.parameters() if p.requires_grad]
    head_group = {"params": head, "weight_decay": 0.0, "lr": cfg.lr * cfg.head_lr_mult}
    if cfg.layer_decay < 1.0:
        from timm.optim._param_groups import param_groups_layer_decay

        groups = param_groups_layer_decay(net.backbone, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
        for g in groups:
            g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
        return [g for g in groups if g["params"]] + ([head_group] if head else [])
    decay, no_decay = [], []
    for p in net.backbone.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr}, head_group]
    return [g for g in groups if g["params"]]


def _init_model(cfg: FinetuneConfig, prep: PreprocessConfig):
    """The model directory ``cfg.init_from`` loaded (LP-FT); it must match the backbone and preprocessing."""
    from ..nets.checkpoint import load_model

    bundle = load_model(cfg.init_from)
    c = bundle.config
    if c.get("kind", "single") != "single" or c.get("backbone") != cfg.backbone:
        raise PneumoscanError(f"--init-from {cfg.init_from} is a {c.get('kind', 'single')} model of "
                              f"{c.get('backbone')!r}, not a single {cfg.backbone!r} model; train one with "
                              f"'pneumoscan train DATA --backbone {cfg.backbone}' first")
    theirs = PreprocessConfig.from_dict(c["preprocess"])
    if theirs != prep:
        raise PneumoscanError(f"--init-from {cfg.init_from} was trained with size {theirs.size} and intensity "
                              f"{theirs.intensity!r}; this run uses size {prep.size} and {prep.intensity!r}: "
                              "pass the same --size and --intensity")
    return bundle


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
    cfg.check_machine()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    manifest = data if isinstance(data, Manifest) else resolve_manifest(data, cfg.val_fraction, cfg.seed)
    samples = manifest.subset(("train", "val"))
    if not samples:
        raise DataError(f"{manifest.root} has no train/val images")
    manifest.check_files()
    prep = default_preprocess(cfg.backbone, cfg.size, cfg.intensity)
    init = _init_model(cfg, prep) if cfg.init_from else None  # checked before the images are decoded
    batch_intensity = cfg.augment_order == "augment-then-intensity"
    images, ok, failed = load_images(samples, prep, cfg.workers, progress, intensity=not batch_intensity)
    y = torch.tensor([s.target for s in samples])
    split = np.array([s.split for s in samples])
    tr, va = np.flatnonzero(ok & (split == "train")), np.flatnonzero(ok & (split == "val"))
    check_usable(y[tr].numpy(), y[va].numpy(), len(failed), len(samples))
    backbone, weights_id = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, seed=cfg.seed)
    noisy = None
    if cfg.drop_noisy > 0:
        from .noisy import drop_noisy

        keep, noisy = drop_noisy([samples[i] for i in tr], cfg.backbone, backbone, weights_id, prep, cfg.drop_noisy,
                                 cfg.seed, progress=progress)
        tr = tr[keep]
    if init is not None:
        backbone = init.net.backbone
        weights_id = f"init-{init.model_id}"
    trained_children = set_trainable(backbone, cfg.unfreeze)
    with torch.no_grad():
        dim = backbone.eval()(torch.zeros(1, 3, prep.size, prep.size)).shape[1]
    backbone.train()
    head = Head(dim, len(LABELS), cfg.dropout)
    if init is not None:
        head.fc.load_state_dict(init.net.head.fc.state_dict())
    net = PneumoNet(backbone, head)
    weight = class_weights(y[tr].numpy()) if cfg.class_weight == "balanced" else None
    module = make_module(net, cfg, prep, weight)

    g = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(TensorDataset(images[tr], y[tr]), batch_size=cfg.batch_size, shuffle=True, generator=g,
                          drop_last=len(tr) > cfg.batch_size, num_workers=0)
    val_dl = DataLoader(TensorDataset(images[va], y[va]), batch_size=max(64, cfg.batch_size), num_workers=0)
    keep = KeepBest.create()
    callbacks = [keep]  # before EMA: KeepBest copies the state while the EMA weights are swapped in
    if cfg.ema_decay > 0:
        callbacks.append(ema_callback(cfg.ema_decay))
    if cfg.patience > 0:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min"))
    if progress:
        callbacks.append(progress_bar())
    trainer = pl.Trainer(max_epochs=cfg.epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
                         devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                         precision=_precision(cfg), callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                         log_every_n_steps=10, use_distributed_sampler=True)
    fit_interruptible(trainer, module, train_dl, val_dl)
    if not trainer.is_global_zero:
        return None
    if keep.state is None:
        raise PneumoscanError("fine-tuning produced no validation result (max steps shorter than one epoch?)")
    module.load_state_dict(keep.state)
    device = torch.device("cuda") if torch.cuda.is_available() and cfg.accelerator != "cpu" else torch.device("cpu")
    p_va = predict_u8(module.to(device), images[va])
    y_va = y[va].numpy()
    threshold, how = choose_threshold(y_va, p_va, cfg.threshold_method, cfg.target_sensitivity)
    config = model_record(
        kind="single", backbone=cfg.backbone, weights_id=weights_id, finetuned=True, prep=prep,
        head={"in_features": int(dim), "dropout": cfg.dropout}, threshold=threshold, threshold_method=how,
        y_train=y[tr].numpy(), train_config={**asdict(cfg), "augment": cfg.augment.to_dict()}, manifest=manifest,
        failed=len(failed), used=check_usable(y[tr].numpy(), y[va].numpy(), len(failed), len(samples)),
        history=keep.history, best_epoch=keep.best_epoch, t0=t0,
        val_metrics=compute_metrics(y_va, p_va, threshold, seed=cfg.seed), command=command,
        trained_children=trained_children,
        init_from=None if init is None else {"dir": str(cfg.init_from), "model_id": init.model_id},
        noisy_labels=None if noisy is None else {k: v for k, v in noisy.items() if k != "images"},
        hardware={"devices": cfg.devices, "num_nodes": cfg.num_nodes, "strategy": cfg.strategy,
                  "precision": _precision(cfg)})
    out = Path(out)
    save_model(out, module.net.cpu().float(), config)
    write_history(keep.history, out)
    manifest.save(out / "manifest.csv")
    if noisy is not None:
        from .noisy import write_dropped
        write_dropped(noisy, out / "dropped.csv")
    log.info("fine-tuned model written to %s (val AUC %.4f)", out, config["val_metrics"]["normal_vs_pneumonia"]["auc"])
    return out
