"""pneumoscan calibrate: temperature, conformal prediction sets and the out-of-distribution gate."""
from __future__ import annotations

from ..evaluate.config import CalibrateConfig
from .common import add_model_arg, add_val_data_arg, check_inputs_exist, check_model_writable, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit temperature, conformal sets and the out-of-distribution gate on "
                                         "validation; stored in the model directory")
    add_model_arg(p, required=True)
    add_val_data_arg(p)
    add_config(p, CalibrateConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(CalibrateConfig, args)
    check_inputs_exist(args.data)
    check_model_writable(args.model)
    from ..evaluate.calibrate import calibrate
    from ..evaluate.card import write_card

    r = calibrate(args.model, args.data, cfg, progress=progress_enabled())
    write_card(args.model)
    c, k, o = r["calibration"], r["conformal"], r["ood"]
    bias = "" if c.get("bias") is None else " and class bias " + "/".join(f"{b:+.2f}" for b in c["bias"])
    if len(c.get("ece_by_scaling") or {}) > 1:
        bias += " (kept: " + c["method"] + "; validation ECE " + ", ".join(
            f"{k} {v:.3f}" for k, v in c["ece_by_scaling"].items()) + ")"
    print(f"temperature {c['temperature']:.3f}{bias}: expected calibration error {c['ece_before']:.3f} -> {c['ece_after']:.3f}, "
          f"Brier {c['brier_before']:.3f} -> {c['brier_after']:.3f} ({c['n']} validation images)")
    print(f"prediction sets at alpha {k['alpha']:g}: held-out coverage {k['heldout']['coverage']:.3f}, mean size "
          f"{k['heldout']['mean_set_size']:.2f} (" + ", ".join(
              f"{lab} {v['coverage']:.2f}/{v['mean_set_size']:.2f}" for lab, v in k["heldout"]["by_class"].items()) + ")")
    print(f"out-of-distribution gate: threshold {o['threshold']:.2f}, flags {o['validation_flagged']:.1%} of validation")
    print(f"written: {args.model}/config.json, {o['file']}, MODEL_CARD.md")
    return 0
