"""pneumoscan serve: the web page and prediction API (FastAPI on uvicorn, ONNX Runtime)."""
from __future__ import annotations

from ..web.config import ServeConfig
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the web page and the prediction API")
    add_config(p, ServeConfig, exclude=("warmup",))
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    cfg = build(ServeConfig, args)
    from .. import INTENDED_USE
    from ..predict import check_model
    from ..web.server import address, bind, serve

    model_dir = check_model(cfg.model_dir)  # a missing or tampered model is one clear line, before binding
    cfg = dataclasses.replace(cfg, model_dir=str(model_dir))
    sock = bind(cfg)  # a port in use or a foreign address: one line, before anything starts or is announced
    print(f"# {INTENDED_USE}")
    print(f"serving {model_dir} on http://{address(cfg)}/  (API docs at /docs; Ctrl+C to stop)")
    serve(cfg, sock)  # uvicorn with the header deadline, connection cap and refused-body bound of web.server
    return 0
