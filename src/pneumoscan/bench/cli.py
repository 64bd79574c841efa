"""Arguments of ``pneumoscan bench`` (shared by the CLI command and ``python -m pneumoscan.bench``)."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..nets.registry import DEFAULT_BACKBONE
from . import BENCHES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What ``pneumoscan bench`` times."""

    FLAGS: ClassVar[dict[str, str]] = {"pretrained": "--no-pretrained"}

    backbone: tuple[str, ...] = (DEFAULT_BACKBONE,)  # backbone(s) to time (comma-separated or repeated)
    size: tuple[int | None, ...] = (None,)  # input side(s); none = the backbone's
    images: int = 512  # images per extraction run
    image_px: int = 224  # side of generated images (like the data)
    compare: bool = False  # extract: time every engine x workers variant
    workers: int | None = None  # decoding workers (default: the pipeline's choice)
    batch_size: int = 64  # extraction batch size
    repeats: int | None = None  # extract, gpu: runs per variant, the median reported (none: each benchmark's
    # own default, 3 for extract, 2 for gpu, whose runs spend lent device time)
    memory_scan: tuple[int, ...] | None = None  # extract: also the peak memory at these image counts, e.g. 256,1024,5216
    iters: int = 200  # latency: timed calls per variant
    limit: int | None = None  # pipeline: use every k-th image, this many in all
    cold_only: bool = False  # pipeline: skip the cached re-run
    pretrained: bool = True  # False: random backbone weights (timing only; for tests)
    compile: bool = False  # gpu: also torch.compile the bf16 network
    gpu_images: int = 20480  # gpu: images per end-to-end extraction run (the data's files copied to this many)

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if (self.images < 1 or self.iters < 1 or (self.repeats is not None and self.repeats < 1)
                or (self.limit is not None and self.limit < 2)):
            raise ConfigError("--images, --iters and --repeats must be at least 1, --limit at least 2")
        if self.memory_scan is not None and min(self.memory_scan) < 1:
            raise ConfigError(f"--memory-scan {self.memory_scan}: give image counts like 256,1024,5216")
        if not 32 <= self.image_px <= 4096:  # 0 crashed OpenCV's blur after the model had loaded
            raise ConfigError(f"--image-px {self.image_px} must lie in [32, 4096] (the generated images' side)")
        from ..preprocess import PreprocessConfig

        for size in self.size:
            if size is not None:
                PreprocessConfig(size=size)  # refused now, not after the model loads


def add_args(p: argparse.ArgumentParser) -> None:
    from ..cli.flags import add_config

    p.add_argument("which", nargs="?", default="all", choices=[*BENCHES, "all", "summary"],
                   help="sub-benchmark (default all: extract, latency, gpu; the pipeline only when named), "
                        "or 'summary' to rewrite SUMMARY.md from the JSON results")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default benchmarks/results)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="image folder ('shared' = ../shared/data/chest_xray/train); default: generated images "
                        "(extract) or the shared data (pipeline)")
    p.add_argument("--model", default=None, metavar="DIR", help="latency: a model directory (default: backbone + fresh head)")
    add_config(p, BenchConfig)


def run(args) -> int:
    """Run the chosen benchmarks, print one line each; the JSON paths go to the log."""
    from ..cli.flags import build
    from . import shared_data_dir, summary

    cfg = build(BenchConfig, args)
    if args.data not in (None, "shared"):  # before any model loads: a missing folder was an IndexError 18 s later
        from ..cli.common import check_inputs_exist
        from ..errors import DataError

        check_inputs_exist(args.data)
        if not any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in Path(args.data).rglob("*")):
            raise DataError(f"--data {args.data} holds no JPEG or PNG images to time; give an image folder, or "
                            "'shared' for ../shared/data/chest_xray/train")
    if args.out is not None:  # before any timing: a results folder that cannot be written fails now, in one line
        from ..io import check_writable

        check_writable(args.out, "dir")
    counts = list(cfg.memory_scan) if cfg.memory_scan else None
    which = ["extract", "latency", "gpu"] if args.which == "all" else [args.which]
    pretrained = cfg.pretrained
    backbones = list(cfg.backbone)
    repeats = {} if cfg.repeats is None else {"repeats": cfg.repeats}
    for name in which:
        if name == "extract":
            from .extract import run as bench
            line, path = bench(backbones, list(cfg.size), cfg.images, args.data, cfg.image_px,
                               cfg.compare, cfg.batch_size, cfg.workers, pretrained, out_dir=args.out,
                               memory_counts=counts, **repeats)
        elif name == "latency":
            from .latency import run as bench
            line, path = bench(args.model, backbones[0], cfg.iters, pretrained=pretrained, out_dir=args.out)
        elif name == "pipeline":
            from .pipeline import run as bench
            data = None if args.data in (None, "shared") else args.data
            extra = [] if pretrained else ["--no-pretrained"]
            extra += [] if backbones == [DEFAULT_BACKBONE] else ["--backbone", backbones[0]]
            line, path = bench(data, cfg.limit, ("cold",) if cfg.cold_only else ("cold", "cached"), extra,
                               out_dir=args.out)
        elif name == "gpu":
            from .gpu import run as bench
            data = (shared_data_dir() if args.data == "shared" else args.data) or None
            line, path = bench(backbones[0], cfg.size[0], workers=cfg.workers, pretrained=pretrained,
                               compile=cfg.compile, out_dir=args.out, images=cfg.gpu_images, data=data, **repeats)
        else:
            line, path = "summary", None
        print(line, flush=True)
        if path is not None:
            log.info("wrote %s", path)
    s = summary.write_summary(args.out)
    if args.which == "summary":
        print(f"wrote {s}")
    return 0
