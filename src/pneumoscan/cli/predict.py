"""pneumoscan predict PATH...: class, probabilities, pneumonia verdict; a table, JSON or CSV."""
from __future__ import annotations

from ..predict import PredictConfig
from .common import add_model_arg, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict image files or folders")
    p.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM) or folders")
    add_model_arg(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output: a header, then one row per input (errors too)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the table/JSON/CSV to FILE instead of stdout")
    add_config(p, PredictConfig)
    p.set_defaults(func=run)


def csv_rows(preds, errors, labels) -> list[list]:
    """Header plus one row per input, in input order: a prediction, or the reason it has none."""
    rows = [["path", "label", *[f"p_{lab}" for lab in labels], "pneumonia", "threshold", "warnings", "error"]]
    for p in preds:
        rows.append([p.path, p.label, *[f"{p.probabilities[lab]:.4f}" for lab in labels], int(p.pneumonia),
                     f"{p.threshold:.4f}", " | ".join(p.warnings), ""])
    for path, err in errors:
        rows.append([path, "", *([""] * len(labels)), "", "", "", err])
    return rows


def summary_line(preds, errors, labels) -> str:
    from collections import Counter

    c = Counter(p.label for p in preds)
    return (f"{len(preds)} predicted (" + ", ".join(f"{lab} {c.get(lab, 0)}" for lab in labels)
            + f"), {len(errors)} failed")


def run(args) -> int:
    import csv
    import io
    import json
    import sys

    from .. import INTENDED_USE, LABELS
    from ..data.index import iter_image_files
    from ..errors import PneumoscanError
    from ..io import atomic_write_text, check_writable
    from ..predict import Predictor

    cfg = build(PredictConfig, args)
    if args.out:
        check_writable(args.out, "file")
    files, missing = iter_image_files(args.paths)
    if not files:
        what = "; ".join(f"{p}: {e}" for p, e in missing) or "no JPEG, PNG or DICOM files in the given folders"
        raise PneumoscanError(f"nothing to predict ({what})")
    pred = Predictor(args.model, backend=cfg.backend, prevalence=cfg.prevalence)
    preds, errors = pred.predict_files([str(f) for f in files], batch_size=cfg.batch_size,
                                       progress=progress_enabled() and len(files) > 1)
    errors = missing + errors
    if not preds:  # nothing usable at all: one line and exit 2, like every other user mistake
        path, err = errors[0]
        more = f" (and {len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        raise PneumoscanError((err if path in err else f"{path}: {err}") + more)
    buf = io.StringIO()
    if args.json:
        json.dump({"intended_use": INTENDED_USE, "model": pred.model_id, "model_card": pred.card_path,
                   "threshold": pred.threshold, "predictions": [p.to_dict() for p in preds],
                   "errors": [{"path": p, "error": e} for p, e in errors]}, buf, indent=2)
        buf.write("\n")
    elif args.csv:
        csv.writer(buf).writerows(csv_rows(preds, errors, LABELS))
    else:
        buf.write(f"# {INTENDED_USE}\n# model {pred.model_id}, pneumonia threshold {pred.threshold:.3f}\n")
        width = max([len(p.path) for p in preds] + [4])
        buf.write(f"{'path':<{width}}  {'label':<9}  " + "  ".join(f"{lab:>9}" for lab in LABELS) + "  pneumonia\n")
        for p in preds:
            buf.write(f"{p.path:<{width}}  {p.label:<9}  " + "  ".join(f"{p.probabilities[lab]:>9.3f}" for lab in LABELS)
                      + f"  {'yes' if p.pneumonia else 'no':>9}\n")
            for w_ in p.warnings:
                buf.write(f"  warning: {w_}\n")
        if len(preds) + len(errors) > 1:
            buf.write(f"# {summary_line(preds, errors, LABELS)}\n")
    if args.out:
        atomic_write_text(args.out, buf.getvalue())
        print(f"{summary_line(preds, errors, LABELS)}; written: {args.out}")
    else:
        sys.stdout.write(buf.getvalue())
    for path, err in errors:
        print(f"pneumoscan: error: {err}" if path in err else f"pneumoscan: error: {path}: {err}", file=sys.stderr)
    return 1 if errors else 0
