"""pneumoscan visualize filters|activations|layers: first-layer filters, early activation maps."""
from __future__ import annotations

from .common import add_model_arg, check_inputs_exist


def register(sub) -> None:
    p = sub.add_parser("visualize", help="first-layer filters or early activation maps of a model")
    what = p.add_subparsers(dest="what", metavar="WHAT")
    what.required = True
    f = what.add_parser("filters", help="grid of the first convolution's filters")
    add_model_arg(f)
    f.add_argument("--out", required=True, metavar="FILE.png", help="output PNG")
    f.set_defaults(func=run_filters)
    a = what.add_parser("activations", help="grid of one layer's activation maps for one image")
    a.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, DICOM)")
    add_model_arg(a)
    a.add_argument("--layer", default=None, metavar="NAME",
                   help="backbone module name (default: an early layer; 'pneumoscan visualize layers' lists them)")
    a.add_argument("--out", required=True, metavar="FILE.png", help="output PNG")
    a.set_defaults(func=run_activations)
    n = what.add_parser("layers", help="list the layer names --layer accepts, with their output shapes")
    add_model_arg(n)
    n.set_defaults(func=run_layers)


def _png_path(text: str):
    from pathlib import Path

    from ..errors import PneumoscanError

    path = Path(text)
    if path.suffix.lower() != ".png":
        raise PneumoscanError(f"--out {path} must end in .png")
    if path.is_dir():
        raise PneumoscanError(f"--out {path} is a folder; give a file name ending in .png")
    from ..io import check_writable

    return check_writable(path, "file")


def run_filters(args) -> int:
    out = _png_path(args.out)
    from ..explain.inspect import filters_figure
    from ..plots import save_figure
    from ..predict import Predictor

    pred = Predictor(args.model, backend="torch")
    print(f"filters -> {save_figure(filters_figure(pred.net, title=pred.model_id), out, dpi=120)}")
    return 0


def run_activations(args) -> int:
    out = _png_path(args.out)
    check_inputs_exist(args.image, args.model)  # before torch and the model load (seconds)
    from ..data.imaging import load_xray
    from ..explain.inspect import activations, activations_figure, resolve_layer
    from ..plots import save_figure
    from ..predict import Predictor

    pred = Predictor(args.model, backend="torch")
    layer, _ = resolve_layer(pred.net, pred.prep_cfg.size, args.layer)
    x = load_xray(args.image, max_pixels=pred.max_pixels, size_hint=pred.prep_cfg.size)
    act = activations(pred.net, pred.tensor(x)[None], layer)
    fig = activations_figure(act, pred.pre.resize(x.pixels), layer, title=pred.model_id)
    print(f"activations of {layer} {tuple(act.shape)} -> {save_figure(fig, out, dpi=110)}")
    return 0


def run_layers(args) -> int:
    from ..explain.inspect import default_layer, feature_layers
    from ..predict import Predictor

    pred = Predictor(args.model, backend="torch")
    layers = feature_layers(pred.net, pred.prep_cfg.size)
    default = default_layer(layers)
    for name, shape in layers:
        print(f"{name}\t{'x'.join(map(str, shape))}{'  (default)' if name == default else ''}")
    return 0
