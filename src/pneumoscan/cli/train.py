"""pneumoscan train: the study's top model on cached features."""
from __future__ import annotations

from ..features.config import ExtractConfig
from ..io import check_writable
from ..train.config import TrainConfig
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
    p = sub.add_parser("train", help="train the top model on frozen-backbone features; writes a model directory")
    p.add_argument("data", help="data folder or manifest CSV")
    p.add_argument("--out", required=True, help="model directory to write")
    add_overwrite(p)
    add_config(p, TrainConfig)
    add_config(p, ExtractConfig, group="feature extraction")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg, ext = build(TrainConfig, args), build(ExtractConfig, args)  # options checked before any import
    check_inputs_exist(args.data)
    check_out(args, "model")
    if ext.cache:
        check_writable(ext.cache, "dir", "--cache")
    from ..nets.backbones import check_weights

    check_weights(cfg.backbone, cfg.weights, cfg.pretrained)  # before any data is read
    tame_lightning()
    from ..train.head import train

    with new_model_dir(args.out, args.overwrite) as tmp:
        train(args.data, tmp, cfg, extract=ext, progress=progress_enabled(), command=command_line())
    print_model_summary(args.out)
    return 0
