"""Fast ONNX graphs (static padding folded into convolutions) and incremental occlusion.

Incremental occlusion must give Captum's map on the full network, to float rounding, for the
real Lite0 architecture (TensorFlow "SAME" padding, asymmetric at stride 2), for ensembles with
flip test-time augmentation and input re-normalisation, and for patch/stride settings that
leave pixels uncovered; networks it cannot split fall back to the full-network path.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from pneumoscan.data.imaging import load_xray
from pneumoscan.errors import ModelError, PneumoscanError
from pneumoscan.explain.explainer import Explainer
from pneumoscan.explain.incremental import Geometry, IncrementalOcclusion, UnsupportedNetwork, plan_axis, segment_geometry
from pneumoscan.explain.occlusion import OcclusionSensitivity
from pneumoscan.nets.backbones import create_backbone
from pneumoscan.nets.graph import StaticPadConv2d, export_fast, static_same_padding
from pneumoscan.nets.heads import Ensemble, Head, PneumoNet
from pneumoscan.predict import Predictor


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))


def _net(backbone: str = "efficientnet_lite0", seed: int = 0) -> PneumoNet:
    torch.manual_seed(seed)
    bb, _ = create_backbone(backbone, pretrained=False)
    net = PneumoNet(bb, Head(bb.num_features, 3, 0.2)).eval()
    with torch.no_grad():  # random BN statistics make a near-constant output: give the map something to show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
        net.head.fc.weight.normal_(0, 0.05)  # logits of order 1: probabilities not saturated
    return net


def _probabilities(net):
    def forward(batch):
        with torch.inference_mode():
            return net(batch).float().softmax(-1)
    return forward


def _image(size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def lite0():
    return _net()


@pytest.mark.slow
def test_static_padding_and_folded_pads_give_the_same_network(lite0):
    size = 96
    static = static_same_padding(lite0, size)
    assert any(isinstance(m, StaticPadConv2d) for m in static.modules())  # Lite0 pads "SAME" at stride 2
    assert static is not lite0 and all(not isinstance(m, StaticPadConv2d) for m in lite0.modules())
    x = _image(size)
    with torch.inference_mode():
        assert torch.allclose(static(x), lite0(x), atol=1e-6)
    data = export_fast(lite0, size, "input", "logits")
    graph = onnx.load_from_string(data)
    ops = {n.op_type for n in graph.graph.node}
    assert "Pad" not in ops and "Conv" in ops  # every pad folded into its convolution
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(got - lite0(x).numpy()).max() < 1e-4


def test_segment_geometry_of_a_known_chain():
    chain = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 5, 1, 2), nn.Conv2d(4, 4, 1))
    g = segment_geometry(chain, torch.zeros(1, 3, 32, 32))
    # reach: 3, then + (5 - 1) * 2 = 11; offset: 1 + 2 * 2 = 5; stride 2
    assert g == Geometry(stride=2, reach=11, offset=5)


def test_plan_keeps_every_output_the_patch_reaches():
    g = Geometry(stride=4, reach=19, offset=6)
    size, patch = 224, 16
    pos = np.arange(0, size - patch + 1, 8)
    plan = plan_axis(size, np.stack([pos, pos + patch], 1), g)
    first = np.arange(size // 4) * 4 - 6
    for i, p in enumerate(pos):
        reached = np.nonzero((first < p + patch) & (first + 19 > p))[0]
        kept = np.arange(*plan.next_window()[i])
        assert np.array_equal(reached, kept)
        c = plan.starts[i]
        assert c % 4 == 0 and 0 <= c and c + plan.crop <= size  # on the grid, inside the image
        assert first[reached[0]] >= c or c == 0  # every kept field lies inside the crop (or the edge)
        assert first[reached[-1]] + 19 <= c + plan.crop or c + plan.crop == size


@pytest.mark.slow
@pytest.mark.parametrize("size,patch,stride", [(96, 16, 8), (96, 12, 5), (64, 20, 20)])
def test_incremental_occlusion_equals_captum_on_lite0(lite0, size, patch, stride):
    inc = IncrementalOcclusion(lite0, size, patch, stride, batch_size=32)
    x = _image(size)
    with torch.inference_mode():
        target = int(lite0(x).argmax())
    want = OcclusionSensitivity(patch, stride, 64)(_probabilities(lite0), x, target)
    got = inc(x, target)
    assert got.shape == (size, size) and np.isfinite(got).all()
    assert np.abs(want).max() > 1e-4  # a map with something in it
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.slow
def test_incremental_occlusion_of_an_ensemble_with_flip_and_renormalisation():
    members = [_net(seed=0), _net(seed=1)]
    ens = Ensemble(members, tta="flip", input_affine=[None, ([2.0, 2.0, 2.0], [0.1, -0.2, 0.3])]).eval()
    size = 64
    inc = IncrementalOcclusion(ens, size, 16, 8)
    assert len(inc.views) == 4  # two members, each also flipped
    x = _image(size, seed=3)
    want = OcclusionSensitivity(16, 8)(_probabilities(ens), x, 2)
    assert np.abs(inc(x, 2) - want).max() < 1e-5


@pytest.mark.slow
def test_unsupported_networks_are_refused_and_explainer_falls_back(tiny_model_dir, tmp_path):
    class Plain(nn.Module):  # not an EfficientNet: no stages to split
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    with pytest.raises(UnsupportedNetwork):
        IncrementalOcclusion(Plain(), 32)
    bb = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)  # squeeze-excite pools early
    with pytest.raises(UnsupportedNetwork, match="squeeze-excite"):
        IncrementalOcclusion(PneumoNet(bb, Head(bb.num_features)).eval(), 64)

    pred = Predictor(tiny_model_dir)
    png = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70), dtype=np.uint8)).save(png)
    x = load_xray(png)
    inc = Explainer(pred, engine="incremental")
    assert inc.incremental() is not None  # the tiny test EfficientNet splits
    a = inc(x, ("occlusion",))[0].heatmap
    b = Explainer(pred, engine="onnx")(x, ("occlusion",))[0].heatmap
    assert np.abs(a - b).max() < 1e-5
    forced = Explainer(pred, engine="incremental")
    forced._incremental = None
    forced.net = Plain()
    with pytest.raises(ModelError, match="incremental occlusion"):
        forced.incremental()
    auto = Explainer(pred, engine="auto")
    auto.net = Plain()
    assert auto.incremental() is None  # auto: the full-network path instead


@pytest.mark.slow
def test_incremental_occlusion_rejects_bad_input(lite0):
    inc = IncrementalOcclusion(lite0, 64, 16, 8, check=False)
    with pytest.raises(PneumoscanError, match="shape"):
        inc(torch.zeros(1, 3, 32, 32), 0)
    with pytest.raises(PneumoscanError, match="NaN"):
        inc(torch.full((1, 3, 64, 64), float("nan")), 0)
    with pytest.raises(PneumoscanError, match="larger than the model input"):
        IncrementalOcclusion(lite0, 64, 80, 8)


@pytest.mark.slow
def test_lanes_split_the_copies_without_changing_the_map(lite0):
    x = _image(64, seed=5)
    one = IncrementalOcclusion(lite0, 64, 16, 8, batch_size=8, lanes=1, check=False)
    three = IncrementalOcclusion(lite0, 64, 16, 8, batch_size=8, lanes=3, check=False)
    assert one.n_lanes == 1 and three.n_lanes == 3 and len(three.views[0][0].lanes) == 3
    assert np.array_equal(one(x, 1), three(x, 1))
