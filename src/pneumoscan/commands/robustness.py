"""pneumoscan robustness: metrics on validation under synthetic shifts, and their drop from clean."""
from __future__ import annotations

from . import add_model_arg, positive_int, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("robustness", help="validation metrics under contrast, gamma, blur, noise and resolution shifts")
    add_model_arg(p)
    p.add_argument("--data", required=True,
                   help="training folder or manifest CSV (val split used; all images when it has none)")
    p.add_argument("--out", required=True, help="output folder for robustness.json/.csv/.md/.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise shifts")
    p.add_argument("--n-boot", type=int, default=0, help="bootstrap resamples per condition (0 = none, fastest)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="inference engine; auto: ONNX Runtime (exported on the fly when the model has no export)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="inference batch size")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import PneumoscanError
    from ..robustness import HEADERS, robustness

    import logging

    if args.verbose < 2:  # the on-the-fly ONNX export logs every graph pass at INFO
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.n_boot < 0:
        raise PneumoscanError(f"--n-boot {args.n_boot} must be 0 or more")
    r = robustness(args.data, args.out, args.model, seed=args.seed, batch_size=args.batch_size,
                   backend=args.backend, n_boot=args.n_boot, progress=progress_enabled())
    keys = ("accuracy_3class", "specificity", "pneumonia_auc", "bv_auc")
    print(f"{r['data']['n']} images ({r['data']['split']}), model {r['model']['id']}")
    print(f"{'condition':<14}" + "".join(f"{HEADERS[k]:>13}" for k in keys))
    for c in r["conditions"]:
        print(f"{c['name']:<14}" + "".join(
            f"{'–' if c['summary'][k] is None else format(c['summary'][k], '.3f'):>13}" for k in keys))
    print(f"written: {args.out}/robustness.json, robustness.csv, robustness.md, robustness.png")
    return 0
