"""The shipped default model: integrity, both engines, and the evaluate schema on real images.

Real-data tests read ../shared/data (images from the model's own validation split, i.e. patients
it never trained on) and are skipped when it is absent.
"""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from pneumoscan import LABELS
from pneumoscan.cli import main
from pneumoscan.nets.modeldir import default_model_dir, read_config, verify_file
from pneumoscan.predict import Predictor

DEFAULT = default_model_dir()


def test_shipped_model_is_complete_and_verified():
    cfg = read_config(DEFAULT)
    for name in ("model.safetensors", "model.onnx"):
        verify_file(DEFAULT, name, cfg)
    assert cfg["labels"] == list(LABELS)
    assert 0.0 < cfg["threshold"] < 1.0
    assert (DEFAULT / "MODEL_CARD.md").is_file() and (DEFAULT / "manifest.csv").is_file()
    assert cfg["val_metrics"]["normal_vs_pneumonia"]["auc"] > 0.95


def _val_sample(real_data_dir, per_class: int = 6) -> list[tuple[str, str]]:
    """A few images per class from the shipped model's validation split (unseen patients)."""
    with open(DEFAULT / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    out = []
    for lab in LABELS:
        picked = [r for r in rows if r["label"] == lab][:: 37][:per_class]
        out += [(str(real_data_dir / r["relpath"]), lab) for r in picked]
    return out


@pytest.mark.slow
@pytest.mark.realdata
def test_torch_and_onnx_agree_on_real_images(real_data_dir):
    paths = [p for p, _ in _val_sample(real_data_dir, 3)]
    a, _ = Predictor(backend="torch").predict_files(paths)
    b, _ = Predictor(backend="onnx").predict_files(paths)
    assert [p.in_scope for p in a] == [p.in_scope for p in b]  # the gate decides alike on both engines
    kept = [(x, y) for x, y in zip(a, b) if x.in_scope]
    assert len(kept) >= len(paths) - 1  # validation X-rays: at most one stopped (1.8 % of validation are)
    pa = np.array([[x.probabilities[k] for k in LABELS] for x, _ in kept])
    pb = np.array([[y.probabilities[k] for k in LABELS] for _, y in kept])
    assert np.abs(pa - pb).max() < 1e-4
    assert [p.label for p in a] == [p.label for p in b]


@pytest.mark.slow
@pytest.mark.realdata
def test_evaluate_shipped_model_writes_schema(real_data_dir, tmp_path):
    """`pneumoscan evaluate` without --model on a redistribution-layout folder of real images."""
    root = tmp_path / "chest_xray" / "test"
    for path, lab in _val_sample(real_data_dir):
        folder = root / ("NORMAL" if lab == "normal" else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / os.path.basename(path))
    out = tmp_path / "ev"
    assert main(["-q", "evaluate", "--data", str(tmp_path / "chest_xray"), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 18 and m["labels"] == list(LABELS)
    assert np.array(m["confusion_matrix"]).sum() == 18
    nvp = m["normal_vs_pneumonia"]
    assert set(nvp) >= {"accuracy", "sensitivity", "specificity", "f1", "auc", "threshold", "ci95"}
    for key in ("bacterial_vs_rest", "viral_vs_rest", "bacterial_vs_viral"):
        assert set(m[key]) >= {"accuracy", "sensitivity", "specificity", "f1", "auc"}
    assert nvp["auc"] >= 0.9  # unseen patients: the shipped weights are meaningful, not random
