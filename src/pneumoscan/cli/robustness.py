"""pneumoscan robustness: metrics on validation under synthetic shifts, and their drop from clean."""
from __future__ import annotations

from ..evaluate.config import RobustnessConfig
from .common import add_model_arg, check_inputs_exist, check_out, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("robustness", help="validation metrics under contrast, gamma, blur, noise and resolution shifts")
    add_model_arg(p)
    p.add_argument("--data", required=True,
                   help="training folder or manifest CSV (val split used; all images when it has none)")
    p.add_argument("--out", required=True, help="output folder for robustness.json/.csv/.md/.png")
    add_config(p, RobustnessConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(RobustnessConfig, args)
    check_inputs_exist(args.data, args.model)
    check_out(args, "dir")
    from ..evaluate.robustness import HEADERS, robustness

    r = robustness(args.data, args.out, args.model, cfg, progress=progress_enabled())
    keys = ("accuracy_3class", "specificity", "pneumonia_auc", "bv_auc")
    print(f"{r['data']['n']} images ({r['data']['split']}), model {r['model']['id']}")
    print(f"{'condition':<14}" + "".join(f"{HEADERS[k]:>13}" for k in keys))
    for c in r["conditions"]:
        print(f"{c['name']:<14}" + "".join(
            f"{'–' if c['summary'][k] is None else format(c['summary'][k], '.3f'):>13}" for k in keys))
    print(f"written: {args.out}/robustness.json, robustness.csv, robustness.md, robustness.png")
    return 0
