"""pneumoscan scope-suite: how many inputs that are not pediatric chest X-rays the gate stops."""
from __future__ import annotations

from ..evaluate.config import ScopeSuiteConfig
from .common import add_model_arg, add_val_data_arg, check_inputs_exist, check_model_writable, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("scope-suite", help="run the out-of-scope suite (blank, noise, photos, text, transformed "
                                           "X-rays) against a model's gate and write the detection rates")
    add_model_arg(p)
    add_val_data_arg(p)
    p.add_argument("--out", default="docs/results", metavar="DIR",
                   help="folder for scope-suite.json and scope-suite.md (default: docs/results)")
    add_config(p, ScopeSuiteConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(ScopeSuiteConfig, args)
    check_inputs_exist(args.data)
    from ..io import check_writable

    check_writable(args.out, "dir")
    if cfg.record:
        check_model_writable(args.model)
    import datetime as dt

    from ..evaluate import scope_suite
    from ..predict import Predictor

    pred = Predictor(args.model)
    try:
        report = scope_suite.run_for_model(pred, args.data, cfg, progress=progress_enabled())
    finally:
        pred.close()
    scope_suite.write(report, args.out, pred.model_id)
    for name, g in report["groups"].items():
        met = report["met"].get(name, report["met"]["validation_false_alarms"] if name == "validation_clean" else None)
        print(f"{name:<18} {g['n']:>5} inputs  {g['flagged']:>6.1%} stopped" + ("" if met is None else
                                                                             f"  target {'met' if met else 'MISSED'}"))
    if cfg.record:
        from ..evaluate.card import write_card
        from ..io import atomic_write_json
        from ..nets.modeldir import CONFIG_NAME, read_config

        conf = read_config(pred.model_dir)
        conf["scope_suite"] = {"written": dt.date.today().isoformat(), "met": report["met"],
                               "groups": {k: {"n": g["n"], "flagged": g["flagged"]} for k, g in report["groups"].items()}}
        atomic_write_json(pred.model_dir / CONFIG_NAME, conf)
        write_card(pred.model_dir)
    print(f"written: {args.out}/scope-suite.json, {args.out}/scope-suite.md" + (
        f", {pred.model_dir}/config.json, MODEL_CARD.md" if cfg.record else ""))
    return 0
