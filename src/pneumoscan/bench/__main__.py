"""``python -m pneumoscan.bench [extract|latency|pipeline|gpu|all]``: the benchmark without the
full CLI (imports only torch, timm and this package), e.g. on a GPU machine."""
from __future__ import annotations

import argparse
import logging
import sys

from .cli import add_args, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pneumoscan.bench", description=__doc__)
    add_args(p)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..errors import PneumoscanError

    try:
        return run(p.parse_args(argv))
    except PneumoscanError as e:
        print(f"pneumoscan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
