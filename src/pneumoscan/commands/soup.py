"""pneumoscan soup: one network from the weight average of several (model soups, WiSE-FT)."""
from __future__ import annotations

from . import add_threshold_args, positive_int, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("soup", help="average the weights of models of one architecture (model soup / WiSE-FT)")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR",
                   help="single models that started from the same weights (e.g. fine-tunes of one --init-from)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--coefficients", type=float, nargs="+", default=None,
                   help="one weight per model (normalised to sum 1; default uniform). WiSE-FT: "
                        "'soup LP_DIR FT_DIR --coefficients 0.5 0.5'")
    p.add_argument("--data", default=None,
                   help="training folder or manifest CSV whose val split re-chooses the threshold "
                        "(default: the members' shared manifest.csv)")
    add_threshold_args(p)
    p.add_argument("--force", action="store_true", help="allow members trained on different manifests")
    p.add_argument("--batch-size", type=positive_int, default=32, help="inference batch size")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    import sys

    from ..ensemble import build_soup
    from . import print_model_summary

    out = build_soup(args.models, args.out, coefficients=args.coefficients, data=args.data, force=args.force,
                     method=args.method, target_sensitivity=args.target_sensitivity, batch_size=args.batch_size,
                     progress=progress_enabled(), command="pneumoscan " + shlex.join(sys.argv[1:]))
    print_model_summary(out)
    return 0
