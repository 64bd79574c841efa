"""pneumoscan calibrate on a real tiny model: what it stores, and every surface that then carries the
temperature, the prediction sets and the out-of-distribution score."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pneumoscan import LABELS
from pneumoscan.cli import main
from pneumoscan.errors import ModelError
from pneumoscan.predict import Predictor
from pneumoscan.uncertainty import temperature_scale


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cal") / "model"
    shutil.copytree(tiny_model_dir, d)
    assert main(["-q", "calibrate", "--model", str(d)]) == 0
    return d


def _cfg(d):
    return json.loads((d / "config.json").read_text())


def _files(dataset_dir):
    return sorted(str(p) for p in (dataset_dir / "train").rglob("*.jpeg"))[:6]


def test_calibrate_stores_temperature_sets_and_gate(calibrated):
    cfg = _cfg(calibrated)
    cal, conf, ood = cfg["calibration"], cfg["conformal"], cfg["ood"]
    assert cal["temperature"] > 0 and cal["n"] >= 4 and cal["requested"] == "auto"
    by = cal["ece_by_scaling"]  # auto: both fitted, the one with the lower validation calibration error kept
    assert set(by) == {"temperature", "bias-corrected"} and cal["method"] == min(by, key=by.get)
    assert cal["ece_after"] == pytest.approx(by[cal["method"]]) and (cal["bias"] is None) == (cal["method"] == "temperature")
    assert conf["alpha"] == 0.1 and 0 < conf["qhat"] <= 1 and set(conf["heldout"]["by_class"]) <= set(LABELS)
    assert ood["file"].startswith("ood-") and ood["file"] in cfg["files"] and (calibrated / ood["file"]).is_file()
    assert ood["validation_flagged"] <= 0.25 and ood["threshold"] > 0  # 98.5 % quantile of a handful of images
    assert 0 < ood["upright_threshold"] < 1 and ood["upright_validation_turned_caught"] >= 0.5
    assert cfg["threshold_method"].endswith("(calibrated probabilities)")
    card = (calibrated / "MODEL_CARD.md").read_text()
    assert "## Calibration and prediction sets" in card and f"T = {cal['temperature']:.3f}" in card
    assert "only for images exchangeable with the validation split" in card and ood["file"] in card


def test_predictions_carry_calibrated_probabilities_sets_and_scores(calibrated, dataset_dir):
    pred = Predictor(calibrated, backend="torch")
    files = _files(dataset_dir)
    preds, errors = pred.predict_files(files)
    assert not errors
    t, bias = pred.temperature, pred.class_bias
    assert bias is None or len(bias) == len(LABELS)
    pred.temperature, pred.class_bias = 1.0, None
    raw, _, _, _ = pred.arrays(files, features=False)
    pred.temperature, pred.class_bias = t, bias
    assert np.stack([p.scores for p in preds]) == pytest.approx(temperature_scale(raw, t, bias), abs=1e-6)
    assert sum(p.in_scope for p in preds) >= len(preds) // 2
    for p in preds:
        assert p.ood_score is not None
        if p.in_scope:
            assert p.prediction_set and p.label in p.prediction_set and p.verdict in (p.label, "uncertain: refer")
        else:
            assert p.label is None and p.prediction_set is None and p.reasons


def test_cli_json_has_sets_scores_and_alpha(calibrated, dataset_dir, capsys):
    assert main(["-q", "predict", *_files(dataset_dir)[:2], "--model", str(calibrated), "--json"]) in (0, 3)
    doc = json.loads(capsys.readouterr().out)
    assert doc["conformal_alpha"] == 0.1 and doc["ood_threshold"] == _cfg(calibrated)["ood"]["threshold"]
    for p in doc["predictions"]:
        assert isinstance(p["ood_score"], float) and (p["prediction_set"] or not p["in_scope"])


def test_a_changed_ood_file_is_refused(calibrated, tmp_path):
    d = shutil.copytree(calibrated, tmp_path / "m")
    name = _cfg(d)["ood"]["file"]
    data = bytearray((d / name).read_bytes())
    data[-1] ^= 0xFF
    (d / name).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="fails its integrity check"):
        Predictor(d)


def test_recalibrating_replaces_the_gate_file(calibrated, tmp_path):
    d = shutil.copytree(calibrated, tmp_path / "m")
    old = _cfg(d)["ood"]["file"]
    assert main(["-q", "calibrate", "--model", str(d), "--alpha", "0.2", "--pca-dim", "4"]) == 0
    cfg = _cfg(d)
    assert cfg["conformal"]["alpha"] == 0.2 and cfg["ood"]["pca_dim"] <= 4
    assert cfg["ood"]["file"] != old and not (d / old).exists() and old not in cfg["files"]
    assert len(cfg["threshold_history"]) == len(_cfg(calibrated)["threshold_history"]) + 1
    assert Predictor(d).ood.components.shape[0] <= 4


def test_the_shipped_model_is_not_calibrated_in_place(capsys):
    from pneumoscan.nets.modeldir import resolve_model_dir

    assert main(["-q", "calibrate", "--model", str(resolve_model_dir(None))]) == 2
    assert "read-only" in capsys.readouterr().err


def test_evaluate_reports_calibration_coverage_and_risk(calibrated, dataset_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(calibrated), "--out", str(out),
                 "--n-boot", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["temperature"] == pytest.approx(_cfg(calibrated)["calibration"]["temperature"])
    assert m["calibration"]["class_bias"] == _cfg(calibrated)["calibration"]["bias"]  # None with temperature alone
    assert m["calibration"]["uncalibrated"] is not None or m["calibration"]["temperature"] == 1.0
    k = m["conformal"]
    assert k["alpha"] == 0.1 and 0 <= k["coverage"] <= 1 and set(k["by_class"]) == set(LABELS)
    assert sum(v["n"] for v in k["by_class"].values()) == m["n"]
    assert [r["abstain"] for r in m["risk_coverage"]] == [0.0, 0.05, 0.1, 0.2]
    assert m["gate"]["learned_score"] is True and m["gate"]["n"] == m["n"]
    for f in ("reliability.png", "risk_coverage.png"):
        assert (out / f).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Knowing when not to answer" in report and "| normal |" in report
    assert "exchangeable with the validation split" in (out / "report.html").read_text()
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].endswith("in_scope,verdict,prediction_set,ood_score,reasons")


@pytest.mark.slow
def test_onnx_path_scores_like_torch_without_torch_features(calibrated, tmp_path, dataset_dir):
    d = shutil.copytree(calibrated, tmp_path / "m")
    assert main(["-q", "export", "--model", str(d)]) == 0
    assert "features" in _cfg(d)["onnx"]["outputs"]
    files = _files(dataset_dir)
    a, _ = Predictor(d, backend="onnx").predict_files(files)
    b, _ = Predictor(d, backend="torch").predict_files(files)
    assert [p.ood_score for p in a] == pytest.approx([p.ood_score for p in b], rel=1e-3, abs=1e-3)
    assert [p.prediction_set for p in a] == [p.prediction_set for p in b]


def test_an_upside_down_film_is_stopped(calibrated, dataset_dir):
    from pneumoscan.data.imaging import load_xray

    pred = Predictor(calibrated)
    x = load_xray(_files(dataset_dir)[0])
    turned = type(x)(np.rot90(x.pixels, 2).copy(), format=x.format, mode=x.mode, size=x.size)
    p = pred.predict_xray(turned, "turned")
    assert not p.in_scope and any(r.startswith("upside down") for r in p.reasons)


def test_scope_suite_writes_rates_and_records_them(calibrated, tmp_path, capsys):
    d = shutil.copytree(calibrated, tmp_path / "m")
    out = tmp_path / "results"
    assert main(["-q", "scope-suite", "--model", str(d), "--out", str(out), "--n-transformed", "4", "--record"]) == 0
    report = json.loads((out / "scope-suite.json").read_text())
    groups = report["groups"]
    assert {"blank", "noise", "photo", "text", "xray_rotated", "xray_inverted", "validation_clean"} <= set(groups)
    assert groups["blank"]["flagged"] == 1.0 and groups["noise"]["flagged"] == 1.0  # the image checks alone
    assert groups["xray_rotated"]["n"] == 8 and groups["xray_inverted"]["n"] == 4
    assert "| blank |" in (out / "scope-suite.md").read_text()
    cfg = _cfg(d)
    assert cfg["scope_suite"]["groups"]["noise"]["flagged"] == 1.0
    assert "Out-of-scope suite" in (d / "MODEL_CARD.md").read_text()
    printed = capsys.readouterr().out
    assert "noise" in printed and "written:" in printed


@pytest.mark.slow
def test_an_export_without_features_falls_back_to_torch_for_the_gate(calibrated, tmp_path, dataset_dir):
    d = shutil.copytree(calibrated, tmp_path / "m")
    assert main(["-q", "export", "--model", str(d)]) == 0
    cfg = _cfg(d)
    cfg["onnx"]["outputs"] = ["logits"]  # as an export made before the features output existed says
    (d / "config.json").write_text(json.dumps(cfg))
    pred = Predictor(d)  # auto: the gate needs features, so PyTorch
    assert pred.backend == "torch"
    (p,), _ = pred.predict_files(_files(dataset_dir)[:1])
    assert p.ood_score is not None


def test_each_scaling_on_request(calibrated, tmp_path, dataset_dir):
    d = shutil.copytree(calibrated, tmp_path / "m")
    assert main(["-q", "calibrate", "--model", str(d), "--scaling", "temperature"]) == 0
    cal = _cfg(d)["calibration"]
    assert cal["method"] == "temperature" and cal["bias"] is None and list(cal["ece_by_scaling"]) == ["temperature"]
    pred = Predictor(d, backend="torch")
    assert pred.class_bias is None and pred.temperature == cal["temperature"]
    assert main(["-q", "calibrate", "--model", str(d), "--scaling", "bias-corrected"]) == 0
    cal = _cfg(d)["calibration"]
    assert cal["method"] == "bias-corrected" and len(cal["bias"]) == len(LABELS) and abs(sum(cal["bias"])) < 1e-9
    pred = Predictor(d, backend="torch")
    assert pred.class_bias == cal["bias"]
    files = _files(dataset_dir)
    preds, _ = pred.predict_files(files)
    t, bias = pred.temperature, pred.class_bias
    pred.temperature, pred.class_bias = 1.0, None
    raw, _, _, _ = pred.arrays(files, features=False)
    assert np.stack([p.scores for p in preds]) == pytest.approx(temperature_scale(raw, t, bias), abs=1e-6)
