"""pneumoscan evaluate: metrics.json, confusion matrix, ROC curves and a report."""
from __future__ import annotations

from . import add_model_arg, positive_int, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score every image under a folder (no split) and write metrics")
    p.add_argument("--data", required=True, help="folder in the redistribution or three-class layout")
    add_model_arg(p)
    p.add_argument("--out", required=True, help="output folder for metrics.json, plots and report.md")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="inference engine")
    p.add_argument("--prevalence", type=float, default=None,
                   help="expected share of pneumonia in your data: corrects probabilities for the prior shift")
    p.add_argument("--batch-size", type=positive_int, default=32, help="inference batch size")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="feature cache for frozen-backbone models (default ~/.cache/pneumoscan/features)")
    p.add_argument("--no-cache", action="store_true", help="always run full-image inference (no feature cache)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate import evaluate

    m = evaluate(args.data, args.out, args.model, backend=args.backend, batch_size=args.batch_size,
                 progress=progress_enabled(), prevalence=args.prevalence,
                 cache_dir=False if args.no_cache else args.cache)
    v = m["normal_vs_pneumonia"]
    print(f"{m['n']} images: 3-class acc {m['three_class']['accuracy']:.3f}, macro F1 {m['three_class']['macro_f1']:.3f}")
    print(f"normal vs pneumonia: acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} "
          f"F1 {v['f1']:.3f} AUC {v['auc'] if v['auc'] is not None else float('nan'):.4f}")
    print(f"written: {args.out}/metrics.json, confusion_matrix.png, roc.png, report.md")
    return 0
