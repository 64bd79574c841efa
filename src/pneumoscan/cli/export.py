"""pneumoscan export: the model as one ONNX graph, parity-checked against PyTorch (and, with --int8, an
INT8 copy kept only if it passes the validation gate)."""
from __future__ import annotations

from ..export.config import ExportConfig, QuantizeConfig
from .common import add_model_arg, check_model_writable
from .flags import add_config, build

DATA_HELP = ("with --int8: the training folder or manifest CSV the model was trained on (its train split "
             "calibrates, its val split is the gate; default: the model's manifest.csv)")


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model directory to ONNX (model.onnx next to config.json)")
    add_model_arg(p)
    add_config(p, ExportConfig, only=("opset", "int8"))
    add_config(p, QuantizeConfig, group="INT8 (with --int8)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(ExportConfig, args)
    qcfg = build(QuantizeConfig, args)
    from ..nets.modeldir import resolve_model_dir as _resolve
    check_model_writable(_resolve(args.model))  # before torch is imported
    plan = None
    if cfg.int8:  # the images the INT8 gate needs are checked before the minute of exporting
        from ..export.int8 import plan_int8

        if qcfg.quantiser == "nncf":
            import importlib.util

            if importlib.util.find_spec("nncf") is None:
                from ..errors import ModelError
                raise ModelError("--quantiser nncf needs NNCF (pip install 'pneumoscan[int8]'); or use "
                                 "--quantiser onnxruntime")
        plan = plan_int8(_resolve(args.model), args.data, qcfg)
    from ..evaluate.card import write_card
    from ..export.onnx import export_onnx
    from ..nets.modeldir import read_config, resolve_model_dir

    model_dir = check_model_writable(resolve_model_dir(args.model))
    path = export_onnx(model_dir, cfg)
    write_card(model_dir)
    info = read_config(model_dir)["onnx"]
    par = info["parity"]
    print(f"exported {path} (opset {info['opset']}, dynamic batch)")
    print(f"parity vs PyTorch on {par['samples']} inputs: max probability difference {par['max_abs_prob_diff']:.2e} "
          f"(tolerance {par['tolerance']:.0e}), same class: {'yes' if par['same_class'] else 'no'}")
    if plan is not None:
        from ..export.int8 import INT8_NAME, export_int8

        g = export_int8(model_dir, args.data, qcfg, plan=plan)  # Int8GateError: one line, nothing written
        write_card(model_dir)
        w = read_config(model_dir)["onnx"]["int8"]
        print(f"kept {model_dir / INT8_NAME}: {_gate_line(g)}; {w['weights']}-range weights ({w['weights_why']})")
    return 0


def _gate_line(g: dict) -> str:
    auc = ("AUC not computable (one class)" if g["auc_drop"] is None
           else f"normal-vs-pneumonia AUC {g['auc_int8']:.4f} vs fp32 {g['auc_fp32']:.4f}")
    guard = (f" ({g['guard']['fp32_share']:.1%} of them run again in fp32 by the guard; INT8 alone "
             f"{g['int8_alone']['agreement']:.1%})" if g.get("guard") else "")
    return f"{auc}, identical verdicts {g['agreement']:.1%} of {g['images']} validation images{guard}"
