"""pneumoscan extract: cache bottleneck features."""
from __future__ import annotations

from . import fraction, positive_int, progress_enabled


def add_backbone_args(p) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0", help="registered backbone (see 'pneumoscan backbones')")
    p.add_argument("--size", type=int, default=None, help="input side: 224, 299 or 320 (default: the backbone's)")
    p.add_argument("--intensity", default="none", choices=["none", "equalize", "clahe"], help="intensity normalisation")
    p.add_argument("--weights", default=None, metavar="FILE", help="ImageNet weights file (.pth/.safetensors) for the backbone")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests only; results are meaningless)")
    p.add_argument("--cache", default=None, metavar="DIR", help="feature cache (default ~/.cache/pneumoscan/features or $PNEUMOSCAN_CACHE)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="extraction batch size (default 64)")
    p.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: 2)")


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract and cache frozen-backbone features for a dataset")
    p.add_argument("data", help="data folder or manifest CSV")
    add_backbone_args(p)
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="validation share when indexing a folder")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from ..data import resolve_manifest
    from ..features import extract_features

    if args.workers is not None and args.workers < 0:
        from ..errors import PneumoscanError
        raise PneumoscanError(f"--workers {args.workers} must be 0 or more")
    m = resolve_manifest(args.data, args.val_fraction, args.seed)
    t = time.perf_counter()
    feats, ok, info = extract_features(m.samples, args.backbone, size=args.size, intensity=args.intensity,
                                       weights=args.weights, pretrained=not args.no_pretrained,
                                       cache_dir=args.cache, batch_size=args.batch_size, workers=args.workers,
                                       progress=progress_enabled())
    dt = time.perf_counter() - t
    print(f"{args.backbone}: {len(m)} images, {info['cached']} from cache, {info['computed']} computed, "
          f"{len(info['failed'])} failed, dim {feats.shape[1]}, {dt:.1f} s  -> {info['cache']}")
    for path, err in info["failed"][:20]:
        print(f"failed: {err}")
    return 0
