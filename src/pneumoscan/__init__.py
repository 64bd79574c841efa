"""pneumoscan: pediatric chest X-ray pneumonia classification (normal / bacterial / viral).

The package is laid out in the order the data flows; each stage imports only earlier ones::

    errors, labels, io, metrics, plots      the common base (class order, decision rule, atomic writes)
    data/        manifest, index, imaging (decode), download, splits
    preprocess   pixels -> model input (size, intensity, mean/std from the backbone)
    nets/        backbones (registry), heads + ensembles, model directories, ONNX graph rewrites
    features/    frozen-backbone feature cache, inference engines, extraction
    train/       top model, fine-tuning, augmentation, compare, ensembles and soups
    export/      a model directory as one ONNX graph, checked against PyTorch
    scope, predict   out-of-scope checks; the one inference entry point (Predictor)
    evaluate/    metrics reports, operating point, robustness, model cards
    explain/     Grad-CAM, occlusion (Captum and the incremental engine), figures, filters
    cli/, web/, bench/, pipeline   what users run, all on top of predict and the stages above

Nothing heavy is imported here: ``import pneumoscan`` loads neither torch nor ONNX Runtime.
"""
from __future__ import annotations

__version__ = "0.1.0"

INTENDED_USE = (
    "Research and education only: pneumoscan classifies pediatric frontal chest X-rays "
    "(normal / bacterial / viral pneumonia) and is not a medical device; do not use it "
    "for clinical diagnosis."
)

from .errors import PneumoscanError  # noqa: E402
from .labels import LABELS  # noqa: E402

__all__ = ["LABELS", "INTENDED_USE", "PneumoscanError", "__version__"]
