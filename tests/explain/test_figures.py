"""Filter and activation grids, heat-map overlays and the visualize command."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError
from pneumoscan.explain.explainer import Explanation
from pneumoscan.explain.figures import display_pair, grid_figure, overlay_png
from pneumoscan.explain.inspect import activations, default_layer, feature_layers, filters_figure, first_conv, resolve_layer
from pneumoscan.nets.backbones import build_architecture
from pneumoscan.nets.heads import Head, PneumoNet
from pneumoscan.plots import save_figure


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    bb = build_architecture("test_efficientnet")
    return PneumoNet(bb, Head(bb.num_features, 3)).eval()


@pytest.fixture(scope="module")
def xray_png(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8)).save(path)
    return path


def test_first_conv_and_default_layer(net):
    name, conv = first_conv(net.backbone)
    assert name == "conv_stem" and conv.in_channels == 3
    layers = feature_layers(net, 64)
    names = [n for n, _ in layers]
    assert names[0] == "conv_stem" and "bn2" in names
    assert default_layer(layers) == "bn1"  # the stem's activations
    assert dict(layers)["bn1"] == (conv.out_channels, 32, 32)


def test_resnet_default_layer_is_the_stem_activation():
    bb = build_architecture("resnet50")
    assert default_layer(feature_layers(bb, 64)) == "act1"


def test_bad_layer_lists_valid_names(net):
    with pytest.raises(PneumoscanError, match=r"'nope'.*valid names.*conv_stem, .*bn1"):
        resolve_layer(net, 64, "nope")
    assert resolve_layer(net, 64, "backbone.blocks.0")[0] == "blocks.0"


def test_activations_shape_matches_the_layer(net):
    act = activations(net, torch.randn(1, 3, 64, 64), "blocks.1")
    assert act.shape == dict(feature_layers(net, 64))["blocks.1"] and np.isfinite(act).all()


def test_filters_figure_saved_atomically(net, tmp_path):
    path = save_figure(filters_figure(net), tmp_path / "f.png")
    assert Image.open(path).format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def _explanation(method: str, side: int = 64) -> Explanation:
    heat = np.zeros((side, side), np.float32)
    heat[8:16, 40:56] = 1.0 if method == "gradcam" else -0.3
    return Explanation(method, heat, 1, "bacterial", {"normal": 0.1, "bacterial": 0.7, "viral": 0.2})


def test_display_pair_restores_the_aspect():
    gray = np.zeros((1000, 600), np.uint8)
    img, hm = display_pair(gray, np.ones((64, 64), np.float32))
    assert img.shape == hm.shape == (512, 307)


@pytest.mark.parametrize("method", ["occlusion", "gradcam"])
def test_overlay_and_grid_render(method, tmp_path):
    import io

    gray = (np.random.default_rng(0).random((120, 100)) * 255).astype(np.uint8)
    png = overlay_png(gray, _explanation(method))
    assert Image.open(io.BytesIO(png)).format == "PNG"
    items = [(f"img{i}.png", gray, _explanation(method)) for i in range(5)]
    path = save_figure(grid_figure(items, "m"), tmp_path / "g.png")
    assert Image.open(path).size[0] > 400
    with pytest.raises(PneumoscanError):
        grid_figure([])


@pytest.mark.slow
def test_cli_visualize(tiny_model_dir, xray_png, tmp_path, capsys):
    f = tmp_path / "filters.png"
    assert main(["-q", "visualize", "filters", "--model", str(tiny_model_dir), "--out", str(f)]) == 0
    assert Image.open(f).format == "PNG"
    a = tmp_path / "act.png"
    assert main(["-q", "visualize", "activations", str(xray_png), "--model", str(tiny_model_dir),
                 "--out", str(a)]) == 0
    assert Image.open(a).format == "PNG" and "bn1" in capsys.readouterr().out
    assert main(["-q", "visualize", "activations", str(xray_png), "--layer", "blocks.9",
                 "--model", str(tiny_model_dir), "--out", str(a)]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["-q", "visualize", "activations", str(tmp_path / "none.png"), "--model", str(tiny_model_dir),
                 "--out", str(a)]) == 2
    assert main(["-q", "visualize", "filters", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["-q", "visualize", "layers", "--model", str(tiny_model_dir)]) == 0
    assert "(default)" in capsys.readouterr().out
