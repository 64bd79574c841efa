"""Ensembles of tiny trained models: averaging, flip TTA, in-graph renormalisation, refusals, ONNX."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pneumoscan.cli import main
from pneumoscan.data.imaging import load_xray
from pneumoscan.data.manifest import Manifest
from pneumoscan.data.splits import validation_set
from pneumoscan.errors import ModelError
from pneumoscan.evaluate.config import ThresholdConfig
from pneumoscan.evaluate.operating_point import retune, score
from pneumoscan.features.config import ExtractConfig
from pneumoscan.metrics import choose_threshold
from pneumoscan.predict import Predictor
from pneumoscan.train.ensemble import build_ensemble


@pytest.fixture(scope="module")
def second_model_dir(tiny_model_dir, tmp_path_factory):
    """A second tiny model, another seed, trained on the same manifest (so the same split)."""
    from pneumoscan.train.config import TrainConfig
    from pneumoscan.train.head import train

    out = tmp_path_factory.mktemp("model2") / "tiny2"
    cfg = TrainConfig(backbone="test_efficientnet", size=64, pretrained=False, max_epochs=8, patience=4,
                      lr=1e-2, seed=1)
    return train(Manifest.load(tiny_model_dir / "manifest.csv"), out, cfg,
                 extract=ExtractConfig(cache=str(tmp_path_factory.mktemp("cache2")), workers=0), progress=False, command="pytest")


@pytest.fixture(scope="module")
def ens_dir(tiny_model_dir, second_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ens"
    rc = main(["-q", "ensemble", str(tiny_model_dir), str(second_model_dir), "--out", str(out)])
    assert rc == 0
    return out


def _batch(n: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (n, 3, size, size)).astype(np.float32))


@pytest.mark.slow
def test_ensemble_predicts_mean_of_members(ens_dir, tiny_model_dir, second_model_dir):
    x = _batch()
    p_a = Predictor(tiny_model_dir).probabilities(x)
    p_b = Predictor(second_model_dir).probabilities(x)
    assert not np.allclose(p_a, p_b, atol=1e-3)  # the seeds really give two models
    np.testing.assert_allclose(Predictor(ens_dir).probabilities(x), (p_a + p_b) / 2, atol=1e-5)


def test_ensemble_directory_format(ens_dir, tiny_model_dir, second_model_dir):
    cfg = json.loads((ens_dir / "config.json").read_text())
    members = [json.loads((d / "config.json").read_text()) for d in (tiny_model_dir, second_model_dir)]
    assert cfg["kind"] == "ensemble" and cfg["tta"] == "none" and len(cfg["members"]) == 2
    assert [m["model_id"] for m in cfg["members"]] == [m["model_id"] for m in members]
    assert cfg["manifest_sha256"] == members[0]["manifest_sha256"]
    assert (ens_dir / "manifest.csv").is_file() and (ens_dir / "MODEL_CARD.md").is_file()
    with safe_open(str(ens_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("members.0.", "members.1.")) for k in keys)
    assert {k.split(".")[1] for k in keys} == {"0", "1"}


def test_ensemble_threshold_rechosen_on_val(ens_dir):
    cfg = json.loads((ens_dir / "config.json").read_text())
    assert "Youden" in cfg["threshold_method"] and cfg["val_data"]["matches_model"]
    ev = validation_set(None, cfg, ens_dir)
    assert ev.split == "val" and len(ev) == cfg["val_data"]["n"]
    y, probs = score(Predictor(ens_dir), ev)
    assert cfg["threshold"] == pytest.approx(choose_threshold(y, probs, "youden")[0])


@pytest.mark.slow
def test_ensemble_works_with_evaluate_and_predict(ens_dir, dataset_dir, tmp_path, capsys):
    assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(ens_dir), "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n"] == 48 and m["model"]["id"].startswith("ensemble-")
    img = next((dataset_dir / "train" / "NORMAL").iterdir())
    capsys.readouterr()
    assert main(["predict", "--json", "--model", str(ens_dir), str(img)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predictions"][0]["label"] in ("normal", "bacterial", "viral")


@pytest.fixture(scope="module")
def flip_dir(tiny_model_dir, tmp_path_factory):
    """One model with test-time flip: an ensemble of one."""
    return build_ensemble([tiny_model_dir], tmp_path_factory.mktemp("tta") / "tta", tta="flip")


def test_flip_tta_averages_the_mirror_image(flip_dir, tiny_model_dir):
    out = flip_dir
    x = _batch(seed=1)
    single = Predictor(tiny_model_dir)
    expected = (single.probabilities(x) + single.probabilities(x.flip(-1))) / 2
    np.testing.assert_allclose(Predictor(out).probabilities(x), expected, atol=1e-5)


def test_member_with_other_normalisation_is_mapped_in_graph(tiny_model_dir, dataset_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["preprocess"]["mean"], cfg["preprocess"]["std"] = [0.5, 0.5, 0.5], [0.25, 0.3, 0.2]
    (other / "config.json").write_text(json.dumps(cfg))
    out = build_ensemble([tiny_model_dir, other], tmp_path / "mixed")
    x = load_xray(next((dataset_dir / "train" / "PNEUMONIA").iterdir()))
    p_each = [np.array(list(Predictor(d).predict_xray(x).probabilities.values())) for d in (tiny_model_dir, other)]
    p_ens = np.array(list(Predictor(out).predict_xray(x).probabilities.values()))
    np.testing.assert_allclose(p_ens, np.mean(p_each, axis=0), atol=1e-5)


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if key in ("size", "intensity"):
            cfg["preprocess"][key] = value
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refuses_members_with_other_intensity_and_soups_of_other_sizes(tiny_model_dir, tmp_path, capsys):
    """Sizes may differ in an ensemble (resized in the graph), never the intensity normalisation; a
    soup averages weights, so its members must share the input size too."""
    clahe = _edited_copy(tiny_model_dir, tmp_path / "clahe", intensity="clahe")
    rc = main(["-q", "ensemble", str(tiny_model_dir), str(clahe), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "intensity normalisation" in err and str(clahe) in err
    big = _edited_copy(tiny_model_dir, tmp_path / "big", size=96)
    rc = main(["-q", "soup", str(tiny_model_dir), str(big), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "input size" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_refuses_mixed_manifests_unless_forced(tiny_model_dir, second_model_dir, dataset_dir, tmp_path):
    other = _edited_copy(second_model_dir, tmp_path / "elsewhere", manifest_sha256="0" * 64)
    with pytest.raises(ModelError, match="different manifests"):
        build_ensemble([tiny_model_dir, other], tmp_path / "e")
    assert not (tmp_path / "e").exists()
    out = build_ensemble([tiny_model_dir, other], tmp_path / "e", force=True)
    retune(out, tiny_model_dir / "manifest.csv", ThresholdConfig(force=True))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["manifest_sha256"] is None and not (out / "manifest.csv").exists()
    assert "Youden" in cfg["threshold_method"]


def test_refuses_bad_requests(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="two or more"):
        build_ensemble([tiny_model_dir], tmp_path / "one")
    with pytest.raises(ModelError, match="one of the members"):
        build_ensemble([tiny_model_dir, tiny_model_dir.parent], tiny_model_dir)
    with pytest.raises(ModelError, match="given twice"):
        build_ensemble([tiny_model_dir, tiny_model_dir], tmp_path / "twice")


@pytest.mark.slow
def test_flip_tta_exports_to_onnx(flip_dir):
    from pneumoscan.export.onnx import export_onnx

    out = flip_dir
    export_onnx(out)
    x = _batch(seed=2)
    np.testing.assert_allclose(Predictor(out, backend="onnx").probabilities(x.numpy()),
                               Predictor(out).probabilities(x), atol=1e-4)


@pytest.mark.slow
def test_a_lower_resolution_member_is_resized_inside_the_graph(tiny_model_dir, tmp_path_factory, tmp_path):
    """A 48-px member beside a 64-px one: the ensemble takes 64 px and resizes for the small member;
    predictions, ONNX export and Grad-CAM all work at the ensemble's input size."""
    import torch

    from pneumoscan.explain.gradcam import GradCAM
    from pneumoscan.export.onnx import export_onnx
    from pneumoscan.nets.checkpoint import load_model
    from pneumoscan.train.config import TrainConfig
    from pneumoscan.train.head import train

    small = train(Manifest.load(tiny_model_dir / "manifest.csv"), tmp_path / "small",
                  TrainConfig(backbone="test_efficientnet", size=48, pretrained=False, max_epochs=4, lr=1e-2),
                  extract=ExtractConfig(cache=str(tmp_path / "c"), workers=0), progress=False, command="pytest")
    out = build_ensemble([tiny_model_dir, small], tmp_path / "mixed-res")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preprocess"]["size"] == 64
    ens = load_model(out).net
    assert [v.size for v in ens.views()] == [None, 48]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        small_net = load_model(small).net
        ref = (load_model(tiny_model_dir).net(x).softmax(-1) + small_net(torch.nn.functional.interpolate(
            x, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)).softmax(-1)) / 2
        torch.testing.assert_close(ens(x).exp(), ref, atol=1e-6, rtol=1e-5)
    export_onnx(out)  # the parity check inside must pass with the resize in the graph
    cam = GradCAM()(ens, x[:1], 1)
    assert cam.shape == (64, 64) and np.isfinite(cam).all()


def test_build_soup_refuses_weights_by_the_cli_s_rules(tiny_model_dir, tmp_path):
    """The Python API and --coefficients share one check (EnsembleConfig): negative, all 0, or the wrong count."""
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.train.ensemble import build_soup

    a, b = (shutil.copytree(tiny_model_dir, tmp_path / n) for n in ("a", "b"))
    for w, needle in (([1, -1], "non-negative"), ([0, 0], "not all 0"), ([1, 1, 1], "3 numbers for 2 models")):
        with pytest.raises(PneumoscanError, match=needle):
            build_soup([a, b], tmp_path / "soup", coefficients=w)
    assert not (tmp_path / "soup").exists() or not any((tmp_path / "soup").iterdir())
