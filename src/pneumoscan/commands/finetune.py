"""pneumoscan finetune: end-to-end fine-tuning (Lightning; multi-GPU / multi-node via DDP)."""
from __future__ import annotations

from . import fraction, positive_int, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune backbone + head end to end; writes a model directory")
    p.add_argument("data", help="data folder or manifest CSV")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--backbone", default="efficientnet_lite0", help="registered backbone")
    p.add_argument("--size", type=int, default=None, help="input side (default: the backbone's)")
    p.add_argument("--intensity", default="none", choices=["none", "equalize", "clahe"], help="intensity normalisation")
    p.add_argument("--weights", default=None, metavar="FILE", help="ImageNet weights file for the backbone")
    p.add_argument("--no-pretrained", action="store_true", help="random initial weights (tests only)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size per device (default 32)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (default 3e-4)")
    p.add_argument("--head-lr-mult", type=float, default=10.0, help="head learning-rate multiplier (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs (default 1)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle", "constant"], help="lr schedule")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (default 0.1)")
    p.add_argument("--class-weight", default="balanced", choices=["none", "balanced"], help="loss class weighting")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout before the dense layer")
    p.add_argument("--ema-decay", type=float, default=0.998, help="EMA decay per step; 0 disables (default 0.998)")
    p.add_argument("--unfreeze", default="all", help="'all' or the backbone child from which on to train")
    p.add_argument("--flip", action="store_true", help="add horizontal flips to the augmentation")
    p.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    p.add_argument("--rotate", type=float, default=10.0, help="max rotation in degrees (default 10)")
    p.add_argument("--patience", type=int, default=0, help="early-stopping patience; 0 = off")
    p.add_argument("--threshold-method", default="youden", choices=["youden", "sensitivity"])
    p.add_argument("--target-sensitivity", type=float, default=None)
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="patient-grouped validation share")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--devices", type=_devices, default=1, help="devices per node (an integer or 'auto')")
    p.add_argument("--num-nodes", type=positive_int, default=1, help="machines for DDP")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--precision", default="auto", help="auto (bf16-mixed on GPU), 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (smoke tests)")
    p.add_argument("--workers", type=int, default=2, help="decoding workers")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from this model's weights (LP-FT: a 'pneumoscan train' model of the same backbone)")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay per backbone block (e.g. 0.8; 1 = off)")
    p.add_argument("--loss", default="ce", choices=["ce", "gce"], help="ce, or gce (generalised CE, label-noise tolerant)")
    p.add_argument("--gce-q", type=float, default=0.7, help="GCE exponent q in (0, 1] (default 0.7)")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (e.g. 0.2; 0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta alpha (e.g. 1.0; 0 = off)")
    p.add_argument("--drop-noisy", type=float, default=0.0,
                   help="drop this share of each class's training images as likely mislabelled (e.g. 0.05)")
    p.add_argument("--augment-order", default="augment-then-intensity",
                   choices=["augment-then-intensity", "intensity-then-augment"],
                   help="augment before the intensity normalisation (default) or after it (the shipped v0.1 members)")
    p.add_argument("--blur", type=float, default=0.0, help="max Gaussian blur sigma in px for augmentation")
    p.add_argument("--noise", type=float, default=0.0, help="max pixel-noise sigma on [0, 1] intensities")
    p.add_argument("--erase", type=float, default=0.0, help="random-erasing probability per image")
    p.add_argument("--gamma", type=float, default=0.25, help="max |log gamma| of the exposure jitter")
    p.add_argument("--contrast", type=float, default=0.20, help="max relative contrast jitter")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    import sys

    from ..augment import AugmentConfig
    from ..errors import PneumoscanError
    from ..finetune import FinetuneConfig, finetune
    from . import print_model_summary, tame_lightning

    tame_lightning()
    aug = AugmentConfig(0, 0, 0, 0, 0, 0, False) if args.no_augment else AugmentConfig(
        rotate=args.rotate, flip=args.flip, blur=args.blur, noise=args.noise, erase=args.erase, gamma=args.gamma,
        contrast=args.contrast)
    if args.workers < 0:
        raise PneumoscanError(f"--workers {args.workers} must be 0 or more")
    cfg = FinetuneConfig(backbone=args.backbone, size=args.size, intensity=args.intensity, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, head_lr_mult=args.head_lr_mult,
                         weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, schedule=args.schedule,
                         label_smoothing=args.label_smoothing, class_weight=args.class_weight, dropout=args.dropout,
                         ema_decay=args.ema_decay, unfreeze=args.unfreeze, augment=aug, patience=args.patience,
                         threshold_method=args.threshold_method, target_sensitivity=args.target_sensitivity,
                         val_fraction=args.val_fraction, seed=args.seed, pretrained=not args.no_pretrained,
                         weights=args.weights, accelerator=args.accelerator, devices=args.devices,
                         num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision,
                         max_steps=args.max_steps, workers=args.workers, init_from=args.init_from,
                         layer_decay=args.layer_decay, loss=args.loss, gce_q=args.gce_q, mixup=args.mixup,
                         cutmix=args.cutmix, drop_noisy=args.drop_noisy, augment_order=args.augment_order)
    out = finetune(args.data, args.out, cfg, progress=progress_enabled(),
                   command="pneumoscan " + shlex.join(sys.argv[1:]))
    if out is None:  # a non-zero DDP rank: rank 0 reports
        return 0
    print_model_summary(out)
    return 0



def _devices(text: str) -> int | str:
    return text if text == "auto" else positive_int(text)
