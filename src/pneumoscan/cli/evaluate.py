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
    from ..evaluate.evaluate import evaluate

    m = evaluate(args.data, args.out, args.model, cfg, progress=progress_enabled())
    v = m["normal_vs_pneumonia"]
    print(f"{m['n']} images: 3-class acc {m['three_class']['accuracy']:.3f}, macro F1 {m['three_class']['macro_f1']:.3f}")
    print(f"normal vs pneumonia: acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} "
          f"F1 {v['f1']:.3f} AUC {v['auc'] if v['auc'] is not None else float('nan'):.4f}")
    if m["training_overlap"]["n"]:
        from ..evaluate.evaluate import overlap_sentence
        print(f"WARNING: {overlap_sentence(m)}")
    print(f"written: {args.out}/metrics.json, report.html, report.md, predictions.csv and the figures")
    return 0
