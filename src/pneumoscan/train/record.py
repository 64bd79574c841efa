"""What a training run leaves beside the weights: history.csv/png and the common part of config.json.

Head training and fine-tuning write the same record (:func:`model_record`); each adds only the
fields of its own kind, so the two model directories can never drift apart.
"""
from __future__ import annotations

import csv
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..io import atomic_write
from ..labels import LABELS
from ..nets.backbones import get_spec
from ..plots import plot_history

HISTORY_KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]


def write_history(history: list[dict], out: Path) -> None:
    with atomic_write(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    plot_history(history, out / "history.png")


def hardware() -> dict:
    """The machine a model was trained on (recorded in config.json and the card)."""
    import torch

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def model_record(*, kind: str, backbone: str, weights_id: str, finetuned: bool, prep, head: dict,
                 threshold: float, threshold_method: str, y_train: np.ndarray, train_config: dict, manifest,
                 failed: int, used: dict, history: list[dict], best_epoch: int, t0: float, val_metrics: dict,
                 command: str | None, **extra) -> dict:
    """config.json of a trained single network (head training or fine-tuning; ``extra`` adds fields)."""
    return {
        "name": f"{backbone}-ft" if finetuned else backbone,
        "kind": kind,
        "backbone": backbone,
        "timm_name": get_spec(backbone).timm_name,
        "weights_source": weights_id,
        "finetuned": finetuned,
        **{k: v for k, v in extra.items() if k in ("trained_children", "init_from", "noisy_labels")},
        "preprocess": prep.to_dict(),
        "labels": list(LABELS),
        "head": head,
        "threshold": threshold,
        "threshold_method": threshold_method,
        "train_prior": (np.bincount(y_train, minlength=len(LABELS)) / len(y_train)).tolist(),
        "train_config": train_config,
        "command": command or " ".join(sys.argv),
        "manifest_sha256": manifest.digest(),
        "data": {"root": manifest.root, "counts": used, "manifest_counts": manifest.counts(),
                 "skipped": len(manifest.skipped), "failed_to_decode": failed},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(time.time() - t0, 1),
        "hardware": {**hardware(), **extra.get("hardware", {})},
        "val_metrics": val_metrics,
    }
