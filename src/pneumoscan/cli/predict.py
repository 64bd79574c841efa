"""pneumoscan predict PATH...: class, probabilities, pneumonia verdict."""
from __future__ import annotations

from ..predict import PredictConfig
from .common import add_model_arg
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict image files or folders")
    p.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM) or folders")
    add_model_arg(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output")
    add_config(p, PredictConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    import csv
    import json
    import sys

    from .. import INTENDED_USE, LABELS
    from ..data.index import iter_image_files
    from ..errors import PneumoscanError
    from ..predict import Predictor

    cfg = build(PredictConfig, args)
    files, missing = iter_image_files(args.paths)
    if not files:
        what = "; ".join(f"{p}: {e}" for p, e in missing) or "no JPEG, PNG or DICOM files in the given folders"
        raise PneumoscanError(f"nothing to predict ({what})")
    pred = Predictor(args.model, backend=cfg.backend, prevalence=cfg.prevalence)
    preds, errors = pred.predict_files([str(f) for f in files], batch_size=cfg.batch_size)
    errors = missing + errors
    if not preds:  # nothing usable at all: one line and exit 2, like every other user mistake
        path, err = errors[0]
        more = f" (and {len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        raise PneumoscanError((err if path in err else f"{path}: {err}") + more)
    if args.json:
        json.dump({"intended_use": INTENDED_USE, "model": pred.model_id, "model_card": pred.card_path,
                   "threshold": pred.threshold, "predictions": [p.to_dict() for p in preds],
                   "errors": [{"path": p, "error": e} for p, e in errors]}, sys.stdout, indent=2)
        print()
    elif args.csv:
        print(f"# {INTENDED_USE}")
        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", *[f"p_{lab}" for lab in LABELS], "pneumonia", "threshold", "warnings"])
        for p in preds:
            w.writerow([p.path, p.label, *[f"{p.probabilities[lab]:.4f}" for lab in LABELS], int(p.pneumonia),
                        f"{p.threshold:.4f}", " | ".join(p.warnings)])
    else:
        print(f"# {INTENDED_USE}")
        print(f"# model {pred.model_id}, pneumonia threshold {pred.threshold:.3f}")
        width = max([len(p.path) for p in preds] + [4])
        print(f"{'path':<{width}}  {'label':<9}  " + "  ".join(f"{lab:>9}" for lab in LABELS) + "  pneumonia")
        for p in preds:
            print(f"{p.path:<{width}}  {p.label:<9}  " + "  ".join(f"{p.probabilities[lab]:>9.3f}" for lab in LABELS)
                  + f"  {'yes' if p.pneumonia else 'no':>9}")
            for w_ in p.warnings:
                print(f"  warning: {w_}")
    for path, err in errors:
        print(f"pneumoscan: error: {err}" if path in err else f"pneumoscan: error: {path}: {err}", file=sys.stderr)
    return 1 if errors else 0
