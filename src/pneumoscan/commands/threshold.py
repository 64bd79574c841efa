"""pneumoscan threshold: re-choose a model's pneumonia threshold on its validation split."""
from __future__ import annotations

from . import add_threshold_args, positive_int, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("threshold", help="re-choose the pneumonia threshold on validation; updates config.json")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory whose config.json is updated")
    p.add_argument("--data", default=None,
                   help="training folder or manifest CSV (its val split is used; default: the model's manifest.csv)")
    add_threshold_args(p)
    p.add_argument("--force", action="store_true",
                   help="accept data other than the model's training manifest (validation may overlap training)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="inference batch size")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..threshold import retune

    r = retune(args.model, args.data, method=args.method, target_sensitivity=args.target_sensitivity,
               force=args.force, batch_size=args.batch_size, progress=progress_enabled())
    v = r["val_metrics"]["normal_vs_pneumonia"]
    old = "none" if r["old"] is None else f"{r['old']:.4f}"
    print(f"threshold {old} -> {r['new']:.4f} ({r['method']}, {r['n_val']} validation images)")
    print(f"validation at the new threshold: sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} "
          f"acc {v['accuracy']:.3f}")
    print(f"written: {args.model}/config.json (old value kept in threshold_history)")
    return 0
