"""pneumoscan finetune: end-to-end fine-tuning (Lightning; multi-GPU / multi-node via DDP)."""
from __future__ import annotations

from ..train.config import AugmentConfig, FinetuneConfig
from .common import (
    add_overwrite,
    check_inputs_exist,
    check_out,
    command_line,
    new_model_dir,
    print_model_summary,
    progress_enabled,
    tame_lightning,
)
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune backbone + head end to end; writes a model directory")
    p.add_argument("data", help="data folder or manifest CSV")
    p.add_argument("--out", required=True, help="model directory to write")
    add_overwrite(p)
    add_config(p, FinetuneConfig, exclude=("augment",))
    add_config(p, AugmentConfig, group="augmentation (batch, on the training device)")
    p.add_argument("--no-augment", action="store_true", help="switch every augmentation off")
    p.set_defaults(func=run)


def run(args) -> int:
    aug = AugmentConfig(**{k: 0 if k != "flip" else False for k in AugmentConfig.__dataclass_fields__}) \
        if args.no_augment else build(AugmentConfig, args)
    cfg = build(FinetuneConfig, args, augment=aug)
    check_inputs_exist(args.data, cfg.init_from)
    check_out(args, "model")
    cfg.check_machine()  # devices, accelerator, strategy: before any data is read
    from ..nets.backbones import check_weights

    check_weights(cfg.backbone, cfg.weights, cfg.pretrained)  # before any data is read
    tame_lightning()
    from ..train.finetune import finetune

    with new_model_dir(args.out, args.overwrite) as tmp:
        out = finetune(args.data, tmp, cfg, progress=progress_enabled(), command=command_line())
        if out is None:  # a non-zero DDP rank: rank 0 writes and reports
            return 0
    print_model_summary(args.out)
    return 0
