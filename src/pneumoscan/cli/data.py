"""pneumoscan data index|download."""
from __future__ import annotations

from pathlib import Path

from ..data.download import DownloadConfig
from ..data.index import MANIFEST_NAME, SplitConfig
from .common import progress_enabled
from .flags import add_config, build


def register(sub) -> None:
    p = sub.add_parser("data", help="index a dataset folder, or download the public data")
    s = p.add_subparsers(dest="data_command", metavar="ACTION")
    s.required = True
    i = s.add_parser("index", help="write a manifest with labels, patient keys and a patient-grouped split")
    i.add_argument("dir", help="folder with NORMAL/ PNEUMONIA/ (or normal/ bacterial/ viral/), at any depth")
    i.add_argument("--out", default=None, help="manifest CSV (default: DIR/manifest.csv, or ./manifest.csv if DIR is read-only)")
    add_config(i, SplitConfig)
    i.set_defaults(func=run_index)
    d = s.add_parser("download", help="fetch the public Mendeley Data release (doi:10.17632/rscbjbr9sj)")
    add_config(d, DownloadConfig)
    d.set_defaults(func=run_download)


def run_index(args) -> int:
    import os

    from ..data.index import index_dataset
    from ..io import check_writable

    split = build(SplitConfig, args)
    out = Path(args.out) if args.out else Path(args.dir) / MANIFEST_NAME
    if args.out is None and Path(args.dir).is_dir() and not os.access(Path(args.dir), os.W_OK):
        out = Path("manifest.csv")
    if Path(args.dir).is_dir():  # a missing folder is index_dataset's error, with its advice
        check_writable(out, "file")
    m = index_dataset(args.dir, split.val_fraction, split.seed, progress=progress_enabled())
    m.save(out)
    print(f"indexed {len(m)} images under {m.root}  ({len(m.skipped)} skipped)")
    print(f"{'split':<7}" + "".join(f"{lab:>11}" for lab in ("normal", "bacterial", "viral")) + f"{'total':>9}{'patients':>10}")
    for split_name, c in m.counts().items():
        pats = len({s.patient for s in m.samples if s.split == split_name})
        print(f"{split_name:<7}" + "".join(f"{v:>11}" for v in c.values()) + f"{sum(c.values()):>9}{pats:>10}")
    for path, why in m.skipped[:20]:
        print(f"skipped: {path}: {why}")
    if len(m.skipped) > 20:
        print(f"... and {len(m.skipped) - 20} more skipped files")
    print(f"manifest: {out}  (sha256 {m.digest()[:16]})")
    return 0


def run_download(args) -> int:
    from ..data.download import download_dataset
    from ..io import check_writable

    cfg = build(DownloadConfig, args)
    check_writable(cfg.dest, "dir", "--dest")
    root = download_dataset(cfg.dest, url=cfg.url, sha256=cfg.sha256, extract=cfg.extract,
                            progress=progress_enabled())
    print(f"data ready under {root}")
    return 0
