"""Data with something missing: a class, readable files, or the images themselves. evaluate marks what it
cannot compute as n/a and names every file it did not score; threshold and calibrate refuse, before any
work, validation images without a class their fit needs (a one-class fit silently wrecks the model); every
command that scores a model's validation split says so when its images are not on this machine."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pneumoscan.cli import main
from pneumoscan.io import file_digest
from pneumoscan.predict import Predictor


def _linked(src: Path, dst: Path, folders: tuple[str, ...]) -> Path:
    """``dst`` with symbolic links to the images of ``src/train/FOLDER`` for each folder."""
    for folder in folders:
        (dst / folder).mkdir(parents=True)
        for p in sorted((src / "train" / folder).iterdir()):
            (dst / folder / p.name).symlink_to(p)
    return dst


def _files(d: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in d.iterdir() if p.is_file()}


@pytest.fixture()
def no_scoring(monkeypatch):
    """Fails the test if a model is loaded: the refusals come before any work."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the data were checked")

    monkeypatch.setattr(Predictor, "__init__", boom)


@pytest.mark.parametrize("folders,absent,na", [
    (("NORMAL",), "no bacterial and no viral images", ("sensitivity", "f1", "auc")),
    (("PNEUMONIA",), "no normal images", ("specificity", "auc")),
], ids=["normal-only", "pneumonia-only"])
def test_evaluate_on_data_without_a_class_marks_undefined_figures_na(tiny_model_dir, dataset_dir, tmp_path, capsys,
                                                                     folders, absent, na):
    data = _linked(dataset_dir, tmp_path / "data", folders)
    out = tmp_path / "ev"
    rc = main(["-q", "evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    m = json.loads((out / "metrics.json").read_text())
    nvp = m["normal_vs_pneumonia"]
    assert all(nvp[k] is None for k in na) and nvp["accuracy"] is not None
    assert set(m["undefined"]["normal_vs_pneumonia"]) == set(na)
    line = next(x for x in cap.out.splitlines() if x.startswith("normal vs pneumonia:"))
    assert line.count("n/a") == len(na) and "nan" not in line
    assert absent in cap.out
    report = (out / "report.md").read_text()
    assert "n/a" in report and absent in report and "nan" not in report
    assert "n/a" in (out / "report.html").read_text()


def test_evaluate_names_every_file_it_did_not_score(tiny_model_dir, dataset_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir / "train", data)
    notes = data / "NORMAL" / "notes.jpeg"
    notes.write_text("not an image\n")
    good = sorted((data / "PNEUMONIA").glob("*bacteria*"))[0]
    cut = data / "PNEUMONIA" / "person99_bacteria_1.jpeg"
    cut.write_bytes(good.read_bytes()[:400])  # a truncated JPEG: its header passes, its decoding fails
    out = tmp_path / "ev"
    assert main(["-q", "evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert (m["data"]["skipped"], m["data"]["failed_to_decode"]) == (1, 1)
    assert {d["path"]: d["stage"] for d in m["data"]["not_scored"]} == {str(notes): "skipped",
                                                                       str(cut): "failed to decode"}
    for text in (err, (out / "report.md").read_text(), (out / "report.html").read_text()):
        assert str(notes) in text and str(cut) in text


@pytest.mark.parametrize("command,folders,missing", [
    ("calibrate", ("NORMAL",), "no bacterial and no viral images"),
    ("calibrate", ("PNEUMONIA",), "no normal images"),
    ("threshold", ("NORMAL",), "no pneumonia images"),
    ("threshold", ("PNEUMONIA",), "no normal images"),
])
def test_a_fit_on_validation_without_a_class_is_refused_before_any_work(tiny_model_dir, dataset_dir, tmp_path, capsys,
                                                                        no_scoring, command, folders, missing):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _files(model)
    data = _linked(dataset_dir, tmp_path / "data", folders)
    assert main(["-q", command, "--model", str(model), "--data", str(data), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pneumoscan: error:")
    assert missing in err and "normal " in err and "bacterial " in err and "--data" in err
    assert _files(model) == before  # config, gate and card untouched


@pytest.mark.parametrize("command", ["threshold", "robustness"])
def test_a_manifest_whose_images_are_elsewhere_is_named_so_before_any_work(tiny_model_dir, tmp_path, capsys,
                                                                           no_scoring, command):
    """The model's manifest.csv made on another machine: the same one line from every command, not a
    warning per file and "none could be decoded"."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    with open(model / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["path"] = "/elsewhere/" + r["relpath"]
    with open(model / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    args = {"threshold": ["--model", str(model)],
            "robustness": ["--model", str(model), "--data", str(model / "manifest.csv"), "--out", str(tmp_path / "o")]}
    assert main(["-q", command, *args[command]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "are not on this machine (first: /elsewhere/" in err and "pass --data" in err
