"""pneumoscan data index|download."""
from __future__ import annotations

from pathlib import Path

from . import fraction, progress_enabled


def register(sub) -> None:
    p = sub.add_parser("data", help="index a dataset folder, or download the public data")
    s = p.add_subparsers(dest="data_command", metavar="ACTION")
    s.required = True
    i = s.add_parser("index", help="write a manifest with labels, patient keys and a patient-grouped split")
    i.add_argument("dir", help="folder with NORMAL/ PNEUMONIA/ (or normal/ bacterial/ viral/), at any depth")
    i.add_argument("--out", default=None, help="manifest CSV (default: DIR/manifest.csv, or ./manifest.csv if DIR is read-only)")
    i.add_argument("--val-fraction", type=fraction, default=0.2, help="patient-grouped validation share (default 0.2)")
    i.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    i.set_defaults(func=run_index)
    d = s.add_parser("download", help="fetch the public Mendeley Data release (doi:10.17632/rscbjbr9sj)")
    d.add_argument("--dest", default="data", help="destination folder (default ./data)")
    d.add_argument("--url", default=None, help="override the archive URL (mirror)")
    d.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (default: the release's)")
    d.add_argument("--no-extract", action="store_true", help="keep the ZIP without extracting it")
    d.set_defaults(func=run_download)


def run_index(args) -> int:
    import os

    from ..data import index_dataset

    m = index_dataset(args.dir, args.val_fraction, args.seed, progress=progress_enabled())
    out = Path(args.out) if args.out else Path(args.dir) / "manifest.csv"
    if args.out is None and not os.access(Path(args.dir), os.W_OK):
        out = Path("manifest.csv")
    m.save(out)
    print(f"indexed {len(m)} images under {m.root}  ({len(m.skipped)} skipped)")
    print(f"{'split':<7}" + "".join(f"{lab:>11}" for lab in ("normal", "bacterial", "viral")) + f"{'total':>9}{'patients':>10}")
    for split, c in m.counts().items():
        pats = len({s.patient for s in m.samples if s.split == split})
        print(f"{split:<7}" + "".join(f"{v:>11}" for v in c.values()) + f"{sum(c.values()):>9}{pats:>10}")
    for path, why in m.skipped[:20]:
        print(f"skipped: {path}: {why}")
    if len(m.skipped) > 20:
        print(f"... and {len(m.skipped) - 20} more skipped files")
    print(f"manifest: {out}  (sha256 {m.digest()[:16]})")
    return 0


def run_download(args) -> int:
    from ..download import download_dataset

    root = download_dataset(args.dest, url=args.url, sha256=args.sha256, extract=not args.no_extract,
                            progress=progress_enabled())
    print(f"data ready under {root}")
    return 0
