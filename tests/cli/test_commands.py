"""Every command's bad inputs give one line ``pneumoscan: error: ...`` on stderr and exit 2 (no
traceback); argparse errors exit 2 too. Also the compare command end to end on synthetic data."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from pneumoscan.cli import main


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "textonly" / "NORMAL").mkdir(parents=True)
    (root / "textonly" / "NORMAL" / "readme.txt").write_text("not an image")
    (root / "notimage.jpeg").write_text("plain text pretending to be a JPEG")
    (root / "nomodel").mkdir()
    return root


@pytest.fixture(scope="module")
def tampered_model(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tampered") / "m"
    shutil.copytree(tiny_model_dir, d)
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    return d


def _one_error_line(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert rc == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("pneumoscan: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_data_index_errors(bad_dirs, tmp_path, capsys):
    _one_error_line(capsys, ["-q", "data", "index", str(bad_dirs / "missing")], "does not exist")
    _one_error_line(capsys, ["-q", "data", "index", str(bad_dirs / "empty")], "no labelled images")
    _one_error_line(capsys, ["-q", "data", "index", str(bad_dirs / "textonly")], "no labelled images")
    _one_error_line(capsys, ["-q", "data", "index", str(bad_dirs / "notimage.jpeg")], "not a folder")


@pytest.mark.slow
def test_extract_and_train_errors(dataset_dir, bad_dirs, tmp_path, capsys):
    c = ["--cache", str(tmp_path / "c"), "--no-pretrained", "--workers", "0"]
    _one_error_line(capsys, ["-q", "extract", str(bad_dirs / "missing"), *c], "does not exist")
    _one_error_line(capsys, ["-q", "extract", str(bad_dirs / "empty"), *c], "no labelled images")
    _one_error_line(capsys, ["-q", "extract", str(dataset_dir), "--backbone", "test_efficientnet", "--size", "5", *c],
                    "image size 5")
    _one_error_line(capsys, ["-q", "extract", str(dataset_dir), "--backbone", "nope", *c], "unknown backbone 'nope'")
    _one_error_line(capsys, ["-q", "train", str(dataset_dir), "--out", str(tmp_path / "m"), "--backbone", "nope", *c],
                    "unknown backbone")
    _one_error_line(capsys, ["-q", "train", str(dataset_dir), "--out", str(tmp_path / "m"), "--lr", "0",
                             "--backbone", "test_efficientnet", *c], "learning rate 0")
    _one_error_line(capsys, ["-q", "train", str(bad_dirs / "missing"), "--out", str(tmp_path / "m"), *c],
                    "does not exist")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_evaluate_and_predict_errors(dataset_dir, bad_dirs, tiny_model_dir, tampered_model, tmp_path, capsys):
    out = ["--out", str(tmp_path / "ev")]
    _one_error_line(capsys, ["-q", "evaluate", "--data", str(bad_dirs / "missing"), "--model", str(tiny_model_dir),
                             *out], "does not exist")
    _one_error_line(capsys, ["-q", "evaluate", "--data", str(bad_dirs / "empty"), "--model", str(tiny_model_dir),
                             *out], "no labelled images")
    _one_error_line(capsys, ["-q", "evaluate", "--data", str(dataset_dir), "--model", str(bad_dirs / "nomodel"),
                             *out], "not a pneumoscan model directory")
    _one_error_line(capsys, ["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tmp_path / "nothere"),
                             *out], "does not exist")
    _one_error_line(capsys, ["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tampered_model), *out],
                    "integrity check")
    assert not (tmp_path / "ev" / "metrics.json").exists()
    img = str(next((dataset_dir / "train" / "NORMAL").iterdir()))
    _one_error_line(capsys, ["-q", "predict", str(bad_dirs / "missing.png"), "--model", str(tiny_model_dir)],
                    "missing.png")
    _one_error_line(capsys, ["-q", "predict", str(bad_dirs / "empty"), "--model", str(tiny_model_dir)],
                    "nothing to predict")
    _one_error_line(capsys, ["-q", "predict", str(bad_dirs / "notimage.jpeg"), "--model", str(tiny_model_dir)],
                    "notimage.jpeg")
    _one_error_line(capsys, ["-q", "predict", img, "--model", str(bad_dirs / "nomodel")], "nomodel")
    _one_error_line(capsys, ["-q", "predict", img, "--model", str(tampered_model)], "integrity check")
    _one_error_line(capsys, ["-q", "predict", img, "--model", str(tiny_model_dir), "--prevalence", "1.5"],
                    "prevalence 1.5")


@pytest.mark.slow
def test_compare_and_download_errors(dataset_dir, bad_dirs, tmp_path, capsys, no_network):
    c = ["--out", str(tmp_path / "cmp"), "--cache", str(tmp_path / "c"), "--workers", "0"]
    _one_error_line(capsys, ["-q", "compare", str(bad_dirs / "missing"), "--no-pretrained", *c], "does not exist")
    _one_error_line(capsys, ["-q", "compare", str(dataset_dir), "--backbones", "test_efficientnet,nope", *c],
                    "unknown backbone 'nope'")
    _one_error_line(capsys, ["-q", "compare", str(dataset_dir), "--backbones", "test_efficientnet", "--sizes", "5",
                             "--no-pretrained", *c], "image size 5")
    _one_error_line(capsys, ["-q", "compare", str(dataset_dir), "--backbones", "test_efficientnet",
                             "--schedules", "none,cosine", "--no-pretrained", *c], "schedule 'cosine'")
    _one_error_line(capsys, ["-q", "compare", str(dataset_dir), "--backbones", "test_efficientnet", "--weights",
                             "resnet50=/x.pth", *c], "not among --backbones")

    # a study backbone without offline weights: a clear error before any work, never random weights
    _one_error_line(capsys, ["-q", "compare", str(dataset_dir), "--backbones", "efficientnet_lite0,resnet50", *c],
                    "resnet50", "--weights FILE")
    assert not (tmp_path / "cmp").exists()
    _one_error_line(capsys, ["-q", "data", "download", "--dest", str(tmp_path / "dl"), "--sha256", "xyz",
                             "--url", "http://127.0.0.1:9/a.zip"], "SHA-256")


@pytest.mark.parametrize("argv", [
    ["extract", "x", "--batch-size", "0"], ["compare", "x", "--out", "o", "--sizes", "abc"],
    ["compare", "x", "--out", "o", "--lrs", ""], ["data", "index", "x", "--val-fraction", "1.5"],
    ["predict"], ["nosuchcommand"], ["train", "x"]])
def test_argparse_errors_exit_2(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.slow
def test_compare_end_to_end(dataset_dir, tmp_path, capsys, monkeypatch):
    out, best = tmp_path / "cmp", tmp_path / "best"
    rc = main(["-q", "compare", str(dataset_dir), "--out", str(out), "--backbones", "test_efficientnet",
               "--sizes", "32,48", "--lrs", "0.01,0.001", "--no-pretrained", "--epochs", "4", "--patience", "2",
               "--cache", str(tmp_path / "c"), "--workers", "0", "--save-best", str(best)])
    assert rc == 0
    assert "best: test_efficientnet@" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert len(rows) == 4 and {r["size"] for r in rows} == {"32", "48"}
    losses = [float(r["val_loss"]) for r in rows]
    chosen = [r for r in rows if r["best_overall"] == "True"]
    assert len(chosen) == 1 and float(chosen[0]["val_loss"]) == min(losses)  # selected on validation loss
    doc = json.loads((out / "compare.json").read_text())
    assert doc["select_by"] == "loss" and doc["best"]["lr"] == float(chosen[0]["lr"])
    for f in ("compare.md", "compare_backbones.png", "compare_grid.png"):
        assert (out / f).stat().st_size > 0
    assert "| test_efficientnet |" in (out / "compare.md").read_text()
    cfg = json.loads((best / "config.json").read_text())  # the best configuration, retrained identically
    assert cfg["train_config"]["lr"] == doc["best"]["lr"] and cfg["preprocess"]["size"] == doc["best"]["size"]
    assert cfg["val_metrics"]["normal_vs_pneumonia"]["auc"] == pytest.approx(doc["best"]["val_auc"], abs=1e-6)
    assert cfg["manifest_sha256"] == doc["manifest_sha256"]

    # a later run into the same --out that fails while writing leaves the earlier report whole, not mixed
    import pneumoscan.train.compare as cmp

    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(names, series, path, **kw):
        if path.name == "compare_grid.png":
            raise OSError(28, "No space left on device", str(path))
        return real(names, series, path, **kw)

    real = cmp.plot_bars
    monkeypatch.setattr(cmp, "plot_bars", broken)
    assert main(["-q", "compare", str(dataset_dir), "--out", str(out), "--backbones", "test_efficientnet", "--sizes",
                 "32", "--lrs", "0.005", "--no-pretrained", "--epochs", "2", "--cache", str(tmp_path / "c"),
                 "--workers", "0"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
