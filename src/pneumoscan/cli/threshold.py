"""pneumoscan threshold: re-choose a model's pneumonia threshold on its validation split."""
from __future__ import annotations

from ..evaluate.config import ThresholdConfig
from .common import add_model_arg, add_val_data_arg, check_inputs_exist, check_model_writable, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("threshold", help="re-choose the pneumonia threshold on validation; updates config.json")
    add_model_arg(p, required=True)
    add_val_data_arg(p)
    add_config(p, ThresholdConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(ThresholdConfig, args)
    check_inputs_exist(args.data)
    check_model_writable(args.model)
    from ..evaluate.card import write_card
    from ..evaluate.operating_point import retune

    r = retune(args.model, args.data, cfg, progress=progress_enabled())
    write_card(args.model)
    v = r["val_metrics"]["normal_vs_pneumonia"]
    old = "none" if r["old"] is None else f"{r['old']:.4f}"
    print(f"threshold {old} -> {r['new']:.4f} ({r['method']}, {r['n_val']} validation images)")
    print(f"validation at the new threshold: sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} "
          f"acc {v['accuracy']:.3f}")
    print(f"written: {args.model}/config.json (old value kept in threshold_history)")
    return 0
