"""pneumoscan extract: cache bottleneck features."""
from __future__ import annotations

from ..data.index import SplitConfig
from ..features.config import ExtractConfig
from ..train.config import TrainConfig
from .common import progress_enabled
from .flags import add_config, build

BACKBONE_FIELDS = ("backbone", "size", "intensity", "weights", "pretrained")  # what the features depend on


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract and cache frozen-backbone features for a dataset")
    p.add_argument("data", help="data folder or manifest CSV")
    add_config(p, TrainConfig, only=BACKBONE_FIELDS)
    add_config(p, ExtractConfig)
    add_config(p, SplitConfig, group="split (when DATA is a folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    tc, ext, split = build(TrainConfig, args), build(ExtractConfig, args), build(SplitConfig, args)
    from ..io import check_writable

    if ext.cache:
        check_writable(ext.cache, "dir", "--cache")
    from ..nets.backbones import check_weights

    check_weights(tc.backbone, tc.weights, tc.pretrained)  # before any data is read
    from ..data.index import resolve_manifest
    from ..features.extract import extract_features

    m = resolve_manifest(args.data, split.val_fraction, split.seed)
    t = time.perf_counter()
    feats, ok, info = extract_features(m.samples, tc.backbone, size=tc.size, intensity=tc.intensity,
                                       weights=tc.weights, pretrained=tc.pretrained, cache_dir=ext.cache,
                                       batch_size=ext.batch_size, workers=ext.workers, engine=ext.engine, decode=ext.decode,
                                       device=ext.device,
                                       progress=progress_enabled())
    dt = time.perf_counter() - t
    print(f"{tc.backbone}: {len(m)} images, {info['cached']} from cache, {info['computed']} computed, "
          f"{len(info['failed'])} failed, dim {feats.shape[1]}, {dt:.1f} s  -> {info['cache']}")
    for _, err in info["failed"][:20]:
        print(f"failed: {err}")
    return 0
