"""Heat maps: known-answer tests (a model that looks at one corner), every backbone, the CLI."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pneumoscan.cli import main
from pneumoscan.data.imaging import load_xray
from pneumoscan.errors import PneumoscanError
from pneumoscan.explain.explainer import CENTRAL_REGION, Explainer, central_share
from pneumoscan.explain.figures import explain_overlay_png
from pneumoscan.explain.gradcam import GradCAM
from pneumoscan.explain.occlusion import OcclusionSensitivity
from pneumoscan.nets.backbones import build_architecture, gradcam_layer
from pneumoscan.nets.heads import Ensemble, Head, PneumoNet, eval_mode
from pneumoscan.nets.registry import list_backbones
from pneumoscan.predict import Predictor

SIDE = 32
CORNERS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


class CornerBackbone(nn.Module):
    """Responds to bright 4x4 cells (mean > 1 in normalised units), but only in one corner quadrant."""

    def __init__(self, corner: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, kernel_size=4, stride=4)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 48)  # mean over the 3 x 4 x 4 window
            self.conv.bias.fill_(-1.0)  # threshold: background noise never passes it
        self.act = nn.ReLU()
        mask = torch.zeros(1, 1, SIDE // 4, SIDE // 4)
        r, c = corner
        h = SIDE // 8
        mask[..., r * h:(r + 1) * h, c * h:(c + 1) * h] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.act(self.conv(x)) * self.mask).sum((2, 3))  # (N, 1)


def corner_model(corner: tuple[int, int]) -> PneumoNet:
    head = Head(1, 2, dropout=0.5)  # dropout must be off during explanation (eval mode)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[0.0], [1.0]]))
        head.fc.bias.zero_()
    return PneumoNet(CornerBackbone(corner), head).eval()


def square_image(corner: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Normalised (1, 3, 32, 32) noise with a bright 8x8 square in ``corner``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, SIDE, SIDE, generator=g) * 0.3
    r, c = corner
    y0, x0 = (2 if r == 0 else SIDE - 10), (2 if c == 0 else SIDE - 10)
    x[..., y0:y0 + 8, x0:x0 + 8] = 3.0
    return x.expand(1, 3, SIDE, SIDE).contiguous()


def peak_quadrant(heat: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    return int(y >= heat.shape[0] // 2), int(x >= heat.shape[1] // 2)


def probs(net):
    return lambda b: net(b).softmax(-1)


@pytest.mark.parametrize("name", list(CORNERS))
def test_corner_model_reacts_only_to_its_corner(name):
    corner = CORNERS[name]
    net = corner_model(corner)
    opposite = (1 - corner[0], 1 - corner[1])
    with torch.no_grad():
        assert probs(net)(square_image(corner))[0, 1] > 0.95
        assert probs(net)(square_image(opposite))[0, 1] == pytest.approx(0.5)


@pytest.mark.parametrize("name", list(CORNERS))
def test_occlusion_peaks_in_the_corner(name):
    corner = CORNERS[name]
    net = corner_model(corner)
    heat = OcclusionSensitivity(patch=8, stride=4, batch_size=16)(probs(net), square_image(corner), target=1)
    assert heat.shape == (SIDE, SIDE) and np.isfinite(heat).all()
    assert peak_quadrant(heat) == corner
    assert heat.max() > 0.1  # hiding the square costs probability
    far = heat[(1 - corner[0]) * 16:(2 - corner[0]) * 16, (1 - corner[1]) * 16:(2 - corner[1]) * 16]
    assert np.abs(far).max() < 1e-6  # the opposite quadrant does not matter at all


@pytest.mark.parametrize("name", list(CORNERS))
def test_gradcam_peaks_in_the_corner(name):
    corner = CORNERS[name]
    net = corner_model(corner)
    heat = GradCAM(layer=lambda bb: bb.act)(net, square_image(corner), target=1)
    assert heat.shape == (SIDE, SIDE) and np.isfinite(heat).all() and (heat >= 0).all()
    assert peak_quadrant(heat) == corner
    r, c = corner  # all of the map's mass lies in the corner's quadrant, for every corner
    assert central_share(heat, (0.5 * c, 0.5 * c + 0.5, 0.5 * r, 0.5 * r + 0.5)) == pytest.approx(1.0)


def test_occlusion_counts_copies_and_fills_with_the_image_mean():
    seen = []

    def forward(b):
        seen.append(b.clone())
        return torch.stack([b.mean((1, 2, 3)), -b.mean((1, 2, 3))], 1).softmax(-1)

    x = square_image((0, 0))
    occ = OcclusionSensitivity(patch=16, stride=8, batch_size=5)
    occ(forward, x, target=0)
    batch = torch.cat(seen)
    assert occ.n_copies(SIDE) == 9
    assert len(batch) == 1 + 9  # the unoccluded input, then every occluded copy
    assert max(len(b) for b in seen) <= 5
    first = batch[1]  # top-left patch occluded with the per-channel image mean
    assert torch.allclose(first[:, :16, :16], x.mean((2, 3)).view(3, 1, 1).expand(3, 16, 16))
    assert torch.equal(first[:, 16:, :], x[0, :, 16:, :])


@pytest.mark.parametrize("kwargs", [dict(patch=0), dict(stride=-1), dict(patch=8, stride=16), dict(batch_size=0)])
def test_occlusion_rejects_bad_settings(kwargs):
    with pytest.raises(PneumoscanError):
        OcclusionSensitivity(**kwargs)


def test_explainers_validate_inputs_early():
    net = corner_model((0, 0))
    with pytest.raises(PneumoscanError, match="shape"):
        GradCAM(layer=lambda bb: bb.act)(net, torch.zeros(2, 3, SIDE, SIDE), 1)
    with pytest.raises(PneumoscanError, match="NaN"):
        OcclusionSensitivity(8, 4)(probs(net), torch.full((3, SIDE, SIDE), float("nan")), 1)
    with pytest.raises(PneumoscanError, match="larger than the model input"):
        OcclusionSensitivity(64, 8)(probs(net), square_image((0, 0)), 1)
    with pytest.raises(PneumoscanError, match="target"):
        GradCAM(layer=lambda bb: bb.act)(net, square_image((0, 0)), -1)


def test_gradcam_restores_mode_and_works_with_frozen_weights():
    net = corner_model((0, 0)).train()
    net.backbone.eval()  # a mixed state must come back exactly
    for p in net.parameters():
        p.requires_grad_(False)  # frozen backbone + head
    cam = GradCAM(layer=lambda bb: bb.act)
    a = cam(net, square_image((0, 0)), 1)
    b = cam(net, square_image((0, 0)), 1)
    assert np.array_equal(a, b) and a.max() > 0  # dropout was off, gradients flowed
    assert net.training and net.head.training and not net.backbone.training
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.head.dropout.training


def test_central_share_known_values():
    assert central_share(np.ones((100, 100))) == pytest.approx(0.6 * 0.7)
    corner = np.zeros((100, 100))
    corner[:10, :10] = 1
    assert central_share(corner) == 0.0
    centre = np.zeros((100, 100))
    centre[45:55, 45:55] = 1
    assert central_share(centre) == 1.0
    assert np.isnan(central_share(np.zeros((10, 10))))
    assert np.isnan(central_share(-np.ones((10, 10))))  # only positive evidence counts
    left, right, top, bottom = CENTRAL_REGION
    assert (right - left, bottom - top) == pytest.approx((0.6, 0.7))


# ---- every registered backbone ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_gives_finite_maps(name):
    torch.manual_seed(0)
    backbone = build_architecture(name)  # architecture only, random weights: never a download
    size = 80 if "inception" in name else 64  # small inputs keep the suite fast (Inceptions need >= 75)
    dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features  # VGG pools 4096 pre-logits
    net = PneumoNet(backbone, Head(dim, 3)).eval()
    x = torch.randn(1, 3, size, size) * 0.5
    layer = gradcam_layer(backbone)
    shapes = []
    h = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    heat = GradCAM()(net, x, target=2)
    h.remove()
    assert len(shapes[0]) == 4 and shapes[0][0] == 1  # a spatial feature map, one image
    assert heat.shape == (size, size) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and (heat >= 0).all()
    if name == "test_efficientnet":  # occlusion does not depend on the architecture: one check is enough
        occ = OcclusionSensitivity(patch=32, stride=32, batch_size=5)(lambda b: net(b).softmax(-1), x, 2)
        assert occ.shape == (size, size) and np.isfinite(occ).all()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "test_efficientnet"])
def test_efficientnet_gradcam_layer_is_the_last_conv(name):
    bb = build_architecture(name)
    assert gradcam_layer(bb) is bb.bn2  # conv_head + norm/act: what the classifier pools


# ---- a real (tiny) model directory through Predictor and the CLI ----------------------------


def _save(arr: np.ndarray, path, **kw):
    Image.fromarray(arr).save(path, **kw)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Inputs of every supported kind: RGB JPEG, 16-bit non-square PNG, DICOM, and a broken file."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("imgs")
    out = {"rgb_jpeg": _save(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8), d / "a.jpeg"),
           "png16": _save((rng.random((150, 90)) * 65535).astype(np.uint16), d / "b.png")}
    out["dicom"] = _dicom(d / "c.dcm", (rng.random((70, 70)) * 4000).astype(np.uint16))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out["broken"] = d / "broken.png"
    return out


def _dicom(path, arr):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_explainer_torch_and_onnx_engines_agree(tiny_model_dir, images):
    pred = Predictor(tiny_model_dir)
    x = load_xray(images["png16"])
    by_engine = {e: Explainer(pred, patch=16, stride=8, engine=e)(x, ("occlusion",))[0] for e in ("torch", "onnx")}
    a, b = by_engine["torch"], by_engine["onnx"]
    assert a.heatmap.shape == (64, 64) and a.label == pred.predict_xray(x).predicted  # the decision, gate or not
    assert np.allclose(a.heatmap, b.heatmap, atol=1e-4)
    assert not pred.net.training and all(p.is_contiguous() for p in pred.net.parameters())  # predictor untouched


def test_explain_overlay_png_for_the_web(tiny_model_dir, images):
    pred = Predictor(tiny_model_dir)
    x = load_xray(images["dicom"])
    for method in ("gradcam", "occlusion"):
        png = explain_overlay_png(pred, x, method)
        im = Image.open(io.BytesIO(png))
        assert im.format == "PNG" and im.width > 200
    with pytest.raises(PneumoscanError, match="unknown"):
        explain_overlay_png(pred, x, "saliency")
    with pytest.raises(PneumoscanError):
        explain_overlay_png(pred, x.pixels)  # not an XRay


def test_ensemble_gradcam_averages_members(tiny_model_dir):
    from pneumoscan.nets.checkpoint import load_model

    member = load_model(tiny_model_dir).net
    x = torch.randn(1, 3, 64, 64)
    single = GradCAM()(member, x, 1)
    ens = GradCAM()(Ensemble([member, member]), x, 1)
    assert ens.shape == (64, 64) and np.isfinite(ens).all()
    if single.max() > 0:
        assert np.allclose(ens, single / single.max(), atol=1e-6)
    flip = GradCAM()(Ensemble([member], tta="flip"), x, 1)
    assert flip.shape == (64, 64) and np.isfinite(flip).all() and flip.max() <= 1 + 1e-6


@pytest.mark.slow
def test_cli_explain_writes_maps_summary_and_grid(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "explain", str(images["rgb_jpeg"]), str(images["png16"]), str(images["dicom"]),
               "--model", str(tiny_model_dir), "--out", str(out), "--grid", "--patch", "16", "--stride", "8",
               "--engine", "torch"])
    assert rc == 3, capsys.readouterr().err  # mapped, but each of these noise images is out of scope
    for stem in ("a", "b", "c"):
        for method in ("occlusion", "gradcam"):
            assert Image.open(out / f"{stem}.{method}.png").format == "PNG"
            heat = np.load(out / f"{stem}.{method}.npy")
            assert heat.shape == (64, 64) and np.isfinite(heat).all()
    rows = list(csv.DictReader(open(out / "explain.csv")))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"occlusion", "gradcam"}
    summary = json.loads((out / "explain.json").read_text())
    assert summary["central_region"]["left"] == CENTRAL_REGION[0] and len(summary["maps"]) == 6
    assert (out / "grid.occlusion.png").is_file() and (out / "grid.gradcam.png").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cli_explain_never_shows_a_diagnosis_for_an_input_the_gate_stops(tiny_model_dir, images, tmp_path, capsys):
    from synthetic import chest

    film = tmp_path / "film.png"
    Image.fromarray(chest(160, seed=3)).save(film)
    out = tmp_path / "out"
    rc = main(["-q", "explain", str(film), str(images["rgb_jpeg"]), "--model", str(tiny_model_dir), "--out", str(out),
               "--method", "gradcam"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 3  # as predict: nothing failed, but the gate stopped an input
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "explain.csv"))}
    assert rows["film.png"]["in_scope"] == "True" and rows["film.png"]["reasons"] == ""
    assert rows["a.jpeg"]["in_scope"] == "False" and "colour content" in rows["a.jpeg"]["reasons"]
    said = {line.split(":")[0].rsplit("/", 1)[-1]: line for line in lines if ": " in line}
    assert f"film.png: {rows['film.png']['label']} (gradcam" in said["film.png"]
    assert "out of scope, no diagnosis (colour content" in said["a.jpeg"]  # the network's class only as what was mapped
    maps = {Path(m["path"]).name: m for m in json.loads((out / "explain.json").read_text())["maps"]}
    assert maps["a.jpeg"]["in_scope"] is False and maps["film.png"]["in_scope"] is True
    from pneumoscan.explain.maps import title
    e = Explainer(Predictor(tiny_model_dir))(load_xray(images["rgb_jpeg"]), ("gradcam",))[0]
    assert not e.in_scope and title(e).startswith("OUT OF SCOPE, no diagnosis: colour content")


@pytest.mark.slow
def test_cli_explain_into_a_reused_folder_leaves_nothing_stale(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")  # not explain's: never touched
    common = ["--model", str(tiny_model_dir), "--out", str(out), "--patch", "16", "--stride", "8"]
    main(["-q", "explain", str(images["rgb_jpeg"]), str(images["png16"]), *common, "--grid"])
    first = {p.name for p in out.iterdir()}
    assert {"a.occlusion.png", "a.gradcam.npy", "grid.occlusion.png", "grid.gradcam.png", "explain.csv"} <= first
    main(["-q", "explain", str(images["png16"]), *common, "--method", "gradcam"])
    assert {p.name for p in out.iterdir()} == {"notes.txt", "b.gradcam.png", "b.gradcam.npy", "explain.csv",
                                               "explain.json"}  # the first run's other maps and grids are gone
    main(["-q", "explain", str(images["broken"]), *common])  # nothing explained: no summary of another run is left
    capsys.readouterr()
    assert {p.name for p in out.iterdir()} == {"notes.txt"}


def test_cli_explain_never_reads_its_own_maps_back(tiny_model_dir, images, tmp_path, capsys):
    """'explain scans --out scans/maps' run twice explains the films, not the first run's overlays."""
    import shutil

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(images["png16"], scans / "b.png")
    args = ["-q", "explain", str(scans), "--model", str(tiny_model_dir), "--out", str(scans / "maps"),
            "--method", "gradcam"]
    rc = main(args)  # 3: the tiny model's gate stops this noise image; a map is drawn all the same
    first = sorted(p.name for p in (scans / "maps").iterdir())
    assert main(args) == rc in (0, 3)
    capsys.readouterr()
    assert sorted(p.name for p in (scans / "maps").iterdir()) == first == [
        "b.gradcam.npy", "b.gradcam.png", "explain.csv", "explain.json"]
    assert [m["path"] for m in json.loads((scans / "maps" / "explain.json").read_text())["maps"]] == [str(scans / "b.png")]


