"""pneumoscan export: the model as one ONNX graph, parity-checked against PyTorch."""
from __future__ import annotations

from . import add_model_arg


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model directory to ONNX (model.onnx next to config.json)")
    add_model_arg(p)
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..export import ExportConfig, export_onnx
    from ..modeling import read_config, resolve_model_dir

    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model_dir = resolve_model_dir(args.model)
    path = export_onnx(model_dir, ExportConfig(opset=args.opset))
    info = read_config(model_dir)["onnx"]
    par = info["parity"]
    print(f"exported {path} (opset {info['opset']}, dynamic batch)")
    print(f"parity vs PyTorch on {par['samples']} inputs: max probability difference {par['max_abs_prob_diff']:.2e} "
          f"(tolerance {par['tolerance']:.0e}), same class: {'yes' if par['same_class'] else 'no'}")
    return 0
