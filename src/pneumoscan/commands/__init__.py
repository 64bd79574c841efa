"""One module per CLI command; each defines ``register(subparsers)`` and sets ``func``."""
from __future__ import annotations

import os


def progress_enabled() -> bool:
    return os.environ.get("PNEUMOSCAN_PROGRESS", "1") == "1"


def add_model_arg(p) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model directory (default: the shipped model, or $PNEUMOSCAN_MODEL)")


def add_threshold_args(p) -> None:
    """How the pneumonia threshold is chosen on validation (ensemble, threshold)."""
    p.add_argument("--method", default="youden", choices=["youden", "sensitivity"],
                   help="youden: max sensitivity + specificity; sensitivity: highest threshold meeting a target")
    p.add_argument("--target-sensitivity", type=float, default=None, help="with --method sensitivity, e.g. 0.97")


def positive_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def fraction(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"{v} must lie strictly between 0 and 1")
    return v


def tame_lightning() -> None:
    """Lightning attaches an INFO console handler at import; keep it to warnings unless -vv."""
    import logging

    import lightning  # noqa: F401  (import first: the handler is created then)

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for h in logging.getLogger("lightning").handlers:
            h.setLevel(logging.WARNING)


def print_model_summary(out) -> None:
    """Two lines: where the model went, and its validation figures (train/finetune/ensemble)."""
    import json

    m = json.loads((out / "config.json").read_text())
    v = m["val_metrics"]["normal_vs_pneumonia"]
    epochs = f"  best epoch {m['best_epoch']}/{m['epochs_run']}," if "best_epoch" in m else ""
    print(f"model: {out}{epochs} threshold {m['threshold']:.3f}")
    print(f"validation: 3-class acc {m['val_metrics']['three_class']['accuracy']:.3f}; normal vs pneumonia "
          f"acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} AUC {v['auc']:.4f}")
