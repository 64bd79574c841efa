"""pneumoscan ensemble: one model directory from several (averaged probabilities, optional flip TTA)."""
from __future__ import annotations

from ..evaluate.config import ThresholdConfig
from ..train.config import EnsembleConfig
from .common import (
    add_overwrite,
    check_inputs_exist,
    check_out,
    command_line,
    new_model_dir,
    print_model_summary,
    progress_enabled,
)
from .flags import add_config, build

DATA_HELP = ("training folder or manifest CSV whose val split re-chooses the threshold "
             "(default: the members' shared manifest.csv)")


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="combine model directories into one (averaged probabilities)")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="member model directories")
    p.add_argument("--out", required=True, help="model directory to write")
    add_overwrite(p)
    add_config(p, EnsembleConfig, only=("tta",))
    p.add_argument("--data", default=None, help=DATA_HELP)
    add_config(p, ThresholdConfig, group="threshold on validation")
    p.set_defaults(func=run)


def combine(args, builder: str, check=None, **kw) -> int:
    """Build a combined model (``builder``: build_ensemble or build_soup) in a temporary folder, re-choose
    its threshold on validation, then put it in place with its card: nothing is installed unless all of
    it worked. Every option and output is checked first. ``check(folder, retune_result)`` may refuse
    the model (raise) after its validation figures are known."""
    th = build(ThresholdConfig, args)
    check_inputs_exist(*args.models, args.data)
    check_out(args, "model")
    from ..evaluate.operating_point import retune
    from ..train import ensemble

    builder = getattr(ensemble, builder)
    with new_model_dir(args.out, args.overwrite) as tmp:
        builder(args.models, tmp, force=th.force, command=command_line(), **kw)
        if args.data is not None or (tmp / "manifest.csv").is_file():
            tuned = retune(tmp, args.data, th, progress=progress_enabled())
            if check is not None:
                check(tmp, tuned)
        else:
            import logging
            logging.getLogger(__name__).warning(
                "no validation data (no --data and no shared manifest.csv): the threshold is the mean of the members'")
    print_model_summary(args.out)
    return 0


def run(args) -> int:
    return combine(args, "build_ensemble", tta=build(EnsembleConfig, args).tta)
