"""pneumoscan compare: backbones x image size x learning rate x dropout x schedule, chosen on validation."""
from __future__ import annotations

from . import positive_int, progress_enabled
from .train import add_fit_args


def _list(kind):
    """argparse type: comma-separated values of ``kind``."""
    import argparse

    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list; give comma-separated values")
        try:
            return tuple(kind(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} "
                                             "values") from None
    return parse


def _size(text: str):
    return None if text in ("default", "auto") else int(text)


_size.__name__ = "int"


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare backbones and a grid of head settings on one split (validation only)",
                       description="Index once, extract features once per backbone and size (cached), train a "
                                   "head for every grid point, select on validation only; writes compare.csv, "
                                   "compare.md, compare.json and bar charts.")
    p.add_argument("data", help="data folder or manifest CSV")
    p.add_argument("--out", required=True, help="output folder for the tables and charts")
    p.add_argument("--backbones", type=_list(str), default=("efficientnet_lite0",),
                   help="comma-separated backbones (default efficientnet_lite0; the study's five: "
                        "resnet50,inception_v3,xception,inception_resnet_v2,vgg16)")
    p.add_argument("--sizes", type=_list(_size), default=(None,),
                   help="comma-separated image sides, e.g. 224,299,320 (default: each backbone's own)")
    p.add_argument("--lrs", type=_list(float), default=(2e-3,), help="comma-separated learning rates (default 2e-3)")
    p.add_argument("--dropouts", type=_list(float), default=(0.2,), help="comma-separated dropouts (default 0.2)")
    p.add_argument("--schedules", type=_list(str), default=("none",), help="comma-separated: none,step (default none)")
    p.add_argument("--select-by", default="loss", choices=["loss", "auc"],
                   help="validation criterion: loss (default; the early-stopping loss) or auc (normal vs pneumonia)")
    p.add_argument("--weights", action="append", default=[], metavar="[BACKBONE=]FILE",
                   help="ImageNet weights file for a backbone without offline weights (repeatable)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests only)")
    p.add_argument("--intensity", default="none", choices=["none", "equalize", "clahe"], help="intensity normalisation")
    add_fit_args(p)
    p.add_argument("--cache", default=None, metavar="DIR", help="feature cache folder")
    p.add_argument("--batch-size", type=positive_int, default=64, help="extraction batch size")
    p.add_argument("--workers", type=int, default=None, help="decoding worker processes")
    p.add_argument("--save-best", default=None, metavar="DIR", help="also write the best configuration's model dir")
    p.set_defaults(func=run)


def _weights(items: list[str], backbones: tuple[str, ...]) -> dict[str, str]:
    from ..errors import PneumoscanError

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if len(backbones) != 1:
                raise PneumoscanError(f"--weights {item}: with several backbones write --weights BACKBONE=FILE")
            name, path = backbones[0], item
        out[name] = path
    return out


def run(args) -> int:
    from ..compare import CompareConfig, compare
    from ..errors import PneumoscanError
    from ..train import TrainConfig

    if args.workers is not None and args.workers < 0:
        raise PneumoscanError(f"--workers {args.workers} must be 0 or more")
    base = TrainConfig(backbone=args.backbones[0], intensity=args.intensity, max_epochs=args.epochs,
                       patience=args.patience, step_size=args.step_size, step_gamma=args.step_gamma,
                       class_weight=args.class_weight, val_fraction=args.val_fraction, seed=args.seed,
                       pretrained=not args.no_pretrained)
    cfg = CompareConfig(backbones=args.backbones, sizes=args.sizes, lrs=args.lrs, dropouts=args.dropouts,
                        schedules=args.schedules, select_by=args.select_by, base=base,
                        weights=_weights(args.weights, args.backbones))
    res = compare(args.data, args.out, cfg, cache_dir=args.cache, progress=progress_enabled(),
                  batch_size=args.batch_size, workers=args.workers, save_best=args.save_best)
    b = res.best
    print(f"{len(res.rows)} runs; selected by validation {args.select_by}")
    for name, r in res.best_per_backbone.items():
        print(f"  {name:<22} size {r['size']:>4}  lr {r['lr']:<8g} dropout {r['dropout']:<5g} {r['schedule']:<5} "
              f"val loss {r['val_loss']:.4f}  AUC {r['val_auc']:.4f}  spec {r['val_spec']:.3f}")
    print(f"best: {b['backbone']}@{b['size']} lr {b['lr']:g} dropout {b['dropout']:g} schedule {b['schedule']}")
    print(f"written: {res.files['compare.csv']}, compare.md, compare.json, compare_backbones.png, compare_grid.png")
    if args.save_best:
        print(f"best model: {args.save_best}")
    return 0
