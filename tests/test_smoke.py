"""End-to-end smoke test of the core pipeline on synthetic data (CPU, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumoscan import LABELS
from pneumoscan.cli import main


def test_train_writes_model_dir(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for f in ("model.safetensors", "config.json", "history.csv", "history.png", "manifest.csv"):
        assert (tiny_model_dir / f).is_file(), f
    assert cfg["labels"] == list(LABELS)
    assert 0.0 <= cfg["threshold"] <= 1.0
    assert cfg["preprocess"]["size"] == 64
    assert len(cfg["files"]["model.safetensors"]) == 64


@pytest.mark.slow
def test_evaluate_schema(tiny_model_dir, dataset_dir, tmp_path):
    rc = main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tiny_model_dir), "--out", str(tmp_path)])
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n"] == 48 and m["labels"] == list(LABELS)
    assert sum(map(sum, m["confusion_matrix"])) == 48
    for key in ("normal_vs_pneumonia", "bacterial_vs_rest", "viral_vs_rest", "bacterial_vs_viral"):
        for k in ("accuracy", "sensitivity", "specificity", "f1", "auc"):
            assert 0.0 <= m[key][k] <= 1.0, (key, k)
    ci = m["normal_vs_pneumonia"]["ci95"]
    assert ci["accuracy"][0] <= m["normal_vs_pneumonia"]["accuracy"] <= ci["accuracy"][1]
    for f in ("confusion_matrix.png", "roc.png", "report.md", "predictions.csv"):
        assert (tmp_path / f).is_file()


@pytest.mark.slow
def test_evaluate_report_inside_the_data_is_not_scored_next_time(tiny_model_dir, dataset_dir, tmp_path):
    import shutil

    data = Path(shutil.copytree(dataset_dir, tmp_path / "chest_xray"))
    out = data / "train" / "NORMAL" / "report"  # its PNGs sit where normal films are found
    for _ in range(2):
        assert main(["-q", "evaluate", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["n"] == 48


@pytest.mark.slow
def test_evaluate_from_feature_cache_matches_full_inference(tiny_model_dir, dataset_dir, tmp_path):
    """A frozen model scored through the feature cache gives the same probabilities as full inference."""
    import csv

    rows = {}
    for mode, extra in (("cache", ["--cache", str(tmp_path / "fc")]), ("full", ["--no-cache"])):
        out = tmp_path / mode
        assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tiny_model_dir),
                     "--out", str(out), *extra]) == 0
        with open(out / "predictions.csv") as f:
            rows[mode] = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["cache"].keys() == rows["full"].keys() and len(rows["cache"]) == 48
    for path, r in rows["full"].items():
        for lab in LABELS:
            assert abs(float(r[f"p_{lab}"]) - float(rows["cache"][path][f"p_{lab}"])) < 1e-4
        assert r["predicted"] == rows["cache"][path]["predicted"]


@pytest.mark.slow
def test_main_job_run_command(dataset_dir, tmp_path, monkeypatch, capsys):
    """`pneumoscan run`: index + extract + train + evaluate on the validation split, in one call."""
    out = tmp_path / "main"
    rc = main(["-q", "run", str(dataset_dir), "--out", str(out), "--backbone", "test_efficientnet", "--size", "64",
               "--no-pretrained", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) == {"index_s", "extract_and_train_s", "calibrate_s", "evaluate_s"}
    m = json.loads((out / "eval-val" / "metrics.json").read_text())
    assert m["n"] == sum(summary["counts"]["val"].values())
    assert (out / "model" / "model.safetensors").is_file() and (out / "manifest.csv").is_file()
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert {"calibration", "conformal", "ood"} <= set(cfg) and (out / "model" / cfg["ood"]["file"]).is_file()
    assert m["gate"]["learned_score"] is True and m["conformal"]["alpha"] == 0.1  # the main job's model knows its limits

    # interrupted half way into its own folder: the earlier run stays whole (its model used to be replaced while its
    # report and summary stayed); into a new folder: nothing is left, so the same command can simply run again
    import pneumoscan.pipeline as pipeline

    def snapshot(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    before = snapshot(out)
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["-q", "run", str(dataset_dir), "--backbone", "test_efficientnet", "--size", "64", "--no-pretrained",
            "--cache", str(tmp_path / "cache"), "--seed", "5"]
    assert main([*argv, "--out", str(out)]) == 130
    assert snapshot(out) == before
    assert main([*argv, "--out", str(tmp_path / "fresh")]) == 130
    capsys.readouterr()
    assert not (tmp_path / "fresh").exists() and not [p for p in tmp_path.iterdir() if ".earlier." in p.name]


def test_main_job_without_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PNEUMOSCAN_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("pneumoscan.pipeline.default_data_dir", lambda: None)
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    assert "pneumoscan data download" in capsys.readouterr().err
