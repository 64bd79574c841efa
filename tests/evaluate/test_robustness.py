"""Robustness report on the tiny model: files and keys, identity shift, shifts themselves, seeding."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate.robustness import DEFAULT_SHIFTS, SUMMARY, Shift, robustness


@pytest.fixture(scope="module")
def report_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust")
    assert main(["-q", "robustness", "--model", str(tiny_model_dir), "--data",
                 str(tiny_model_dir / "manifest.csv"), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_report_files_and_keys(report_dir, tiny_model_dir):
    for f in ("robustness.json", "robustness.csv", "robustness.md", "robustness.png"):
        assert (report_dir / f).is_file(), f
    r = json.loads((report_dir / "robustness.json").read_text())
    assert {"model", "data", "seed", "metrics", "conditions", "worst_drop"} <= set(r)
    names = [c["name"] for c in r["conditions"]]
    assert names == ["clean"] + [s.name for s in DEFAULT_SHIFTS]
    n_val = sum(1 for line in (tiny_model_dir / "manifest.csv").read_text().splitlines()[1:]
                if line.split(",")[4] == "val")
    assert r["data"]["split"] == "val" and r["data"]["n"] == n_val and r["data"]["matches_model_manifest"]
    for c in r["conditions"]:
        assert set(c["summary"]) == set(SUMMARY) == set(c["drop"])
        assert c["metrics"]["n"] == n_val
        for k, v in c["summary"].items():
            if v is not None and c["drop"][k] is not None:
                assert c["drop"][k] == pytest.approx(r["conditions"][0]["summary"][k] - v)
    assert all(v == 0 for v in r["conditions"][0]["drop"].values() if v is not None)
    rows = list(csv.DictReader(open(report_dir / "robustness.csv")))
    assert [row["condition"] for row in rows] == names and "drop_specificity" in rows[0]
    md = (report_dir / "robustness.md").read_text()
    assert "| condition |" in md and "noise 15" in md and "robustness.png" in md


def test_identity_shift_gives_zero_drop(tiny_model_dir, tmp_path):
    r = robustness(tiny_model_dir / "manifest.csv", tmp_path, tiny_model_dir, shifts=[Shift("identity")])
    clean, ident = r["conditions"]
    assert ident["summary"] == clean["summary"]
    assert all(v == 0.0 for v in ident["drop"].values() if v is not None)


@pytest.mark.slow
def test_noise_is_seeded(tiny_model_dir, dataset_dir):
    from pneumoscan.data.imaging import load_xray
    from pneumoscan.evaluate.robustness import shifted_probabilities
    from pneumoscan.predict import Predictor

    pred = Predictor(tiny_model_dir)
    images = [load_xray(p).pixels for p in sorted((dataset_dir / "train" / "NORMAL").iterdir())[:6]]
    noise = Shift("noise", 15)
    a = shifted_probabilities(pred, images, noise, seed=3, batch_size=4)
    b = shifted_probabilities(pred, images, noise, seed=3, batch_size=4)
    c = shifted_probabilities(pred, images, noise, seed=4, batch_size=4)
    clean = shifted_probabilities(pred, images, Shift("identity"), seed=3, batch_size=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, clean)


def test_data_folder_without_split_uses_all_images(tiny_model_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, base in (("normal", 60), ("bacterial", 140), ("viral", 200)):
        (tmp_path / "ext" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.clip(rng.normal(base, 25, (80, 80)), 0, 255).astype(np.uint8)).save(
                tmp_path / "ext" / cls / f"x{i}.png")
    r = robustness(tmp_path / "ext", tmp_path / "out", tiny_model_dir, shifts=[Shift("blur", 1)])
    assert r["data"]["split"] == "all" and r["data"]["n"] == 9


@pytest.mark.parametrize("shift", DEFAULT_SHIFTS, ids=lambda s: s.name)
def test_each_shift_keeps_uint8_and_changes_the_image(shift):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:200, 0:240]
    gray = (127 + 80 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.uint8)
    out = shift(gray, rng)
    assert out.dtype == np.uint8 and out.ndim == 2
    if shift.kind == "up_from":
        assert min(out.shape) == 128 and out.shape[1] / out.shape[0] == pytest.approx(240 / 200, rel=0.02)
    else:
        assert out.shape == gray.shape
        assert not np.array_equal(out, gray)
    if shift.kind in ("contrast", "gamma"):  # monotone intensity maps keep the pixel order
        i = np.argsort(gray.ravel(), kind="stable")
        assert (np.diff(out.ravel()[i].astype(int)) >= 0).all()


def test_contrast_and_gamma_direction():
    gray = np.linspace(20, 235, 256, dtype=np.float32).astype(np.uint8).reshape(16, 16)
    rng = np.random.default_rng(0)
    assert Shift("contrast", 0.6)(gray, rng).std() < gray.std() < Shift("contrast", 1.4)(gray, rng).std()
    assert Shift("gamma", 0.6)(gray, rng).mean() > gray.mean() > Shift("gamma", 1.6)(gray, rng).mean()


def test_bad_shift_and_bad_data_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(PneumoscanError, match="unknown"):
        Shift("rotate", 5)
    with pytest.raises(PneumoscanError, match="positive"):
        Shift("blur", 0)
    assert main(["-q", "robustness", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_auto_backend_exports_for_large_runs(tiny_model_dir, tmp_path):
    from pneumoscan.evaluate.robustness import _predictor
    from pneumoscan.predict import Predictor

    small = _predictor(tiny_model_dir, "auto", n_images=10)
    large = _predictor(tiny_model_dir, "auto", n_images=10_000)
    assert small.backend == "torch" and large.backend == "onnx"
    assert large.model_dir == tiny_model_dir and not (tiny_model_dir / "model.onnx").exists()
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(large.probabilities(x), Predictor(tiny_model_dir).probabilities(x), atol=1e-4)


def test_a_folder_of_symbolic_links_is_read_through_its_links(tiny_model_dir, dataset_dir, tmp_path):
    """A folder without a split whose members link to images elsewhere (as data index, evaluate and threshold
    take it): its paths stay under the folder instead of leaving it for the link targets."""
    linked = tmp_path / "linked"
    n = 0
    for folder in ("NORMAL", "PNEUMONIA"):
        (linked / folder).mkdir(parents=True)
        for p in sorted((dataset_dir / "train" / folder).iterdir())[:4]:
            (linked / folder / p.name).symlink_to(p)
            n += 1
    r = robustness(linked, tmp_path / "out", tiny_model_dir, shifts=[Shift("blur", 1)])
    assert r["data"]["split"] == "all" and r["data"]["n"] == n
