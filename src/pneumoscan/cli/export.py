"""pneumoscan export: the model as one ONNX graph, parity-checked against PyTorch."""
from __future__ import annotations

from ..export.config import ExportConfig
from .common import add_model_arg, check_model_writable
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model directory to ONNX (model.onnx next to config.json)")
    add_model_arg(p)
    add_config(p, ExportConfig, only=("opset",))
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build(ExportConfig, args)
    from ..nets.modeldir import resolve_model_dir as _resolve
    check_model_writable(_resolve(args.model))  # before torch is imported
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
    return 0
