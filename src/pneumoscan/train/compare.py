"""Compare backbones and refine the top model on ONE patient-grouped split, selecting on validation only.

The data is indexed once; features are extracted once per (backbone, image size) through the
feature cache; then a cheap head (:func:`pneumoscan.train.head.fit_head`) is trained for every point
of the grid learning rate x dropout x schedule. Every run is scored on the validation split
(never on a test folder). Selection is by validation loss (the early-stopping criterion: the
head's cross-entropy at its best epoch, with the training's class weighting) by default, or by
validation normal-vs-pneumonia AUC (``select_by="auc"``); ties keep the earlier run.

Outputs (in ``out``): ``compare.csv`` and ``compare.md`` (every run, plus the best run of each
backbone), ``compare.json`` (settings, rows, selection), ``compare_backbones.png`` (best run of
each backbone) and ``compare_grid.png`` (every run).
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.index import resolve_manifest
from ..data.manifest import Manifest
from ..errors import DataError, WeightsError
from ..features.config import ExtractConfig
from ..features.extract import extract_features
from ..io import atomic_write_bytes, atomic_write_json, json_safe, staged_dir
from ..metrics import choose_threshold, compute_metrics
from ..nets.backbones import create_backbone, default_preprocess, get_spec
from ..plots import plot_bars
from .config import CompareConfig, TrainConfig
from .head import fit_head, predict_head

log = logging.getLogger(__name__)

@dataclass
class CompareResult:
    """All runs (rows), the best row per backbone and overall, and the winning training config."""

    rows: list[dict]
    best_per_backbone: dict[str, dict]
    best: dict
    best_config: TrainConfig
    files: dict[str, str]
    manifest: Manifest  # the one split every run used (train the best configuration on it)


def _score(row: dict, select_by: str) -> float:
    """Lower is better."""
    v = row["val_loss"] if select_by == "loss" else -row["val_auc"]
    return math.inf if v is None or not math.isfinite(v) else v


def _check_weights(cfg: CompareConfig) -> None:
    """Fail before any work when a backbone's weights cannot be had (never silently random)."""
    if not cfg.base.pretrained:
        return
    for b in cfg.backbones:
        w = cfg.weights.get(b, cfg.base.weights)
        spec = get_spec(b)
        if w is not None:
            if not Path(w).is_file():
                raise WeightsError(f"weights file {w} for {b} does not exist")
        elif spec.offline is not None:
            spec.offline()  # raises WeightsError naming the package to install
        else:
            net, _ = create_backbone(b, pretrained=True)  # hub: raises WeightsError when offline
            del net


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning announces every Trainer at INFO; with dozens of cheap heads that drowns the progress bar."""
    import lightning.pytorch  # noqa: F401  (its import sets its logger to INFO: import first, then quiet)

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    quiet = not log.isEnabledFor(logging.DEBUG)
    try:
        for lg in loggers:
            if quiet:
                lg.setLevel(logging.WARNING)
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _run_grid_point(x_tr, y_tr, x_va, y_va, tcfg: TrainConfig) -> tuple[dict, object]:
    with _quiet_lightning():
        head, history, best_epoch = fit_head(x_tr, y_tr, x_va, y_va, tcfg, progress=False)
    p_va = predict_head(head, x_va)
    threshold, _ = choose_threshold(y_va, p_va, tcfg.threshold_method, tcfg.target_sensitivity)
    m = compute_metrics(y_va, p_va, threshold, n_boot=0)
    nvp = m["normal_vs_pneumonia"]
    best = next(h for h in history if h["epoch"] == best_epoch)
    row = {
        "backbone": tcfg.backbone,
        "size": default_preprocess(tcfg.backbone, tcfg.size).size,
        "lr": tcfg.lr, "dropout": tcfg.dropout, "schedule": tcfg.schedule,
        "best_epoch": best_epoch, "epochs_run": len(history),
        "val_loss": float(best["val_loss"]),
        "val_acc3": m["three_class"]["accuracy"], "val_macro_f1": m["three_class"]["macro_f1"],
        "val_auc": nvp["auc"], "val_acc": nvp["accuracy"], "val_sens": nvp["sensitivity"],
        "val_spec": nvp["specificity"], "threshold": threshold,
    }
    return row, head


def compare(data: str | os.PathLike | Manifest, out: str | os.PathLike, cfg: CompareConfig = CompareConfig(), *,
            extract: ExtractConfig = ExtractConfig(), progress: bool = True) -> CompareResult:
    """Run the comparison grid on one split of ``data`` and write the tables and charts to ``out``."""
    base = cfg.base
    manifest = data if isinstance(data, Manifest) else resolve_manifest(data, base.val_fraction, base.seed)
    samples = manifest.subset(("train", "val"))
    if not samples:
        raise DataError(f"{manifest.root} has no train/val images (only a test/ folder?)")
    manifest.check_files()  # gone or changed since indexing: refused, never trained on stale cached features
    _check_weights(cfg)
    y = np.array([s.target for s in samples])
    split = np.array([s.split for s in samples])
    bar = tqdm(total=len(cfg.grid()), desc="compare", unit="run", disable=not progress)
    rows: list[dict] = []
    for backbone in cfg.backbones:
        tb = cfg.train_config(backbone, None, base.lr, base.dropout, base.schedule)
        net, weights_id = create_backbone(backbone, pretrained=tb.pretrained, weights=tb.weights, seed=tb.seed)
        for size in cfg.sizes:
            bar.set_postfix_str(f"{backbone}@{size or 'default'}: features")
            feats, ok, info = extract_features(samples, backbone, size=size, intensity=base.intensity,
                                               cache_dir=extract.cache, progress=progress, net=net,
                                               weights_id=weights_id, batch_size=extract.batch_size,
                                               workers=extract.workers, engine=extract.engine,
                                               device=extract.device, decode=extract.decode)
            tr, va = ok & (split == "train"), ok & (split == "val")
            if tr.sum() == 0 or va.sum() == 0:
                raise DataError("the train or validation split is empty; index more images or change --val-fraction")
            for _, _, lr, dropout, schedule in itertools.product([backbone], [size], cfg.lrs, cfg.dropouts,
                                                                 cfg.schedules):
                tcfg = cfg.train_config(backbone, size, lr, dropout, schedule)
                bar.set_postfix_str(f"{backbone}@{size or 'default'} lr={lr:g} dropout={dropout:g} {schedule}")
                row, _ = _run_grid_point(feats[tr], y[tr], feats[va], y[va], tcfg)
                row["failed_to_decode"] = len(info["failed"])
                rows.append(row)
                log.info("%s@%d lr=%g dropout=%g %s: val loss %.4f AUC %.4f", backbone, row["size"], lr, dropout,
                         schedule, row["val_loss"], row["val_auc"])
                bar.update(1)
        del net
    bar.close()
    best_per = {}
    for b in cfg.backbones:
        best_per[b] = min((r for r in rows if r["backbone"] == b), key=lambda r: _score(r, cfg.select_by))
    best = min(best_per.values(), key=lambda r: _score(r, cfg.select_by))
    for r in rows:
        r["best_of_backbone"] = r is best_per[r["backbone"]]
        r["best_overall"] = r is best
    best_cfg = cfg.train_config(best["backbone"], best["size"], best["lr"], best["dropout"], best["schedule"])
    files = write_outputs(Path(out), rows, best_per, best, cfg, manifest)
    return CompareResult(rows=rows, best_per_backbone=best_per, best=best, best_config=best_cfg, files=files,
                         manifest=manifest)


COLUMNS = ("backbone", "size", "lr", "dropout", "schedule", "best_epoch", "epochs_run", "val_loss", "val_acc3",
           "val_macro_f1", "val_auc", "val_acc", "val_sens", "val_spec", "threshold", "best_of_backbone",
           "best_overall")


def _cell(v) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4g}" if v < 0.01 else f"{v:.4f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], best_per: dict[str, dict], best: dict, cfg: CompareConfig,
                  manifest: Manifest) -> dict[str, str]:
    """compare.csv, compare.md, compare.json and the two bar charts, written as a set: into a staging folder
    first, moved into ``out`` only once all five exist (a failure leaves an earlier report as it was, never
    half of each)."""
    with staged_dir(out) as tmp:
        _write_outputs(tmp, rows, best_per, best, cfg, manifest)
    return {k: str(out / k) for k in OUTPUTS}


OUTPUTS = ("compare.csv", "compare.md", "compare.json", "compare_backbones.png", "compare_grid.png")


def _write_outputs(out: Path, rows: list[dict], best_per: dict[str, dict], best: dict, cfg: CompareConfig,
                   manifest: Manifest) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS) + ["failed_to_decode"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "compare.csv", buf.getvalue().encode())
    crit = "validation loss (lower is better)" if cfg.select_by == "loss" else "validation AUC (higher is better)"
    short = ("backbone", "size", "lr", "dropout", "schedule", "val_loss", "val_auc", "val_acc3", "val_sens",
             "val_spec", "threshold")
    md = [
        "# pneumoscan compare", "",
        f"{len(rows)} runs on one patient-grouped split of `{manifest.root}` "
        f"({sum(1 for s in manifest.samples if s.split == 'train')} train / "
        f"{sum(1 for s in manifest.samples if s.split == 'val')} validation images, manifest "
        f"{manifest.digest()[:16]}). Selected by {crit}; no test data was used. AUC, sensitivity and "
        "specificity are normal vs pneumonia at the threshold chosen on validation (Youden); `val_acc3` is "
        "3-class accuracy.", "",
        f"**Best:** {best['backbone']} at {best['size']} px, lr {best['lr']:g}, dropout {best['dropout']:g}, "
        f"schedule {best['schedule']} (val loss {best['val_loss']:.4f}, AUC {_cell(best['val_auc'])}).", "",
        "## Best run of each backbone", "", markdown_table(list(best_per.values()), short), "",
        "## All runs", "", markdown_table(rows), "",
        "![backbones](compare_backbones.png)", "", "![grid](compare_grid.png)", "",
    ]
    atomic_write_bytes(out / "compare.md", "\n".join(md).encode())
    atomic_write_json(out / "compare.json", json_safe({
        "select_by": cfg.select_by, "grid": {k: list(v) for k, v in asdict(cfg).items()
                                             if k in ("backbones", "sizes", "lrs", "dropouts", "schedules")},
        "base_config": asdict(cfg.base), "manifest_sha256": manifest.digest(), "rows": rows,
        "best_per_backbone": best_per, "best": best}))
    series = ("val_auc", "val_acc", "val_sens", "val_spec")
    names = [f"{r['backbone']}@{r['size']}" for r in best_per.values()]
    plot_bars(names, {k: [_nan(r[k]) for r in best_per.values()] for k in series}, out / "compare_backbones.png",
              title=f"best run of each backbone (validation, selected by {cfg.select_by})")
    names = [f"{r['backbone']}@{r['size']} lr{r['lr']:g} d{r['dropout']:g} {r['schedule']}" for r in rows]
    plot_bars(names, {k: [_nan(r[k]) for r in rows] for k in ("val_auc", "val_acc3")}, out / "compare_grid.png",
              title="every run (validation)")


def _nan(v) -> float:
    return float("nan") if v is None else float(v)

