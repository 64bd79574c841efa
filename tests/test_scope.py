"""The image checks of the out-of-scope gate: each fires on its kind of input, none on X-ray-like images
or on the training split, and a stopped input gets no diagnosis."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import chest

from pneumoscan.data.imaging import load_xray
from pneumoscan.scope import DEFAULT_THRESHOLDS, ScopeThresholds, check_scope, describe_thresholds

MAX_ASPECT = DEFAULT_THRESHOLDS.max_aspect_ratio
MAX_COLORFULNESS = DEFAULT_THRESHOLDS.max_colorfulness
MIN_SIDE = DEFAULT_THRESHOLDS.min_side_px


def _xray_like(w: int = 224, h: int = 224, seed: int = 0) -> np.ndarray:
    """Gray 'radiograph': a bright body and midline between two dark lung fields, texture and noise."""
    return chest(w, h, seed=seed)


def _encode(a: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    im = Image.fromarray(a)
    if mode:
        im = im.convert(mode)
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def _warnings(data: bytes) -> list[str]:
    return check_scope(load_xray(data, name="test"))


@pytest.mark.parametrize("fmt,mode,size", [("JPEG", "RGB", (224, 224)),  # like the bundled data
                                           ("PNG", None, (1200, 1000)),  # like an original file
                                           ("JPEG", None, (256, 512))])  # portrait 2:1, the allowed limit
def test_no_warning_on_xray_like_images(fmt, mode, size):
    assert _warnings(_encode(_xray_like(*size), fmt, mode)) == []


def test_colour_photo_warns():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:300, 0:300]
    rgb = np.stack([xx * 255 // 299, yy * 255 // 299, 255 - xx * 255 // 299], -1) + rng.integers(0, 20, (300, 300, 1))
    w = _warnings(_encode(np.clip(rgb, 0, 255).astype(np.uint8)))
    assert len(w) == 1 and "colour" in w[0] and f"> {MAX_COLORFULNESS:g}" in w[0]


def test_real_colour_photograph_warns():
    cbook = pytest.importorskip("matplotlib.cbook")
    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))  # a photo shipped with matplotlib
    if not path.is_file():
        pytest.skip("matplotlib sample photo not installed")
    w = check_scope(load_xray(path))
    assert any("colour" in m for m in w)


def test_gray_with_faint_tint_does_not_warn():
    """JPEG chroma noise on an RGB-encoded gray film stays far below the threshold."""
    g = _xray_like().astype(float)
    rgb = np.clip(np.stack([g, g, g * 1.02], -1), 0, 255).astype(np.uint8)
    assert _warnings(_encode(rgb)) == []


@pytest.mark.parametrize("w,h", [(600, 200), (200, 600)])
def test_extreme_aspect_ratio_warns(w, h):
    msgs = _warnings(_encode(_xray_like(w, h)))
    assert len(msgs) == 1 and "aspect ratio 3.0:1" in msgs[0]


def test_very_small_image_warns():
    msgs = _warnings(_encode(_xray_like(64, 64), "PNG"))
    assert len(msgs) == 1 and "too small" in msgs[0] and "64 x 64" in msgs[0]


def test_boundaries_do_not_warn():
    assert _warnings(_encode(_xray_like(MIN_SIDE, MIN_SIDE), "PNG")) == []
    assert _warnings(_encode(_xray_like(int(MIN_SIDE * MAX_ASPECT), MIN_SIDE), "PNG")) == []
    assert len(_warnings(_encode(_xray_like(MIN_SIDE - 1, MIN_SIDE - 1), "PNG"))) == 1


def test_several_reasons_together():
    rgb = np.zeros((40, 160, 3), np.uint8)
    rgb[..., 0] = 255
    msgs = " | ".join(_warnings(_encode(rgb, "PNG")))
    for part in ("colour", "aspect ratio 4.0:1", "too small", "blank or nearly constant"):
        assert part in msgs


@pytest.mark.parametrize("make,reason", [
    (lambda: np.full((300, 300), 128, np.uint8) + np.arange(300, dtype=np.uint8)[None] % 5, "blank or nearly constant"),
    (lambda: np.clip(_xray_like(300, 300).astype(int) - 200, 0, 255).astype(np.uint8), "under-exposed"),
    (lambda: np.clip(_xray_like(300, 300).astype(int) + 200, 0, 255).astype(np.uint8), "over-exposed"),
    (lambda: np.random.default_rng(0).integers(0, 256, (300, 300)).astype(np.uint8), "noise rather than anatomy"),
    # smooth enough after downscaling to pass the roughness limit, but neighbours do not agree: still noise
    (lambda: np.random.default_rng(0).normal(120, 30, (512, 512)).clip(0, 255).astype(np.uint8), "noise rather than"),
    (lambda: 255 - _xray_like(300, 300), "inverted gray scale"),
    (lambda: np.rot90(_xray_like(300, 240)).copy(), "turned on its side"),
])
def test_each_content_check_fires(make, reason):
    msgs = _warnings(_encode(make(), "PNG"))
    assert any(m.startswith(reason) for m in msgs), msgs


def test_an_inverted_png_is_not_told_about_dicom_headers():
    """The advice for an inverted PNG was 'check the DICOM photometric interpretation'."""
    msgs = _warnings(_encode(255 - _xray_like(300, 300), "PNG"))
    inverted = next(m for m in msgs if m.startswith("inverted gray scale"))
    assert "DICOM" not in inverted and "not inverted" in inverted


def test_truncated_jpeg_is_a_damaged_file():
    data = _encode(_xray_like(400, 400))
    msgs = _warnings(data[: int(len(data) * 0.6)] + b"\xff\xd9")  # data ends early, the end marker is there
    assert any(m.startswith("the file is damaged") for m in msgs), msgs


def test_custom_thresholds_and_description():
    x = load_xray(_encode(_xray_like(300, 200), "PNG"))
    assert check_scope(x) == []
    assert len(check_scope(x, ScopeThresholds(max_aspect_ratio=1.2, min_side_px=256))) == 2
    text = " ".join(" ".join(r) for r in describe_thresholds())
    for k, v in DEFAULT_THRESHOLDS.to_dict().items():  # every threshold is quoted in the card
        assert (f"{v:.0%}" if k.endswith("share") else f"{v:g}") in text, k


def test_stopped_input_gets_no_diagnosis(tiny_model_dir):
    from pneumoscan.predict import OUT_OF_SCOPE, Predictor

    pred = Predictor(tiny_model_dir)
    p = pred.predict_bytes(_encode(_xray_like(64, 64), "PNG"), name="small.png")
    assert (p.in_scope, p.label, p.probabilities, p.pneumonia, p.verdict) == (False, None, None, None, OUT_OF_SCOPE)
    assert len(p.reasons) == 1 and "too small" in p.reasons[0]
    d = p.to_dict()
    assert d["label"] is None and d["in_scope"] is False and "scores" not in d
    ok = pred.predict_bytes(_encode(_xray_like(), "PNG"))
    assert ok.in_scope and ok.reasons == [] and ok.label in ("normal", "bacterial", "viral") and ok.verdict == ok.label


@pytest.mark.realdata
def test_real_training_images_raise_no_warning(real_data_dir):
    """Reads ../shared/data: an evenly spaced sample of every class folder (the full split was checked too)."""
    files = []
    for folder in sorted((real_data_dir / "train").iterdir()):
        fs = sorted(folder.glob("*.jpeg"))
        files += fs[:: max(1, len(fs) // 100)]
    assert len(files) >= 150
    warned = [(f.name, w) for f in files if (w := check_scope(load_xray(f)))]
    assert warned == []
