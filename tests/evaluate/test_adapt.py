"""Prior estimation at a new site: known-answer tests of EM (Saerens et al.) and BBSE, and the command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.evaluate.adapt import bbse_prior, em_prior
from pneumoscan.labels import LABELS


def _posteriors(prior, n, rng, train_prior=(1 / 3, 1 / 3, 1 / 3)):
    """Labels drawn with ``prior``, one noisy Gaussian score per class, and the exact Bayes posteriors
    for ``train_prior`` (so the model is calibrated for its training prior, as EM assumes)."""
    y = rng.choice(3, n, p=prior)
    x = rng.normal(0, 1, (n, 3)) + 1.6 * np.eye(3)[y]
    lik = np.exp(-0.5 * ((x[:, None, :] - 1.6 * np.eye(3)[None]) ** 2).sum(-1))  # (n, class)
    post = lik * np.asarray(train_prior)
    return y, post / post.sum(1, keepdims=True)


@pytest.mark.parametrize("target", [(0.6, 0.3, 0.1), (0.2, 0.2, 0.6), (1 / 3, 1 / 3, 1 / 3)])
def test_em_recovers_a_known_prior(target):
    rng = np.random.default_rng(1)
    _, post = _posteriors(target, 6000, rng)
    est, iters = em_prior(post, np.full(3, 1 / 3))
    np.testing.assert_allclose(est, target, atol=0.03)
    assert 1 <= iters < 1000
    naive = post.mean(0)  # what averaging the posteriors would say: pulled towards the training prior
    if not np.allclose(target, 1 / 3):
        assert np.abs(naive - target).max() > 0.05 > np.abs(est - target).max()


def test_bbse_recovers_a_known_prior_from_hard_predictions():
    rng = np.random.default_rng(2)
    y_val, p_val = _posteriors((1 / 3, 1 / 3, 1 / 3), 6000, rng)
    y_t, p_t = _posteriors((0.7, 0.2, 0.1), 6000, rng)
    est = bbse_prior(p_val.argmax(1), y_val, p_t.argmax(1))
    np.testing.assert_allclose(est, (0.7, 0.2, 0.1), atol=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["em", "bbse"])
def test_adapt_command_reports_and_writes_the_estimate(method, tiny_model_dir, dataset_dir, tmp_path, capsys):
    out = tmp_path / "prior.json"
    rc = main(["-q", "adapt", str(dataset_dir / "train" / "NORMAL"), "--model", str(tiny_model_dir),
               "--method", method, "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["method"] == method and r["n"] == 16 and set(r["prior"]) == set(LABELS)
    assert sum(r["prior"].values()) == pytest.approx(1.0, abs=1e-3)
    assert r["prior"]["normal"] > 0.5  # a folder of normal films
    assert "estimated pneumonia prevalence" in text


def test_adapt_on_undecodable_files_names_one_and_why(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    rc = main(["-q", "adapt", str(tmp_path / "a.jpg"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 1 images could be decoded" in err and "a.jpg: not a recognised image" in err
    assert not (tmp_path / "p.json").exists()


def test_adapt_on_a_folder_of_broken_image_files_says_which(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("not meant as an image")
    rc = main(["-q", "adapt", str(tmp_path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to adapt to" in err and "a.jpg: empty file" in err and "readme" not in err
    assert not (tmp_path / "p.json").exists()


def test_adapt_counts_image_files_that_are_not_images_as_failed(tiny_model_dir, dataset_dir, tmp_path, capsys):
    import shutil

    for f in sorted((dataset_dir / "train" / "NORMAL").glob("*.jpeg"))[:3]:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "cut.jpeg").write_bytes(b"")
    first = sorted(tmp_path.glob("*.jpeg"))[1]
    (tmp_path / "trunc.jpeg").write_bytes(first.read_bytes()[:400])  # a header, then nothing: fails to decode
    rc = main(["-q", "adapt", str(tmp_path), str(tmp_path), str(first), "--model", str(tiny_model_dir),
               "--out", str(tmp_path / "p.json")])
    cap = capsys.readouterr()
    # each file once however often named; every file not used named on stderr and in the JSON; exit 1 as predict
    assert rc == 1 and "3 images (2 failed)" in cap.out and "cut.jpeg: empty file" in cap.err and "trunc.jpeg" in cap.err
    assert "WARNING: estimated from 3 images: a rough figure" in cap.out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["failed"] == 2 and {Path(e["path"]).name for e in doc["errors"]} == {"cut.jpeg", "trunc.jpeg"}


def test_adapt_leaves_out_images_the_gate_stops_and_says_how_many(tiny_model_dir, dataset_dir, tmp_path, capsys):
    import shutil

    from PIL import Image

    for f in sorted((dataset_dir / "train" / "NORMAL").glob("*.jpeg"))[:4]:
        shutil.copy(f, tmp_path / f.name)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "photo.png")  # colour noise: no chest X-ray, must not move the prior
    rc = main(["-q", "adapt", str(tmp_path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "p.json").read_text())
    assert rc == 0 and r["n"] == 4 and r["out_of_scope"] == 1 and r["failed"] == 0
    assert "4 images (0 failed, 1 out of scope and left out)" in out
    for f in tmp_path.glob("*.jpeg"):
        f.unlink()
    rc = main(["-q", "adapt", str(tmp_path), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 1 decodable images is a chest X-ray the model can read" in err and "colour" in err


def test_bbse_refuses_validation_images_without_every_class(tiny_model_dir, dataset_dir, tmp_path, capsys):
    """bbse inverts the confusion matrix of the validation split: without a class it is singular."""
    import shutil

    from synthetic import make_dataset

    other = make_dataset(tmp_path / "other", seed=5)  # images the model never saw
    shutil.rmtree(other / "train" / "PNEUMONIA")
    rc = main(["-q", "adapt", str(dataset_dir / "train" / "NORMAL"), "--model", str(tiny_model_dir), "--method", "bbse",
               "--data", str(other), "--out", str(tmp_path / "prior.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "no bacterial and no viral images" in err and "bbse needs images of every class" in err, err
    assert not (tmp_path / "prior.json").exists()


def test_a_refusal_never_names_an_option_the_command_lacks(tiny_model_dir, dataset_dir, tmp_path, capsys):
    """export --int8 and adapt told the user to pass --force, which they do not have."""
    import shutil

    shutil.copytree(dataset_dir / "train", tmp_path / "copy" / "train")  # the training images less one: another
    next((tmp_path / "copy" / "train" / "NORMAL").glob("*.jpeg")).unlink()  # manifest, overlapping the training split
    rc = main(["-q", "adapt", str(dataset_dir / "train" / "NORMAL"), "--model", str(tiny_model_dir), "--method", "bbse",
               "--data", str(tmp_path / "copy")])
    err = capsys.readouterr().err
    assert rc == 2 and "in the model's training split" in err and "--force" not in err, err
