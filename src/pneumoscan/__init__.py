"""pneumoscan: pediatric chest X-ray pneumonia classification (normal / bacterial / viral).

The data flows one way::

    image folder --index--> manifest --extract--> cached features --train--> model dir
    model dir --evaluate--> metrics.json + plots;  model dir --export--> ONNX --> serve

Everything the CLI does is a thin layer over the functions re-exported here.
"""
from __future__ import annotations

__version__ = "0.1.0"

LABELS: tuple[str, ...] = ("normal", "bacterial", "viral")
"""Class order shared by every output: model logits, metrics, CSVs and the API."""

INTENDED_USE = (
    "Research and education only: pneumoscan classifies pediatric frontal chest X-rays "
    "(normal / bacterial / viral pneumonia) and is not a medical device; do not use it "
    "for clinical diagnosis."
)

from .errors import PneumoscanError  # noqa: E402

__all__ = ["LABELS", "INTENDED_USE", "PneumoscanError", "__version__"]
