"""pneumoscan soup: one network from the weight average of several (model soups, WiSE-FT)."""
from __future__ import annotations

from ..evaluate.config import ThresholdConfig
from ..train.config import EnsembleConfig
from .common import add_overwrite
from .ensemble import DATA_HELP, combine
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("soup", help="average the weights of models of one architecture (model soup / WiSE-FT)",
                       description="Uniform soup: 'soup FT1 FT2 FT3' (fine-tunes of one --init-from model). "
                                   "WiSE-FT: 'soup LP_DIR FT_DIR --coefficients 0.5,0.5'.")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR",
                   help="single models that started from the same weights (e.g. fine-tunes of one --init-from)")
    p.add_argument("--out", required=True, help="model directory to write")
    add_overwrite(p)
    add_config(p, EnsembleConfig, only=("coefficients", "max_auc_drop", "max_accuracy_drop"))
    p.add_argument("--data", default=None, help=DATA_HELP)
    add_config(p, ThresholdConfig, group="threshold on validation")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(EnsembleConfig, args)
    cfg.check_members(len(args.models))

    def holds(folder, tuned: dict) -> None:
        """Refuse a soup whose validation figures fall below its weakest member's; record the comparison."""
        from ..io import atomic_write_json
        from ..nets.modeldir import CONFIG_NAME, read_config
        from ..train.ensemble import check_soup

        conf = read_config(folder)
        conf["soup"]["check"] = check_soup(tuned["val_metrics"], tuned["manifest_sha256"], conf["soup"]["members"], cfg)
        atomic_write_json(folder / CONFIG_NAME, conf)

    return combine(args, "build_soup", check=holds, coefficients=cfg.coefficients)
