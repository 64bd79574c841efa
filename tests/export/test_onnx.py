"""ONNX export: one graph with a dynamic batch, parity with PyTorch, integrity, atomic writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.errors import ModelError
from pneumoscan.export.config import MAX_PROB_DIFF
from pneumoscan.export.onnx import export_onnx, parity, sample_inputs
from pneumoscan.io import file_digest as sha256_file
from pneumoscan.nets.checkpoint import load_model
from pneumoscan.nets.modeldir import has_onnx
from pneumoscan.predict import Predictor


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("onnx", None)
    cfg["files"].pop("model.onnx", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model exported through the CLI."""
    d = copy_model(tiny_model_dir, tmp_path_factory.mktemp("export") / "tiny")
    assert main(["-q", "export", "--model", str(d)]) == 0
    return d


@pytest.mark.slow
def test_export_writes_graph_and_config(exported):
    import onnx

    cfg = json.loads((exported / "config.json").read_text())
    onnx_cfg = cfg["onnx"]
    assert onnx_cfg["file"] == "model.onnx" and onnx_cfg["opset"] >= 17
    assert cfg["files"]["model.onnx"] == sha256_file(exported / "model.onnx")
    assert cfg["files"]["model.safetensors"] == sha256_file(exported / "model.safetensors")  # kept
    assert onnx_cfg["parity"]["passed"] and onnx_cfg["parity"]["max_abs_prob_diff"] <= MAX_PROB_DIFF
    model = onnx.load(str(exported / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output][0] == "logits"
    assert not list(exported.glob("*.tmp")) and not list(exported.glob("*.data"))
    assert has_onnx(exported)


def test_dynamic_batch(exported):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, 7):
        out = sess.run(["logits"], {"input": sample_inputs(64, n)})[0]
        assert out.shape == (n, 3)


def test_onnx_predictor_matches_torch_on_images(exported, dataset_dir):
    files = sorted(str(p) for p in dataset_dir.rglob("*.jpeg"))[:12]
    torch_preds, _ = Predictor(exported, backend="torch").predict_files(files)
    onnx_preds, _ = Predictor(exported, backend="onnx").predict_files(files)
    for a, b in zip(torch_preds, onnx_preds):
        assert a.label == b.label and a.pneumonia == b.pneumonia
        diff = max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)
        assert diff <= MAX_PROB_DIFF, (a.path, diff)


def test_parity_check_detects_a_different_graph(exported, tiny_model_dir):
    """The check is not vacuous: a net whose head changed no longer matches the exported graph."""
    import torch

    net = load_model(tiny_model_dir).net
    with torch.no_grad():
        net.head.fc.bias += torch.tensor([3.0, -3.0, 0.0])
    res = parity(net, exported / "model.onnx", 64)
    assert not res["passed"] and res["max_abs_prob_diff"] > MAX_PROB_DIFF


@pytest.mark.slow
def test_ensemble_export_parity(tiny_model_dir, tmp_path):
    from pneumoscan.train.ensemble import build_ensemble

    a = copy_model(tiny_model_dir, tmp_path / "a")
    b = copy_model(tiny_model_dir, tmp_path / "b")
    for m in (a, b):  # no shared manifest: the threshold is not re-chosen (not what is tested here)
        (m / "manifest.csv").unlink(missing_ok=True)
    ens = build_ensemble([a, b], tmp_path / "ens", tta="flip")
    export_onnx(ens)
    cfg = json.loads((ens / "config.json").read_text())
    assert cfg["kind"] == "ensemble" and cfg["onnx"]["parity"]["passed"]
    x = sample_inputs(64, 4, seed=3)
    p_onnx = Predictor(ens, backend="onnx").probabilities(x)
    p_torch = Predictor(ens, backend="torch").probabilities(x)
    assert np.abs(p_onnx - p_torch).max() <= MAX_PROB_DIFF
    assert (p_onnx.argmax(1) == p_torch.argmax(1)).all()


def test_tampered_onnx_refused(exported, tmp_path):
    d = shutil.copytree(exported, tmp_path / "m")
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="integrity check"):
        Predictor(d, backend="onnx")


def test_tampered_weights_refused_and_nothing_written(exported, tmp_path, capsys):
    d = copy_model(exported, tmp_path / "m")
    before = (d / "config.json").read_bytes()
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    assert main(["-q", "export", "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pneumoscan: error: ") and "integrity check" in err and len(err.strip().splitlines()) == 1
    assert not (d / "model.onnx").exists() and (d / "config.json").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in exported.iterdir() if p.name != "model.onnx")


def test_export_missing_model_dir(tmp_path, capsys):
    assert main(["-q", "export", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_onnx_backend_without_export_says_what_to_do(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    with pytest.raises(ModelError, match="pneumoscan export"):
        Predictor(d, backend="onnx")


# -- #13: the Grad-CAM and pooled-features outputs ------------------------------------------------------

def _gradcam_matches(model: Path, size: int, n: int = 3) -> float:
    """Max |ONNX cam - Captum Grad-CAM| over n images x every class, each map scaled to max 1."""
    import torch

    from pneumoscan.explain.gradcam import GradCAM
    from pneumoscan.runtime import ort_session

    net = load_model(model).net.eval()
    x = sample_inputs(size, n, seed=5)
    cam = ort_session(model / "model.onnx").run(["cam"], {"input": x})[0]
    worst = 0.0
    for i in range(n):
        for k in range(cam.shape[1]):
            ref = GradCAM()(net, torch.from_numpy(x[i:i + 1]), k)
            worst = max(worst, float(np.abs(ref / max(ref.max(), 1e-12) - cam[i, k] / max(cam[i, k].max(), 1e-12)).max()))
    return worst


@pytest.mark.slow
def test_export_outputs_logits_features_and_cam(exported):
    import torch

    from pneumoscan.runtime import ort_session

    sess = ort_session(exported / "model.onnx")
    assert [o.name for o in sess.get_outputs()] == ["logits", "features", "cam"]  # logits stays output 0
    cfg = json.loads((exported / "config.json").read_text())["onnx"]
    assert cfg["outputs"] == ["logits", "features", "cam"] and cfg["cam"]["parity"]["passed"] and cfg["parity"]["passed"]
    net = load_model(exported).net.eval()
    x = sample_inputs(64, 2, seed=7)
    _, feats, cam = sess.run(None, {"input": x})
    with torch.inference_mode():
        pooled = net.backbone(torch.from_numpy(x)).numpy()
    assert feats.shape == pooled.shape and np.abs(feats - pooled).max() < 1e-4
    assert cfg["features"]["members"] == [[0, pooled.shape[1]]]
    assert cam.shape == (2, 3, 64, 64) and cam.min() >= 0


@pytest.mark.slow
def test_onnx_cam_equals_torch_gradcam(exported):
    assert _gradcam_matches(exported, 64) < 1e-4


@pytest.mark.slow
def test_ensemble_cam_equals_torch_gradcam_with_flip_tta(tiny_model_dir, tmp_path):
    from pneumoscan.train.ensemble import build_ensemble

    a = copy_model(tiny_model_dir, tmp_path / "a")
    b = copy_model(tiny_model_dir, tmp_path / "b")
    for m in (a, b):
        (m / "manifest.csv").unlink(missing_ok=True)
    ens = build_ensemble([a, b], tmp_path / "ens", tta="flip")
    export_onnx(ens)
    cfg = json.loads((ens / "config.json").read_text())["onnx"]
    width = cfg["features"]["members"][0][1]
    assert cfg["features"]["members"] == [[0, width], [width, 2 * width]]  # per member, side by side
    assert _gradcam_matches(ens, 64) < 1e-4
