"""Self-supervised pretraining of a backbone on the training X-rays: SimCLR with lightly's NT-Xent loss.

No chest-X-ray weights ship anywhere; this learns them from the unlabelled training images. Each
image gives two random views (the batch augmentation of fine-tuning, stronger, before the intensity
step); the backbone plus a small projection head (lightly's ``SimCLRProjectionHead``) are trained so
that the two views of an image agree and differ from the batch's other images (Chen et al. 2020).
Only the training split's images are used: the validation split stays untouched for what follows.
The result is a backbone weights file that ``train --weights`` and ``finetune --weights`` take, so
linear probing and LP-FT run on top of it as on ImageNet weights. A GPU job (about 100 epochs); the
CPU path exists for tests.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..data.index import resolve_manifest
from ..data.manifest import Manifest
from ..errors import DataError, PneumoscanError
from ..io import atomic_path, atomic_write_json, file_digest
from ..nets.backbones import create_backbone, default_preprocess
from .augment import BatchInput
from .callbacks import fit_interruptible, progress_bar
from .config import PretrainConfig
from .finetune import _precision, load_images
from .record import hardware

log = logging.getLogger(__name__)

WEIGHTS_FILE = "backbone.safetensors"


def make_module(backbone: torch.nn.Module, dim: int, cfg: PretrainConfig, prep):
    import lightning.pytorch as pl
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    class SimCLRModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection = SimCLRProjectionHead(dim, dim, cfg.projection_dim)
            self.inputs = BatchInput(prep, cfg.augment, batch_intensity=True)
            self.criterion = NTXentLoss(temperature=cfg.temperature)
            self.losses: list[float] = []

        def training_step(self, batch, _):
            (x,) = batch
            z0 = self.projection(self.backbone(self.inputs(x, augment=True)))
            z1 = self.projection(self.backbone(self.inputs(x, augment=True)))
            loss = self.criterion(z0, z1)
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
            return loss

        def on_train_epoch_end(self) -> None:
            v = self.trainer.callback_metrics.get("train_loss")
            if v is not None:
                self.losses.append(float(v))

        def configure_optimizers(self):
            import math

            opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = max(1, total // cfg.epochs)

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                       "interval": "step"}}

    return SimCLRModule()


def pretrain(data: str | os.PathLike | Manifest, out: str | os.PathLike, cfg: PretrainConfig = PretrainConfig(), *,
             progress: bool = True, command: str | None = None) -> Path:
    """Pretrain ``cfg.backbone`` on the training split of ``data``; writes ``out/backbone.safetensors``
    (timm names, usable as ``--weights``) and ``out/pretrain.json``. Returns the weights file."""
    import lightning.pytorch as pl
    from safetensors.torch import save_file

    t0 = time.time()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    manifest = data if isinstance(data, Manifest) else resolve_manifest(data, cfg.val_fraction, cfg.seed)
    samples = manifest.subset("train")
    if len(samples) < cfg.batch_size and cfg.max_steps < 0:
        raise DataError(f"{len(samples)} training images are fewer than one batch of {cfg.batch_size}; "
                        "lower --batch-size")
    manifest.check_files(("train",))
    prep = default_preprocess(cfg.backbone, cfg.size, cfg.intensity)
    images, ok, failed = load_images(samples, prep, cfg.workers, progress, intensity=False)
    images = images[torch.from_numpy(ok)]
    backbone, weights_id = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, seed=cfg.seed)
    with torch.no_grad():
        dim = backbone.eval()(torch.zeros(1, 3, prep.size, prep.size)).shape[1]
    backbone.train()
    module = make_module(backbone, dim, cfg, prep)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(images), batch_size=min(cfg.batch_size, len(images)), shuffle=True,
                        drop_last=True, generator=g, num_workers=0)
    trainer = pl.Trainer(max_epochs=cfg.epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
                         max_time=None if cfg.max_minutes is None else {"seconds": cfg.max_minutes * 60},
                         devices=cfg.devices, precision=_precision(cfg), logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                         callbacks=[progress_bar()] if progress else [])
    fit_interruptible(trainer, module, loader)
    if not trainer.is_global_zero:
        raise PneumoscanError("pretraining on several devices writes its result on rank 0 only")
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in module.backbone.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pneumoscan-backbone/1", "backbone": cfg.backbone})
    atomic_write_json(out / "pretrain.json", {
        "backbone": cfg.backbone, "started_from": weights_id, "pretrain_config": {**asdict(cfg),
                                                                                 "augment": asdict(cfg.augment)},
        "preprocess": prep.to_dict(), "images": int(len(images)), "failed_to_decode": len(failed),
        "manifest_sha256": manifest.digest(), "epoch_losses": module.losses, "steps": int(trainer.global_step),
        "epochs_done": int(trainer.current_epoch), "stopped_by_time": int(trainer.current_epoch) < cfg.epochs
        and cfg.max_minutes is not None and cfg.max_steps < 0,
        "seconds": round(time.time() - t0, 1), "hardware": hardware(), "command": command,
        "weights_sha256": file_digest(out / WEIGHTS_FILE)})
    log.info("pretrained backbone written to %s (final loss %s)", out / WEIGHTS_FILE,
             f"{module.losses[-1]:.3f}" if module.losses else "n/a")
    return out / WEIGHTS_FILE


def describe(out: str | os.PathLike) -> dict:
    return json.loads((Path(out) / "pretrain.json").read_text())
