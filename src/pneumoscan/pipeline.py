"""The main job in one call: index -> extract -> train -> calibrate -> evaluate (validation split) -> report.

This is the study's pipeline end to end on a data folder; every step is the same public
function the CLI exposes, so a notebook can run the steps one by one instead.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .data.index import index_dataset
from .evaluate.calibrate import calibrate
from .evaluate.card import write_card
from .evaluate.config import CalibrateConfig
from .evaluate.evaluate import evaluate_items
from .features.config import ExtractConfig
from .io import all_or_earlier, atomic_dir, atomic_write_json
from .predict import Predictor
from .train.config import TrainConfig
from .train.head import train

log = logging.getLogger(__name__)


def default_data_dir() -> Path | None:
    """../shared/data/chest_xray next to the checkout (or $PNEUMOSCAN_DATA), when present."""
    env = os.environ.get("PNEUMOSCAN_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data" / "chest_xray", Path("data") / "chest_xray"]
    return next((c for c in candidates if c.is_dir()), None)


RUN_OUTPUTS = ("manifest.csv", "model", "eval-val", "summary.json")  # what 'pneumoscan run' writes into --out


def run_pipeline(data: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig = TrainConfig(), *,
                 extract: ExtractConfig = ExtractConfig(), progress: bool = True) -> dict:
    """Index ``data``, train a frozen-feature model, evaluate it on the validation split.

    Writes ``out/manifest.csv``, ``out/model/`` and ``out/eval-val/`` (metrics.json, plots,
    report.md) and returns a summary with the timing of each step.
    """
    out = Path(out)
    with all_or_earlier(out, RUN_OUTPUTS):  # a failed or interrupted run leaves the earlier one (or nothing)
        times = {}
        t = time.perf_counter()
        manifest = index_dataset(data, cfg.val_fraction, cfg.seed, exclude=out)  # never its own figures as X-rays
        manifest.save(out / "manifest.csv")
        times["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with atomic_dir(out / "model", overwrite=True) as tmp:
            train(manifest, tmp, cfg, extract=extract, progress=progress, command="pneumoscan run")
            write_card(tmp, shown_as=out / "model")
        model_dir = out / "model"
        times["extract_and_train_s"] = time.perf_counter() - t
        t = time.perf_counter()  # the gate, temperature and prediction sets, from the cached features
        calibrate(model_dir, out / "manifest.csv", CalibrateConfig(), progress=progress, cache_dir=extract.cache)
        write_card(model_dir)
        times["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        val = [(s.path, s.label) for s in manifest.subset("val")]
        metrics = evaluate_items(val, out / "eval-val", Predictor(model_dir), data_root=manifest.root,
                                 progress=progress, cache_dir=extract.cache)
        times["evaluate_s"] = time.perf_counter() - t
        summary = {"data": manifest.root, "counts": manifest.counts(), "model": str(model_dir),
                   "validation": {k: metrics[k] for k in ("three_class", "normal_vs_pneumonia")},
                   "seconds": {k: round(v, 2) for k, v in times.items()}}
        atomic_write_json(out / "summary.json", summary)
    return summary
