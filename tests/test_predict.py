"""Predictor API and ``pneumoscan predict`` outputs (table, --json, --csv) with a real tiny model."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from pneumoscan import INTENDED_USE, LABELS
from pneumoscan.cli import main
from pneumoscan.labels import decide
from pneumoscan.predict import Predictor


@pytest.fixture(scope="module")
def files(dataset_dir):
    return sorted(str(p) for p in (dataset_dir / "train").rglob("*.jpeg"))[:4]


def test_predictor_api(tiny_model_dir, files):
    pred = Predictor(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert pred.threshold == cfg["threshold"] and "test_efficientnet" in repr(pred)
    preds, errors = pred.predict_files(files, batch_size=3)
    assert not errors and [p.path for p in preds] == files
    for p in preds:
        probs = np.array([p.probabilities[lab] for lab in LABELS])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert p.label == LABELS[int(decide(probs[None], pred.threshold)[0])]  # the shared decision rule
        assert p.pneumonia == (p.label != "normal")
        assert p.pneumonia_probability == pytest.approx(1 - p.probabilities["normal"], abs=1e-6)
    with open(files[0], "rb") as f:
        one = pred.predict_bytes(f.read(), name="upload.jpeg")
    assert one.probabilities == pytest.approx(preds[0].probabilities, abs=1e-5)


def test_prevalence_moves_the_probabilities(tiny_model_dir, files):
    low = Predictor(tiny_model_dir, prevalence=0.05).predict_files(files)[0]
    high = Predictor(tiny_model_dir, prevalence=0.95).predict_files(files)[0]
    for a, b in zip(low, high):
        assert a.pneumonia_probability < b.pneumonia_probability


def test_cli_table(tiny_model_dir, files, capsys):
    assert main(["-q", "predict", *files[:2], "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# {INTENDED_USE}" and "threshold" in out[1]
    assert out[2].split()[:2] == ["path", "verdict"] and out[2].split()[-2:] == ["pneumonia", "set"]
    rows = [line for line in out[3:] if not line.startswith(("  warning", "#"))]
    assert len(rows) == 2 and rows[0].startswith(files[0])
    assert rows[0].split()[1] in LABELS and rows[0].split()[-2] in ("yes", "no")
    assert out[-1].startswith("# 2 answered (") and out[-1].endswith("0 out of scope, 0 failed")  # the summary


def test_cli_json(tiny_model_dir, files, dataset_dir, capsys):
    assert main(["-q", "predict", str(dataset_dir / "train" / "NORMAL"), "--model", str(tiny_model_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["intended_use"] == INTENDED_USE and doc["errors"] == []
    assert len(doc["predictions"]) == 16  # a folder is expanded
    p = doc["predictions"][0]
    assert set(p) >= {"path", "label", "probabilities", "pneumonia", "pneumonia_probability", "threshold", "in_scope",
                      "verdict", "reasons", "ood_score", "prediction_set"}
    assert list(p["probabilities"]) == list(LABELS) and p["in_scope"] is True and p["reasons"] == []
    assert p["verdict"] == p["label"] and p["prediction_set"] is None  # an uncalibrated model: no sets, no learned score


def test_cli_csv_and_partial_failure(tiny_model_dir, files, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    rc = main(["-q", "predict", files[0], str(bad), "--model", str(tiny_model_dir), "--csv"])
    cap = capsys.readouterr()
    assert rc == 1  # some files failed: listed, the rest predicted
    rows = list(csv.DictReader(io.StringIO(cap.out)))  # plain CSV: the first line is the header
    assert [r["path"] for r in rows] == [files[0], str(bad)]  # one row per input, the failed one too
    assert set(rows[0]) >= {"label", "p_normal", "p_bacterial", "p_viral", "pneumonia", "threshold", "error"}
    assert sum(float(rows[0][f"p_{lab}"]) for lab in LABELS) == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["error"] == "" and rows[1]["label"] == "" and "broken.png" in rows[1]["error"]
    assert cap.out.splitlines()[0].startswith("path,in_scope,label,verdict,")  # no comment line a CSV reader would take as header
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pneumoscan: error:") and "broken.png" in err[0]


def test_a_model_with_another_class_order_is_refused(tiny_model_dir, tmp_path):
    """config.json's labels are checked on load: outputs in another order are never mislabelled."""
    import json
    import shutil

    from pneumoscan.errors import ModelError
    from pneumoscan.predict import Predictor

    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["labels"] = ["normal", "viral", "bacterial"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"classes \['normal', 'viral', 'bacterial'\] are not pneumoscan's"):
        Predictor(d)


def test_cli_out_file_and_summary(tiny_model_dir, dataset_dir, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    rc = main(["-q", "predict", str(dataset_dir / "train" / "NORMAL"), "--model", str(tiny_model_dir), "--csv",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 16 and "16 answered (" in printed and "0 failed" in printed and str(out) in printed


def _small_png(tmp_path):
    from PIL import Image

    path = tmp_path / "thumb.png"
    Image.fromarray(np.random.default_rng(0).normal(120, 30, (64, 64)).clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_cli_out_of_scope_is_exit_3_with_reasons_and_no_label(tiny_model_dir, files, tmp_path, capsys):
    small = _small_png(tmp_path)
    rc = main(["-q", "predict", files[0], str(small), "--model", str(tiny_model_dir), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 3  # nothing failed, but one input got no diagnosis
    ok, out = doc["predictions"]
    assert ok["in_scope"] is True and ok["label"] in LABELS
    assert out["in_scope"] is False and out["label"] is None and out["probabilities"] is None
    assert out["verdict"] == "not a pediatric frontal chest X-ray" and "too small (64 x 64" in out["reasons"][0]
    assert main(["-q", "predict", str(small), "--model", str(tiny_model_dir)]) == 3
    text = capsys.readouterr().out
    assert "not a pediatric frontal chest X-ray: no diagnosis" in text and "  reason: too small" in text
    assert text.splitlines()[-1] != "" and "0 answered" not in text  # one input: no summary line


def test_cli_out_of_scope_csv_row(tiny_model_dir, tmp_path, capsys):
    assert main(["-q", "predict", str(_small_png(tmp_path)), "--model", str(tiny_model_dir), "--csv"]) == 3
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["in_scope"] == "0" and row["label"] == "" and row["p_normal"] == "" and "too small" in row["reasons"]


def test_a_folder_reports_image_named_files_that_are_not_images_and_passes_over_notes(tiny_model_dir, files, tmp_path,
                                                                                      capsys):
    import shutil

    shutil.copy(files[0], tmp_path / "film.jpeg")
    (tmp_path / "empty.jpeg").write_bytes(b"")  # an interrupted copy
    (tmp_path / "scan.PNG").write_text("not an image")  # mislabelled
    (tmp_path / "notes.txt").write_text("patient notes")  # beside the films: not an image, not meant as one
    rc = main(["-q", "predict", str(tmp_path), "--model", str(tiny_model_dir), "--json"])
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert rc == 1 and [p["path"] for p in doc["predictions"]] == [str(tmp_path / "film.jpeg")]
    errors = {e["path"]: e["error"] for e in doc["errors"]}
    assert set(errors) == {str(tmp_path / "empty.jpeg"), str(tmp_path / "scan.PNG")}
    assert "empty file" in errors[str(tmp_path / "empty.jpeg")]
    assert "not a JPEG, PNG or DICOM" in errors[str(tmp_path / "scan.PNG")]
    assert "notes.txt" not in cap.err and cap.err.count("pneumoscan: error:") == 2
