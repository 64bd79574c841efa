"""What the command modules share: the ``--model`` option, progress, output folders, summaries."""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Iterator


def progress_enabled() -> bool:
    return os.environ.get("PNEUMOSCAN_PROGRESS", "1") == "1"


def command_line() -> str:
    """The command as the user typed it (recorded in config.json)."""
    return "pneumoscan " + shlex.join(sys.argv[1:])


def add_model_arg(p, required: bool = False) -> None:
    p.add_argument("--model", default=None, metavar="DIR", required=required,
                   help="model directory" + ("" if required else " (default: the shipped model, or $PNEUMOSCAN_MODEL)"))


def positive_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def tame_lightning() -> None:
    """Lightning attaches an INFO console handler at import; keep it to warnings unless -vv."""
    import logging

    import lightning  # noqa: F401  (import first: the handler is created then)

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for h in logging.getLogger("lightning").handlers:
            h.setLevel(logging.WARNING)


def is_worker_rank() -> bool:
    """True in the extra processes of multi-device training (Lightning sets their rank variables)."""
    return any(int(os.environ.get(k, "0") or 0) != 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


@contextlib.contextmanager
def new_model_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder to build a model directory in; it becomes ``out`` (replacing an older model
    there as a whole) with its MODEL_CARD.md once everything in the block has succeeded. Worker
    ranks of multi-device training get a scratch folder that is thrown away."""
    import tempfile

    from ..evaluate.card import write_card
    from ..io import atomic_dir

    if is_worker_rank():
        with tempfile.TemporaryDirectory(prefix="pneumoscan-rank-") as scratch:
            yield Path(scratch)
        return
    with atomic_dir(out, overwrite=True) as tmp:
        yield tmp
        write_card(tmp, shown_as=Path(out))


def print_model_summary(out) -> None:
    """Two lines: where the model went, and its validation figures (train/finetune/ensemble)."""
    import json

    m = json.loads((Path(out) / "config.json").read_text())
    vm = m.get("val_metrics")
    epochs = f"  best epoch {m['best_epoch']}/{m['epochs_run']}," if "best_epoch" in m else ""
    print(f"model: {out}{epochs} threshold {m['threshold']:.3f}")
    if vm:
        v = vm["normal_vs_pneumonia"]
        print(f"validation ({vm['n']} images): 3-class acc {vm['three_class']['accuracy']:.3f}; normal vs pneumonia "
              f"acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} AUC {v['auc']:.4f}")
