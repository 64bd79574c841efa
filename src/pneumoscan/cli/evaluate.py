"""pneumoscan evaluate: metrics.json, confusion matrix, ROC curves and a report."""
from __future__ import annotations

from ..evaluate.config import EvaluateConfig
from .common import add_model_arg, check_inputs_exist, check_out, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score every image under a folder (no split) and write metrics")
    p.add_argument("--data", required=True, help="folder in the redistribution or three-class layout")
    add_model_arg(p)
    p.add_argument("--out", required=True, help="output folder for metrics.json, plots and report.md")
    add_config(p, EvaluateConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(EvaluateConfig, args)
    check_inputs_exist(args.data, args.model)
    check_out(args, "dir")
    import sys

    from ..evaluate.evaluate import absent_classes, evaluate, fmt, overlap_sentence

    m = evaluate(args.data, args.out, args.model, cfg, progress=progress_enabled())
    v, three = m["normal_vs_pneumonia"], m["three_class"]
    print(f"{m['n']} images: 3-class acc {fmt(three['accuracy'])}, macro F1 {fmt(three['macro_f1'])}")
    print(f"normal vs pneumonia: acc {fmt(v['accuracy'])} sens {fmt(v['sensitivity'])} spec {fmt(v['specificity'])} "
          f"F1 {fmt(v['f1'])} AUC {fmt(v['auc'], '.4f')}")
    if m.get("undefined"):
        absent = absent_classes(m)
        print("n/a: not defined on these images" + (f" (no {' and no '.join(absent)} images)" if absent else "")
              + "; report.md lists each such figure")
    if m["training_overlap"]["n"]:
        print(f"WARNING: {overlap_sentence(m)}")
    dropped = m["data"].get("not_scored") or []
    if dropped:
        print(f"pneumoscan: warning: {len(dropped)} files under {args.data} not scored (listed in report.md and "
              "metrics.json):", file=sys.stderr)
        for d in dropped:
            print(f"pneumoscan: warning: {d['path']}: {d['stage']} ({d['reason']})", file=sys.stderr)
    print(f"written: {args.out}/metrics.json, report.html, report.md, predictions.csv and the figures")
    return 0
