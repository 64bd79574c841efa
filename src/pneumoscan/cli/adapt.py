"""pneumoscan adapt IMAGES...: estimate the class prior at a new site from unlabelled images."""
from __future__ import annotations

from ..evaluate.adapt import AdaptConfig
from .common import add_model_arg, check_inputs_exist, check_out, print_file_errors, progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("adapt", help="estimate how common each class is among unlabelled images of a new site",
                       description="Label shift only: the estimate is reported, not applied; pass its prevalence "
                                   "to 'pneumoscan predict --prevalence' if you decide to.")
    p.add_argument("paths", nargs="+", help="unlabelled image files or folders from the new site")
    add_model_arg(p)
    p.add_argument("--data", default=None,
                   help="bbse: training folder or manifest CSV with the model's validation split "
                        "(default: the model's manifest.csv)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the estimate as JSON")
    add_config(p, AdaptConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(AdaptConfig, args)
    check_inputs_exist(*args.paths, args.data)
    if args.out is not None:
        check_out(args, "file")
    from .. import LABELS
    from ..data.index import iter_image_files
    from ..errors import PneumoscanError
    from ..evaluate.adapt import adapt
    from ..io import atomic_write_json
    from ..predict import Predictor

    files, problems = iter_image_files(args.paths)
    if not files:
        what = "; ".join(f"{p}: {e}" for p, e in problems) or "no JPEG, PNG or DICOM images in " + ", ".join(
            map(str, args.paths))
        raise PneumoscanError(f"nothing to adapt to ({what})")
    pred = Predictor(args.model)
    validation = None
    if cfg.method == "bbse":
        from ..data.splits import check_classes, validation_set
        from ..evaluate.operating_point import score

        ev = validation_set(args.data, pred.config, pred.model_dir, can_force=False)
        check_classes(ev.y, ev.source, "bbse")  # its confusion matrix must be invertible
        validation = score(pred, ev, cfg.batch_size, progress_enabled())
    r = adapt([str(f) for f in files], pred, cfg, validation=validation, progress=progress_enabled())
    r["errors"] = [{"path": p, "error": e} for p, e in problems] + r["errors"]  # every file not used, named
    r["failed"] = len(r["errors"])
    print_file_errors((e["path"], e["error"]) for e in r["errors"])
    stopped = f", {r['out_of_scope']} out of scope and left out" if r["out_of_scope"] else ""
    print(f"{r['n']} images ({r['failed']} failed{stopped}), model {r['model']}, method {r['method']}")
    print(f"{'class':<11}{'model prior':>13}{'predicted':>11}{'estimated':>11}")
    for lab in LABELS:
        print(f"{lab:<11}{r['model_prior'][lab]:>13.3f}{r['predicted_share'][lab]:>11.3f}{r['prior'][lab]:>11.3f}")
    prev = r["pneumonia_prevalence"]
    if 0.005 < prev < 0.995:
        print(f"estimated pneumonia prevalence {prev:.3f}: to correct for it, pneumoscan predict ... --prevalence {prev:.3f}")
    else:
        print(f"estimated pneumonia prevalence {prev:.3f}: these images look {'all' if prev >= 0.995 else 'free of'} "
              "pneumonia to the model; no prior correction applies")
    if r.get("warning"):
        print(f"WARNING: {r['warning']}")
    if args.out:
        atomic_write_json(args.out, r)
    return 1 if r["errors"] else 0  # as predict: the estimate stands, but some files were not read
