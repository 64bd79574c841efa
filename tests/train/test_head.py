"""Head training: the model directory, early stopping, the step schedule, class weighting, bad options."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pneumoscan import LABELS
from pneumoscan.errors import DataError, PneumoscanError
from pneumoscan.features.config import ExtractConfig
from pneumoscan.io import file_digest as sha256_file
from pneumoscan.nets.checkpoint import load_model
from pneumoscan.train.config import TrainConfig
from pneumoscan.train.head import class_weights, fit_head, predict_head, train


def _features(seed: int = 0, n: int = 60, d: int = 16, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, d)) * noise + np.eye(3, d)[y] * 2).astype(np.float32)
    return x, y


def _cfg(**kw) -> TrainConfig:
    base = dict(backbone="test_efficientnet", pretrained=False, max_epochs=6, patience=3, lr=1e-2, batch_size=16)
    return TrainConfig(**{**base, **kw})


def test_model_dir_contents(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "history.csv", "history.png", "manifest.csv"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tmp"))]  # nothing pickled
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["files"]["model.safetensors"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert 0.0 <= cfg["threshold"] <= 1.0 and "Youden" in cfg["threshold_method"]
    assert cfg["labels"] == list(LABELS) and cfg["backbone"] == "test_efficientnet"
    assert cfg["preprocess"]["size"] == 64 and len(cfg["preprocess"]["mean"]) == 3
    assert cfg["train_config"]["lr"] == 0.01 and cfg["train_config"]["class_weight"] == "balanced"
    assert len(cfg["manifest_sha256"]) == 64 and cfg["weights_source"] == "random-seed0"
    assert set(cfg["val_metrics"]) >= {"normal_vs_pneumonia", "three_class", "confusion_matrix"}
    rows = list(csv.DictReader(open(tiny_model_dir / "history.csv")))
    assert len(rows) == cfg["epochs_run"] and 1 <= cfg["best_epoch"] <= cfg["epochs_run"]
    assert {"epoch", "train_loss", "val_loss", "train_acc", "val_acc", "lr"} <= set(rows[0])
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert int(best["epoch"]) == cfg["best_epoch"]
    bundle = load_model(tiny_model_dir)  # loads back, verified, into the architecture from config.json
    assert bundle.threshold == cfg["threshold"]


def test_early_stopping_keeps_the_best_epoch():
    x, y = _features(0, n=60, d=64, noise=3.0)  # noisy, wide: a high learning rate overfits fast
    xv, yv = _features(1, n=30, d=64, noise=3.0)
    cfg = _cfg(lr=0.3, max_epochs=40, patience=3, class_weight="none", dropout=0.0)
    head, history, best_epoch = fit_head(x, y, xv, yv, cfg, progress=False)
    losses = [h["val_loss"] for h in history]
    assert best_epoch == int(np.argmin(losses)) + 1
    assert len(history) < 40 and len(history) == best_epoch + 3  # stopped after `patience` epochs without gain
    p = predict_head(head, xv)
    kept = torch.nn.functional.nll_loss(torch.log(torch.from_numpy(p)), torch.from_numpy(yv)).item()
    assert kept == pytest.approx(min(losses), rel=1e-4)  # the returned head is the best epoch's, not the last


def test_step_schedule_changes_the_learning_rate():
    x, y = _features(0)
    _, history, _ = fit_head(x, y, x, y, _cfg(schedule="step", step_size=2, step_gamma=0.5, max_epochs=5,
                                              patience=10), progress=False)
    assert [h["lr"] for h in history] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3])
    _, flat, _ = fit_head(x, y, x, y, _cfg(max_epochs=3, patience=10), progress=False)
    assert {h["lr"] for h in flat} == {1e-2}


def test_class_weighting():
    w = class_weights(np.array([0, 0, 0, 1, 1, 2]))  # n / (k * count): 6/9, 6/6, 6/3
    np.testing.assert_allclose(w.numpy(), [2 / 3, 1.0, 2.0])
    x, y = _features(0)
    y = np.where(np.arange(len(y)) < 45, 0, y)  # heavy imbalance towards normal
    h_none, _, _ = fit_head(x, y, x, y, _cfg(class_weight="none", max_epochs=3), progress=False)
    h_bal, _, _ = fit_head(x, y, x, y, _cfg(class_weight="balanced", max_epochs=3), progress=False)
    p_none, p_bal = predict_head(h_none, x), predict_head(h_bal, x)
    assert p_bal[:, 0].mean() < p_none[:, 0].mean()  # weighting pulls probability away from the majority


def test_same_seed_same_head():
    x, y = _features(0)
    a, _, _ = fit_head(x, y, x, y, _cfg(max_epochs=2), progress=False)
    b, _, _ = fit_head(x, y, x, y, _cfg(max_epochs=2), progress=False)
    assert torch.equal(a.fc.weight, b.fc.weight)


@pytest.mark.parametrize("kw,msg", [
    ({"lr": 0.0}, "learning rate 0.0"), ({"lr": -1.0}, "learning rate -1.0"), ({"dropout": 1.5}, "dropout 1.5"),
    ({"schedule": "cosine"}, "schedule 'cosine'"), ({"class_weight": "auto"}, "class weight 'auto'"),
    ({"backbone": "resnet9000"}, "unknown backbone"), ({"patience": 0}, "at least 1"),
    ({"label_smoothing": 1.0}, "label smoothing")])
def test_bad_options_are_clear_errors(kw, msg):
    with pytest.raises(PneumoscanError, match=msg):
        _cfg(**kw)


def test_train_needs_train_and_val_images(tmp_path):
    from synthetic import make_dataset

    root = make_dataset(tmp_path / "d", n_patients=3, per_patient=1, size=16)
    (root / "train").rename(root / "test")  # only a test split
    with pytest.raises(DataError, match="no train/val images"):
        train(root, tmp_path / "m", _cfg(), extract=ExtractConfig(cache=str(tmp_path / "c"), workers=0), progress=False)
    assert not (tmp_path / "m").exists()
