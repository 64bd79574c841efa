"""pneumoscan pretrain: self-supervised (SimCLR) pretraining of a backbone on the training X-rays."""
from __future__ import annotations

from ..train.config import AugmentConfig, PretrainConfig
from .common import add_overwrite, check_inputs_exist, check_out, command_line, progress_enabled, tame_lightning
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (SimCLR) of a backbone on the training images",
                       description="Writes OUT/backbone.safetensors; then 'pneumoscan train DATA --weights "
                                   "OUT/backbone.safetensors' (linear probe) and 'pneumoscan finetune DATA --weights ... "
                                   "--init-from PROBE' (LP-FT). A GPU job; needs pip install 'pneumoscan[ssl]'.")
    p.add_argument("data", help="data folder or manifest CSV (only its train split is used)")
    p.add_argument("--out", required=True, help="folder for backbone.safetensors and pretrain.json")
    add_overwrite(p)
    add_config(p, PretrainConfig, exclude=("augment",))
    add_config(p, AugmentConfig, group="the two views (batch augmentation)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.config import _ssl_augment

    ssl = _ssl_augment()
    given = build(AugmentConfig, args)
    aug = ssl if given == AugmentConfig() else given  # the options' defaults are fine-tuning's: SimCLR's own unless set
    cfg = build(PretrainConfig, args, augment=aug)
    check_inputs_exist(args.data, cfg.weights)
    check_out(args, "model")
    import importlib.util

    from ..errors import PneumoscanError

    if importlib.util.find_spec("lightly") is None:
        raise PneumoscanError("pretraining needs the lightly package: pip install 'pneumoscan[ssl]'")
    from ..nets.backbones import check_weights

    check_weights(cfg.backbone, cfg.weights, cfg.pretrained)
    tame_lightning()
    from ..io import atomic_dir
    from ..train.pretrain import WEIGHTS_FILE, describe, pretrain

    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        pretrain(args.data, tmp, cfg, progress=progress_enabled(), command=command_line())
    d = describe(args.out)
    losses = d["epoch_losses"]
    print(f"pretrained {d['backbone']} on {d['images']} images, {d['steps']} steps"
          + (f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""))
    print(f"weights: {args.out}/{WEIGHTS_FILE}  (use: pneumoscan train DATA --weights {args.out}/{WEIGHTS_FILE})")
    return 0
