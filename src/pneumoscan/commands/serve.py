"""pneumoscan serve: the web page and prediction API (FastAPI on uvicorn, ONNX Runtime)."""
from __future__ import annotations

from . import add_model_arg, positive_int


def register(sub) -> None:
    from ..web.config import ServeConfig

    d = ServeConfig()
    p = sub.add_parser("serve", help="serve the web page and the prediction API")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default=d.backend, choices=["onnx", "torch"],
                   help="inference engine (default onnx; the model is exported on the fly if it has no ONNX)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                   help=f"largest accepted upload in MiB (default {d.max_upload_bytes / 2**20:g})")
    p.add_argument("--max-pixels", type=positive_int, default=d.max_pixels,
                   help=f"largest accepted image in pixels, checked before decoding (default {d.max_pixels:,})")
    p.add_argument("--workers", type=positive_int, default=d.workers,
                   help=f"inference threads (default {d.workers})")
    p.add_argument("--queue", type=int, default=d.queue,
                   help=f"requests that may wait for a worker; more get 503 + Retry-After (default {d.queue})")
    p.add_argument("--deadline", type=float, default=d.deadline_s,
                   help=f"seconds before a request gets 503 (default {d.deadline_s:g})")
    p.add_argument("--threads", type=positive_int, default=d.ort_threads,
                   help=f"intra-op threads per inference (default {d.ort_threads}; workers x threads ~ cores)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from .. import INTENDED_USE
    from ..errors import PneumoscanError
    from ..web.app import check_model_dir, create_app
    from ..web.config import ServeConfig

    if args.queue < 0 or args.deadline <= 0 or args.max_upload_mb <= 0:
        raise PneumoscanError("--queue must be >= 0, --deadline and --max-upload-mb > 0")
    model_dir = check_model_dir(args.model)  # a missing or tampered model is one clear line, before binding
    cfg = ServeConfig(model_dir=str(model_dir), backend=args.backend, max_upload_bytes=int(args.max_upload_mb * 2**20),
                      max_pixels=args.max_pixels, workers=args.workers, queue=args.queue, deadline_s=args.deadline,
                      ort_threads=args.threads)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(f"# {INTENDED_USE}")
    print(f"serving {model_dir} on http://{args.host}:{args.port}/  (API docs at /docs; Ctrl+C to stop)")
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, workers=1, log_level="info",
                access_log=not args.no_access_log, server_header=False, timeout_graceful_shutdown=5)
    return 0
