"""Operating point: threshold re-chosen on validation into config.json only; prevalence correction."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.data.splits import validation_set
from pneumoscan.evaluate.operating_point import score
from pneumoscan.io import file_digest as sha256_file
from pneumoscan.metrics import choose_threshold, model_prior, prevalence_prior, prior_shift
from pneumoscan.predict import Predictor


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def _files(d):
    return {p.name: sha256_file(p) for p in d.iterdir() if p.is_file()}


def test_threshold_changes_only_config_and_is_chosen_on_val(model_copy, capsys):
    before = json.loads((model_copy / "config.json").read_text())
    files_before = _files(model_copy)
    rc = main(["-q", "threshold", "--model", str(model_copy), "--method", "sensitivity",
               "--target-sensitivity", "0.9"])
    assert rc == 0, capsys.readouterr().err
    after = json.loads((model_copy / "config.json").read_text())
    files_after = _files(model_copy)
    changed = {n for n in files_before if files_before[n] != files_after.get(n)}
    assert changed <= {"config.json", "MODEL_CARD.md"} and "model.safetensors" not in changed
    assert set(files_after) - set(files_before) <= {"MODEL_CARD.md"}
    # the threshold is the one chosen on the val split of the model's own manifest
    ev = validation_set(None, after, model_copy)
    assert ev.split == "val" and ev.matches_model
    manifest_val = [line.split(",")[0] for line in (model_copy / "manifest.csv").read_text().splitlines()[1:]
                    if line.split(",")[4] == "val"]
    assert sorted(ev.paths) == sorted(manifest_val)
    y, probs = score(Predictor(model_copy), ev)
    expected, how = choose_threshold(y, probs, "sensitivity", 0.9)
    assert after["threshold"] == pytest.approx(expected) and after["threshold_method"] == how
    # a record of the old value and method; everything else untouched
    hist = after["threshold_history"][-1]
    assert hist["threshold"] == before["threshold"] and hist["method"] == before["threshold_method"]
    assert hist["n_val"] == len(ev)
    ignore = {"threshold", "threshold_method", "threshold_history", "val_metrics", "val_data"}
    assert {k: v for k, v in after.items() if k not in ignore} == {k: v for k, v in before.items() if k not in ignore}
    assert after["val_metrics"]["normal_vs_pneumonia"]["threshold"] == pytest.approx(expected)
    assert Predictor(model_copy).threshold == pytest.approx(expected)


def test_threshold_youden_with_data_folder(model_copy, dataset_dir):
    assert main(["-q", "threshold", "--model", str(model_copy), "--data", str(dataset_dir)]) == 0
    cfg = json.loads((model_copy / "config.json").read_text())
    assert "Youden" in cfg["threshold_method"] and len(cfg["threshold_history"]) == 1


def test_threshold_refuses_foreign_manifest_and_bad_options(model_copy, dataset_dir, tmp_path, capsys):
    before = (model_copy / "config.json").read_bytes()
    # the same folder split with another seed: its "val" overlaps the model's training images
    from pneumoscan.data.index import index_dataset
    other = index_dataset(dataset_dir, 0.2, seed=7).save(tmp_path / "other.csv")
    assert main(["-q", "threshold", "--model", str(model_copy), "--data", str(other)]) == 2
    assert "not the manifest this model was trained on" in capsys.readouterr().err
    assert main(["-q", "threshold", "--model", str(model_copy), "--method", "sensitivity"]) == 2
    assert "--target-sensitivity" in capsys.readouterr().err
    assert main(["-q", "threshold", "--model", str(tmp_path / "nope")]) == 2
    assert (model_copy / "config.json").read_bytes() == before
    assert main(["-q", "threshold", "--model", str(model_copy), "--data", str(other), "--force"]) == 0


def test_model_prior_of_balanced_training_is_uniform(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["train_config"]["class_weight"] == "balanced"
    np.testing.assert_allclose(model_prior(cfg), [1 / 3] * 3)
    unweighted = {**cfg, "train_config": {**cfg["train_config"], "class_weight": "none"},
                  "train_prior": [0.25, 0.5, 0.25]}
    np.testing.assert_allclose(model_prior(unweighted), [0.25, 0.5, 0.25])


def test_prevalence_prior_splits_pneumonia_by_training_ratio():
    cfg = {"train_prior": [0.2, 0.6, 0.2]}
    np.testing.assert_allclose(prevalence_prior(cfg, 0.4), [0.6, 0.3, 0.1])


def test_predictor_prevalence_is_saerens_reweighting(tiny_model_dir):
    x = np.random.default_rng(0).normal(0, 1, (5, 3, 64, 64)).astype(np.float32)
    raw = Predictor(tiny_model_dir).probabilities(x)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tp = np.asarray(cfg["train_prior"])
    low = Predictor(tiny_model_dir, prevalence=0.2).probabilities(x)
    # by hand: p'(c|x) ∝ p(c|x) * new(c) / model(c), model prior uniform for a balanced loss
    new = np.array([0.8, 0.2 * tp[1] / (tp[1] + tp[2]), 0.2 * tp[2] / (tp[1] + tp[2])])
    hand = raw * new / (1 / 3)
    np.testing.assert_allclose(low, hand / hand.sum(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(low.sum(1), 1.0, atol=1e-6)
    assert (low[:, 0] >= raw[:, 0] - 1e-9).all()  # lower prevalence: more weight on normal
    high = Predictor(tiny_model_dir, prevalence=0.9).probabilities(x)
    assert (high[:, 0] <= raw[:, 0] + 1e-9).all()
    # stating the model's own prior changes nothing
    same = prior_shift(raw, [1 / 3] * 3, [1 / 3] * 3)
    np.testing.assert_allclose(same, raw, atol=1e-9)


@pytest.mark.slow
def test_evaluate_prevalence_option(tiny_model_dir, dataset_dir, tmp_path, capsys):
    assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "plain")]) == 0
    assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "low"), "--prevalence", "0.05"]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    low = json.loads((tmp_path / "low" / "metrics.json").read_text())
    assert low["model"]["prevalence"] == 0.05 and plain["model"]["prevalence"] is None
    # fewer pneumonia calls when pneumonia is said to be rare; AUC (a ranking) barely moves
    assert low["normal_vs_pneumonia"]["tp"] + low["normal_vs_pneumonia"]["fp"] <= \
        plain["normal_vs_pneumonia"]["tp"] + plain["normal_vs_pneumonia"]["fp"]
    capsys.readouterr()
    assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "bad"), "--prevalence", "1.5"]) == 2
    assert "prevalence 1.5" in capsys.readouterr().err
