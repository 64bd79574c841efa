"""The model card never states validation figures at a threshold the model no longer uses without saying
so: 'pneumoscan threshold --data OTHER.csv' changes the threshold but not the figures (they are measured
on the model's own split only), and the card used to present them at the old threshold, next to the other
data's name and image count, as if they described the model."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from pneumoscan.cli import main
from pneumoscan.evaluate.card import render_card
from pneumoscan.evaluate.operating_point import write_threshold
from pneumoscan.nets.modeldir import CARD_NAME, read_config


def _validation(card: str) -> str:
    return card.split("\n## Validation results\n", 1)[1].split("\n## ", 1)[0]


def _small_manifest(model_dir: Path, out: Path) -> Path:
    """Every other validation image of the model's own manifest: another manifest, none of its images trained on."""
    with open(model_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r for r in rows if r["split"] == "val"][::2])
    return out


def test_threshold_on_another_manifest_marks_the_figures_as_earlier(tiny_model_dir, tmp_path, capsys):
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    small = _small_manifest(d, tmp_path / "small.csv")
    old = read_config(d)["threshold"]
    assert main(["-q", "threshold", "--model", str(d), "--data", str(small)]) == 0  # rewrites the card too
    cfg = read_config(d)
    new, n_small = cfg["threshold"], cfg["val_data"]["n"]
    assert new != old and cfg["val_metrics"]["normal_vs_pneumonia"]["threshold"] == old  # the figures stayed
    card = (d / CARD_NAME).read_text()
    assert f"| pneumonia threshold | {new:.4f} |" in card
    v = _validation(card)
    assert (f"at the pneumonia threshold {old:.4f}. **That is an earlier threshold: the model now uses {new:.4f}**, "
            f"chosen afterwards on {n_small} images of `{small}`") in v
    assert "Validation data:" not in v and f"{n_small} images;" not in v  # the other data never heads these figures
    capsys.readouterr()
    assert main(["-q", "check", "--no-parity", "--model", str(d)]) == 0  # a true, if older, record: nothing to fail


def test_figures_are_plain_again_once_measured_at_the_current_threshold(tiny_model_dir, tmp_path):
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    cfg = read_config(d)
    vm, old = cfg["val_metrics"], cfg["threshold"]
    write_threshold(d, 0.25, "chosen by hand", record={"data": "elsewhere.csv", "n_val": 7},
                    val_data={"source": "elsewhere.csv", "manifest_sha256": "f" * 64, "n": 7, "matches_model": False})
    v = _validation(render_card(d))
    assert f"threshold {old:.4f}. **That is an earlier threshold: the model now uses 0.2500**" in v
    assert "chosen afterwards on 7 images of `elsewhere.csv`" in v and "elsewhere.csv`, manifest" not in v

    vm["normal_vs_pneumonia"]["threshold"] = 0.25  # as 'pneumoscan threshold' on the model's own split records
    write_threshold(d, 0.25, "chosen again", val_metrics=vm,
                    val_data={"source": "own.csv", "manifest_sha256": cfg["manifest_sha256"], "n": vm["n"],
                              "matches_model": True})
    v = _validation(render_card(d))
    assert "earlier threshold" not in v and "at the pneumonia threshold 0.2500." in v
    assert f"Validation data: `own.csv`, manifest `{cfg['manifest_sha256']}`, {vm['n']} images" in v
