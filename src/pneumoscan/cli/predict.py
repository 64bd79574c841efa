"""pneumoscan predict PATH...: verdict, calibrated probabilities, prediction set; a table, JSON or CSV.

Exit status: 0 every input answered, 1 some files could not be read, 3 none failed but some inputs are
out of scope (no diagnosis: ``in_scope`` false, ``label`` null, ``reasons``), 2 a usage error.
"""
from __future__ import annotations

from ..predict import PredictConfig
from .common import EXIT_OUT_OF_SCOPE, add_model_arg, check_out, file_error, print_file_errors, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict image files or folders",
                       description="Exit status: 0 every input answered; 1 some files could not be read; 3 none failed "
                                   "but some inputs are out of scope (not a pediatric frontal chest X-ray: no diagnosis); "
                                   "2 a usage error.")
    p.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM) or folders")
    add_model_arg(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output: a header, then one row per input (errors too)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the table/JSON/CSV to FILE instead of stdout")
    add_config(p, PredictConfig)
    p.set_defaults(func=run)


def _fmt(v, spec: str = ".4f") -> str:
    return "" if v is None else format(v, spec)


def csv_rows(preds, errors, labels) -> list[list]:
    """Header plus one row per input, in input order: a prediction, or the reason it has none."""
    rows = [["path", "in_scope", "label", "verdict", *[f"p_{lab}" for lab in labels], "pneumonia", "threshold",
             "prediction_set", "ood_score", "reasons", "warnings", "error"]]
    for p in preds:
        probs = [_fmt(p.probabilities[lab]) if p.probabilities else "" for lab in labels]
        rows.append([p.path, int(p.in_scope), p.label or "", p.verdict, *probs,
                     "" if p.pneumonia is None else int(p.pneumonia), f"{p.threshold:.4f}", "|".join(p.prediction_set or []),
                     _fmt(p.ood_score, ".3f"), " | ".join(p.reasons), " | ".join(p.warnings), ""])
    for path, err in errors:
        rows.append([path, "", "", "", *([""] * len(labels)), "", "", "", "", "", "", err])
    return rows


def summary_line(preds, errors, labels) -> str:
    from collections import Counter

    c = Counter(p.verdict for p in preds if p.in_scope)
    out = sum(not p.in_scope for p in preds)
    extra = [f"{k} {v}" for k, v in c.items() if k not in labels]
    return (f"{len(preds) - out} answered (" + ", ".join([f"{lab} {c.get(lab, 0)}" for lab in labels] + extra)
            + f"), {out} out of scope, {len(errors)} failed")


def table(preds, errors, pred, labels) -> str:
    import io

    from .. import INTENDED_USE

    buf = io.StringIO()
    buf.write(f"# {INTENDED_USE}\n# model {pred.model_id}, pneumonia threshold {pred.threshold:.3f}"
              + (f", prediction sets at error rate {pred.config['conformal']['alpha']:g}" if pred.qhat is not None else "")
              + "\n")
    width = max([len(p.path) for p in preds] + [4])
    vw = max([len(p.verdict) for p in preds if p.in_scope] + [9])
    buf.write(f"{'path':<{width}}  {'verdict':<{vw}}  " + "  ".join(f"{lab:>9}" for lab in labels)
              + "  pneumonia  set\n")
    for p in preds:
        if not p.in_scope:
            score = "" if p.ood_score is None else f" (out-of-distribution score {p.ood_score:.2f})"
            buf.write(f"{p.path:<{width}}  {p.verdict}: no diagnosis{score}\n")
            for r in p.reasons:
                buf.write(f"  reason: {r}\n")
        else:
            buf.write(f"{p.path:<{width}}  {p.verdict:<{vw}}  "
                      + "  ".join(f"{p.probabilities[lab]:>9.3f}" for lab in labels)
                      + f"  {'yes' if p.pneumonia else 'no':>9}  " + ("{" + ", ".join(p.prediction_set) + "}"
                                                                     if p.prediction_set else "-") + "\n")
        for w_ in p.warnings:
            buf.write(f"  warning: {w_}\n")
    if len(preds) + len(errors) > 1:
        buf.write(f"# {summary_line(preds, errors, labels)}\n")
    return buf.getvalue()


def run(args) -> int:
    import csv
    import io
    import json
    import sys

    from .. import INTENDED_USE, LABELS
    from ..data.index import iter_image_files
    from ..errors import PneumoscanError
    from ..io import atomic_write_text
    from ..predict import Predictor

    cfg = build(PredictConfig, args)
    if args.out is not None:
        check_out(args, "file")
    files, missing = iter_image_files(args.paths)
    if not files:
        what = "; ".join(f"{p}: {e}" for p, e in missing) or "no JPEG, PNG or DICOM files in the given folders"
        raise PneumoscanError(f"nothing to predict ({what})")
    pred = Predictor(args.model, backend=cfg.backend, prevalence=cfg.prevalence, precision=cfg.precision)
    preds, errors = pred.predict_files([str(f) for f in files], batch_size=cfg.batch_size,
                                       progress=progress_enabled() and len(files) > 1)
    errors = missing + errors
    if not preds:  # nothing usable at all: one line and exit 2, like every other user mistake
        path, err = errors[0]
        more = f" (and {len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        raise PneumoscanError(file_error(path, err) + more)
    buf = io.StringIO()
    if args.json:
        json.dump({"intended_use": INTENDED_USE, "model": pred.model_id, "model_card": pred.card_path,
                   "threshold": pred.threshold, "temperature": pred.temperature,
                   "conformal_alpha": (pred.config.get("conformal") or {}).get("alpha"),
                   "ood_threshold": pred.ood_threshold, "predictions": [p.to_dict() for p in preds],
                   "errors": [{"path": p, "error": e} for p, e in errors]}, buf, indent=2)
        buf.write("\n")
    elif args.csv:
        csv.writer(buf).writerows(csv_rows(preds, errors, LABELS))
    else:
        buf.write(table(preds, errors, pred, LABELS))
    if args.out:
        atomic_write_text(args.out, buf.getvalue())
        print(f"{summary_line(preds, errors, LABELS)}; written: {args.out}")
    else:
        sys.stdout.write(buf.getvalue())
    print_file_errors(errors)
    return 1 if errors else (EXIT_OUT_OF_SCOPE if any(not p.in_scope for p in preds) else 0)
