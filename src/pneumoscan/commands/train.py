"""pneumoscan train: the study's top model on cached features."""
from __future__ import annotations

from . import fraction, positive_int, progress_enabled
from .extract import add_backbone_args


def add_fit_args(p) -> None:
    """Early stopping, step decay, class weighting, split and seed: shared by train and compare."""
    p.add_argument("--epochs", type=positive_int, default=200, help="maximum epochs of a head (default 200)")
    p.add_argument("--patience", type=positive_int, default=15, help="early-stopping patience in epochs (default 15)")
    p.add_argument("--step-size", type=positive_int, default=10, help="epochs between step-decay drops")
    p.add_argument("--step-gamma", type=float, default=0.5, help="step-decay factor")
    p.add_argument("--class-weight", default="balanced", choices=["none", "balanced"], help="loss class weighting")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="patient-grouped validation share")
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and batch order")


def add_head_args(p) -> None:
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--head-batch-size", type=positive_int, default=256,
                   help="batch size of head training (default 256; --batch-size is extraction's)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout before the dense layer (default 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument("--schedule", default="none", choices=["none", "step"], help="learning-rate schedule")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--threshold-method", default="youden", choices=["youden", "sensitivity"],
                   help="how the pneumonia threshold is chosen on validation")
    p.add_argument("--target-sensitivity", type=float, default=None, help="with --threshold-method sensitivity")
    add_fit_args(p)


def register(sub) -> None:
    p = sub.add_parser("train", help="train the top model on frozen-backbone features; writes a model directory")
    p.add_argument("data", help="data folder or manifest CSV")
    p.add_argument("--out", required=True, help="model directory to write")
    add_backbone_args(p)
    add_head_args(p)
    p.set_defaults(func=run)


def config_from_args(args):
    from ..train import TrainConfig

    return TrainConfig(backbone=args.backbone, size=args.size, intensity=args.intensity, lr=args.lr,
                       batch_size=args.head_batch_size, weight_decay=args.weight_decay, dropout=args.dropout,
                       max_epochs=args.epochs, patience=args.patience, schedule=args.schedule, step_size=args.step_size,
                       step_gamma=args.step_gamma, class_weight=args.class_weight,
                       label_smoothing=args.label_smoothing, threshold_method=args.threshold_method,
                       target_sensitivity=args.target_sensitivity, val_fraction=args.val_fraction,
                       seed=args.seed, pretrained=not args.no_pretrained, weights=args.weights)


def run(args) -> int:
    import shlex
    import sys

    from ..train import train

    from . import print_model_summary, tame_lightning

    tame_lightning()
    cfg = config_from_args(args)
    out = train(args.data, args.out, cfg, cache_dir=args.cache, progress=progress_enabled(),
                command="pneumoscan " + shlex.join(sys.argv[1:]), batch_size=args.batch_size, workers=args.workers)
    print_model_summary(out)
    return 0
