"""Command line: ``pneumoscan COMMAND ...``, one module per command, each a thin layer over the Python API."""
from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