def test_cli_explain_into_its_own_input_folder_and_interrupted_never_mixes_runs(tiny_model_dir, images, tmp_path,
                                                                              capsys, monkeypatch):
    """explain DIR --out DIR explained its earlier overlays (x.gradcam.gradcam.png ...); a Ctrl-C half way left
    this run's first maps beside the earlier run's summary."""
    import shutil

    from pneumoscan.explain import explainer as ex

    scans = tmp_path / "scans"
    scans.mkdir()
    for k in ("png16", "dicom"):
        shutil.copy(images[k], scans / images[k].name)
    args = ["-q", "explain", str(scans), "--model", str(tiny_model_dir), "--out", str(scans), "--method", "gradcam"]
    rc = main(args)
    names = {p.name for p in scans.iterdir()}
    assert main(args) == rc and {p.name for p in scans.iterdir()} == names  # no maps of maps
    first = {p.name: p.read_bytes() for p in scans.iterdir()}
    calls = []

    def interrupted(self, x, methods):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, x, methods)

    real = ex.Explainer.__call__
    monkeypatch.setattr(ex.Explainer, "__call__", interrupted)
    shutil.copy(images["rgb_jpeg"], scans / "a0.jpeg")  # a new input, explained first, then Ctrl-C
    assert main(args) == 130
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in scans.iterdir() if p.name != "a0.jpeg"} == first  # no a0.gradcam.*
    assert not [p for p in tmp_path.rglob(".*staged*")]


