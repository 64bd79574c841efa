"""pneumoscan cache list|clear: the feature caches on this machine."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the feature caches")
    s = p.add_subparsers(dest="cache_command", metavar="ACTION")
    s.required = True
    ls = s.add_parser("list", help="every feature cache: backbone and preprocessing key, features, size, last use")
    ls.add_argument("--cache", default=None, metavar="DIR", help="cache folder (default ~/.cache/pneumoscan/features "
                    "or $PNEUMOSCAN_CACHE)")
    ls.set_defaults(func=run_list)
    cl = s.add_parser("clear", help="delete feature caches (all, or those of one backbone)")
    cl.add_argument("--cache", default=None, metavar="DIR", help="cache folder (default as for list)")
    cl.add_argument("--backbone", default=None, help="only the caches of this backbone")
    cl.set_defaults(func=run_clear)


def check_cache_arg(args) -> None:
    """A --cache the user named must be a folder: a typo would otherwise list, or clear, nothing and say so as if
    all were well (the default folder may not exist yet: no caches)."""
    from pathlib import Path

    from ..errors import PneumoscanError

    if args.cache is not None and not Path(args.cache).is_dir():
        what = "is not a folder" if Path(args.cache).exists() else "does not exist"
        raise PneumoscanError(f"--cache {args.cache} {what}; give the feature cache folder (see 'pneumoscan cache list' "
                              "without --cache for the default)")


def run_list(args) -> int:
    import datetime as dt

    from ..features.cache import default_cache_dir, list_caches

    check_cache_arg(args)
    caches = list_caches(args.cache)
    root = args.cache or default_cache_dir()
    if not caches:
        print(f"no feature caches under {root}")
        return 0
    print(f"{'cache':<40}{'features':>10}{'MB':>9}  last written")
    total = 0.0
    for c in caches:
        s = c.summary()
        when = dt.datetime.fromtimestamp(s["modified"]).isoformat(timespec="minutes") if s["modified"] else "-"
        print(f"{c.root.name:<40}{s['features']:>10}{s['mb']:>9.1f}  {when}")
        total += s["mb"]
    print(f"{len(caches)} caches, {total:.1f} MB under {root}")
    return 0


def run_clear(args) -> int:
    import shutil

    from ..errors import PneumoscanError
    from ..features.cache import default_cache_dir, list_caches

    check_cache_arg(args)
    caches = [c for c in list_caches(args.cache) if args.backbone is None or c.root.name.startswith(args.backbone + "-")]
    if args.backbone is not None and not caches:
        raise PneumoscanError(f"no feature cache of backbone {args.backbone!r} under {args.cache or default_cache_dir()}")
    for c in caches:
        with c.lock():  # never under a run that is writing it
            shutil.rmtree(c.root)
    print(f"removed {len(caches)} feature cache(s)")
    return 0
