"""pneumoscan ensemble: one model directory from several (averaged probabilities, optional flip TTA)."""
from __future__ import annotations

from . import add_threshold_args, positive_int, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="combine model directories into one (averaged probabilities)")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="member model directories")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--tta", default="none", choices=["none", "flip"],
                   help="test-time augmentation inside the model: also average the horizontally flipped image")
    p.add_argument("--data", default=None,
                   help="training folder or manifest CSV whose val split re-chooses the threshold "
                        "(default: the members' shared manifest.csv)")
    add_threshold_args(p)
    p.add_argument("--force", action="store_true",
                   help="allow members trained on different manifests (validation may overlap training)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="inference batch size")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import shlex
    import sys

    from ..ensemble import build_ensemble

    out = build_ensemble(args.models, args.out, tta=args.tta, data=args.data, force=args.force,
                         method=args.method, target_sensitivity=args.target_sensitivity,
                         batch_size=args.batch_size, progress=progress_enabled(),
                         command="pneumoscan " + shlex.join(sys.argv[1:]))
    cfg = json.loads((out / "config.json").read_text())
    print(f"ensemble: {out} ({len(cfg['members'])} members, tta {cfg['tta']}), threshold {cfg['threshold']:.3f} "
          f"({cfg['threshold_method']})")
    vm = cfg.get("val_metrics")
    if vm:
        v = vm["normal_vs_pneumonia"]
        print(f"validation ({vm['n']} images): 3-class acc {vm['three_class']['accuracy']:.3f}; normal vs pneumonia "
              f"acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} AUC {v['auc']:.4f}")
    return 0
