"""pneumoscan bench: speed benchmarks (extraction, latency, whole pipeline, GPU)."""
from __future__ import annotations


def register(sub) -> None:
    from ..bench.cli import add_args

    p = sub.add_parser("bench", help="benchmark extraction, latency, the whole pipeline or a GPU; JSON to benchmarks/results")
    add_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.cli import run as bench

    return bench(args)
