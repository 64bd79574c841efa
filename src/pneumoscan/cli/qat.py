"""pneumoscan qat: a quantisation-aware copy of a model, distilled from it, for an INT8 export that keeps its answers."""
from __future__ import annotations

from ..evaluate.config import ThresholdConfig
from ..train.config import QatConfig
from .common import (
    add_overwrite,
    check_inputs_exist,
    check_out,
    command_line,
    new_model_dir,
    print_model_summary,
    progress_enabled,
    tame_lightning,
)
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("qat", help="quantisation-aware copy of a model (distilled from it) for export --int8",
                       description="Fine-tunes a copy of MODEL_DIR under emulated INT8 (ONNX Runtime's QDQ scheme) "
                                   "to give MODEL_DIR's verdicts; then: export, calibrate, export --int8 on --out.")
    p.add_argument("model", metavar="MODEL_DIR", help="the teacher: a single-network model directory (e.g. a soup)")
    p.add_argument("--out", required=True, help="model directory to write")
    add_overwrite(p)
    p.add_argument("--data", default=None, help="training folder or manifest CSV (default: the model's manifest.csv)")
    add_config(p, QatConfig)
    add_config(p, ThresholdConfig, group="threshold on validation", exclude=("batch_size",))
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(QatConfig, args)
    th = build(ThresholdConfig, args)
    check_inputs_exist(args.model, args.data)
    check_out(args, "model")
    cfg.check_machine()
    tame_lightning()
    from ..evaluate.operating_point import retune
    from ..train.qat import qat

    with new_model_dir(args.out, args.overwrite) as tmp:
        out = qat(args.model, tmp, args.data, cfg, progress=progress_enabled(), command=command_line())
        if out is None:  # a non-zero DDP rank
            return 0
        retune(tmp, args.data, th, progress=progress_enabled())
    print_model_summary(args.out)
    return 0