def test_cli_explain_bad_inputs(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "explain", str(images["broken"]), str(tmp_path / "missing.png"), str(images["png16"]),
               "--model", str(tiny_model_dir), "--out", str(out), "--method", "gradcam"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.png" in err and "missing.png" in err  # bad files reported, the good one done
    assert (out / "b.gradcam.png").is_file() and not (out / "broken.gradcam.png").exists()
    assert main(["-q", "explain", str(tmp_path / "nothing.png"), "--model", str(tiny_model_dir),
                 "--out", str(out)]) == 2
    assert main(["-q", "explain", str(images["png16"]), "--model", str(tiny_model_dir), "--out", str(out),
                 "--patch", "65"]) == 2
    assert "larger than the model input" in capsys.readouterr().err
    assert main(["-q", "explain", str(images["png16"]), "--model", str(tmp_path / "nomodel"),
                 "--out", str(out)]) == 2


def test_pick_evenly_and_unique_names(tmp_path):
    from pneumoscan.cli.explain import pick_evenly, unique_stems

    files = [tmp_path / "NORMAL" / f"n{i:02d}.png" for i in range(10)] + \
            [tmp_path / "PNEUMONIA" / f"p{i:02d}.png" for i in range(30)]
    picked = pick_evenly(files, 6)
    assert len(picked) == 6 and sum(f.parent.name == "NORMAL" for f in picked) == 3
    assert pick_evenly(files[:3], 16) == files[:3]
    same = [tmp_path / "A" / "x.png", tmp_path / "B" / "x.png", tmp_path / "A" / "y.png"]
    assert unique_stems(same) == ["A_x", "B_x", "y"]
