"""pneumoscan compare: backbones x image size x learning rate x dropout x schedule, chosen on validation."""
from __future__ import annotations

from ..features.config import ExtractConfig
from ..train.config import CompareConfig, TrainConfig
from .common import add_overwrite, check_inputs_exist, check_out, new_model_dir, progress_enabled, tame_lightning
from .flags import add_config, build

BASE_FIELDS = ("intensity", "max_epochs", "patience", "step_size", "step_gamma", "class_weight", "val_fraction",
               "seed", "pretrained")  # the fixed settings of every grid point (TrainConfig fields)


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare backbones and a grid of head settings on one split (validation only)",
                       description="Index once, extract features once per backbone and size (cached), train a "
                                   "head for every grid point, select on validation only; writes compare.csv, "
                                   "compare.md, compare.json and bar charts.")
    p.add_argument("data", help="data folder or manifest CSV")
    p.add_argument("--out", required=True, help="output folder for the tables and charts")
    add_config(p, CompareConfig, exclude=("base", "weights"))
    p.add_argument("--weights", action="append", default=[], metavar="[BACKBONE=]FILE",
                   help="ImageNet weights file for a backbone without offline weights (repeatable)")
    add_config(p, TrainConfig, only=BASE_FIELDS, group="every grid point")
    add_config(p, ExtractConfig, group="feature extraction")
    p.add_argument("--save-best", default=None, metavar="DIR", help="also write the best configuration's model dir")
    add_overwrite(p)
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
    base = build(TrainConfig, args, backbone=args.backbones[0], weights=None)
    cfg = build(CompareConfig, args, base=base, weights=_weights(args.weights, tuple(args.backbones)))
    ext = build(ExtractConfig, args)
    check_inputs_exist(args.data)
    check_out(args, "dir")
    if args.save_best:
        from ..io import check_new_dir
        check_new_dir(args.save_best, args.overwrite, "--save-best")
    tame_lightning()
    from ..train.compare import compare

    res = compare(args.data, args.out, cfg, extract=ext, progress=progress_enabled())
    if args.save_best:
        from ..train.head import train

        with new_model_dir(args.save_best, args.overwrite) as tmp:
            train(res.manifest, tmp, res.best_config, extract=ext, progress=progress_enabled(),
                  command=f"pneumoscan compare (best of {len(res.rows)} runs, selected by validation {cfg.select_by})")
    b = res.best
    print(f"{len(res.rows)} runs; selected by validation {cfg.select_by}")
    for name, r in res.best_per_backbone.items():
        print(f"  {name:<22} size {r['size']:>4}  lr {r['lr']:<8g} dropout {r['dropout']:<5g} {r['schedule']:<5} "
              f"val loss {r['val_loss']:.4f}  AUC {r['val_auc']:.4f}  spec {r['val_spec']:.3f}")
    print(f"best: {b['backbone']}@{b['size']} lr {b['lr']:g} dropout {b['dropout']:g} schedule {b['schedule']}")
    print(f"written: {res.files['compare.csv']}, compare.md, compare.json, compare_backbones.png, compare_grid.png")
    if args.save_best:
        print(f"best model: {args.save_best}")
    return 0
