"""Arguments of ``pneumoscan bench`` (shared by the CLI command and ``python -m pneumoscan.bench``)."""
from __future__ import annotations

import argparse
import logging

from . import BENCHES

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", nargs="?", default="all", choices=[*BENCHES, "all", "summary"],
                   help="sub-benchmark (default all: extract, latency, gpu; the pipeline only when named), "
                        "or 'summary' to rewrite SUMMARY.md from the JSON results")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--backbone", action="append", default=None, help="backbone(s) to time (default efficientnet_lite0)")
    p.add_argument("--size", type=int, action="append", default=None, help="input side(s) (default: the backbone's)")
    p.add_argument("--images", type=int, default=512, help="images per extraction run (default 512)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="image folder ('shared' = ../shared/data/chest_xray/train); default: generated images "
                        "(extract) or the shared data (pipeline)")
    p.add_argument("--image-px", type=int, default=224, help="side of generated images (default 224, like the data)")
    p.add_argument("--compare", action="store_true", help="extract: time every engine x workers variant")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: the pipeline's choice)")
    p.add_argument("--batch-size", type=int, default=64, help="extraction batch size (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="extract: runs per variant, the median reported (default 3)")
    p.add_argument("--memory-scan", default=None, metavar="N,N,...",
                   help="extract: also the peak memory at these image counts (e.g. 256,1024,5216)")
    p.add_argument("--iters", type=int, default=200, help="latency: timed calls per variant (default 200)")
    p.add_argument("--model", default=None, metavar="DIR", help="latency: a model directory (default: backbone + fresh head)")
    p.add_argument("--limit", type=int, default=None, help="pipeline: use every k-th image, this many in all")
    p.add_argument("--cold-only", action="store_true", help="pipeline: skip the cached re-run")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (timing only; for tests)")
    p.add_argument("--compile", action="store_true", help="gpu: also torch.compile the bf16 network")


def run(args) -> int:
    """Run the chosen benchmarks, print one line each; the JSON paths go to the log."""
    from ..errors import PneumoscanError
    from . import summary

    if args.images < 1 or args.iters < 1 or args.repeats < 1 or (args.limit is not None and args.limit < 2):
        raise PneumoscanError("--images, --iters and --repeats must be at least 1, --limit at least 2")
    counts = None
    if args.memory_scan:
        try:
            counts = [int(v) for v in args.memory_scan.split(",") if v.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            raise PneumoscanError(f"--memory-scan {args.memory_scan!r}: give image counts like 256,1024,5216")
    which = ["extract", "latency", "gpu"] if args.which == "all" else [args.which]
    pretrained = not args.no_pretrained
    backbones = args.backbone or ["efficientnet_lite0"]
    for name in which:
        if name == "extract":
            from .extract import run as bench
            line, path = bench(backbones, args.size or [None], args.images, args.data, args.image_px,
                               args.compare, args.batch_size, args.workers, pretrained, out_dir=args.out,
                               repeats=args.repeats, memory_counts=counts)
        elif name == "latency":
            from .latency import run as bench
            line, path = bench(args.model, backbones[0], args.iters, pretrained=pretrained, out_dir=args.out)
        elif name == "pipeline":
            from .pipeline import run as bench
            data = None if args.data in (None, "shared") else args.data
            extra = ["--no-pretrained"] if args.no_pretrained else []
            extra += [] if args.backbone is None else ["--backbone", backbones[0]]
            line, path = bench(data, args.limit, ("cold",) if args.cold_only else ("cold", "cached"), extra,
                               out_dir=args.out)
        elif name == "gpu":
            from .gpu import run as bench
            line, path = bench(backbones[0], (args.size or [None])[0], workers=args.workers, pretrained=pretrained,
                               compile=args.compile, out_dir=args.out)
        else:
            line, path = "summary", None
        print(line, flush=True)
        if path is not None:
            log.info("wrote %s", path)
    s = summary.write_summary(args.out)
    if args.which == "summary":
        print(f"wrote {s}")
    return 0
