"""Preprocessing: resize first, then the intensity normalisation (none, equalize, CLAHE), then mean/std."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumoscan.preprocess import Preprocess, PreprocessConfig, normalize_batch


def film(h: int = 300, w: int = 260, seed: int = 0) -> np.ndarray:
    """A low-contrast 'radiograph': a dim left half, a bright right half, soft noise (values 90-170)."""
    rng = np.random.default_rng(seed)
    a = np.full((h, w), 110.0)
    a[:, w // 2:] = 150.0
    a += rng.normal(0, 6, (h, w))
    return np.clip(a, 90, 170).astype(np.uint8)


def test_none_only_resizes():
    pp = Preprocess(PreprocessConfig(size=64))
    out = pp.resize(film())
    assert out.shape == (64, 64) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(film(), (64, 64), interpolation=cv2.INTER_AREA))


def test_equalize_is_a_global_histogram_equalisation_after_resizing():
    pp = Preprocess(PreprocessConfig(size=64, intensity="equalize"))
    out = pp.resize(film())
    small = cv2.resize(film(), (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out, cv2.equalizeHist(small))
    assert small.max() - small.min() < 90 and out.min() == 0 and out.max() == 255  # the range is stretched
    hist = np.bincount(out.ravel(), minlength=256).cumsum() / out.size
    assert abs(hist[127] - 0.5) < 0.1  # roughly uniform: half the pixels below mid-grey


def test_clahe_is_adaptive_and_clipped():
    pp = Preprocess(PreprocessConfig(size=128, intensity="clahe"))
    img = film(400, 400)
    out = pp.resize(img)
    small = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out, cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(small))
    # adaptive: each half gets its own contrast, so the dim half's local spread grows
    assert out[:, :60].std() > 1.5 * small[:, :60].std()
    # clipped: a flat image stays flat instead of becoming noise
    flat = Preprocess(PreprocessConfig(size=64, intensity="clahe")).resize(np.full((64, 64), 120, np.uint8))
    assert flat.max() - flat.min() <= 1
    # unlike a global equalisation, the two halves keep their order of brightness
    assert out[:, 70:].mean() > out[:, :60].mean()


@pytest.mark.parametrize("intensity", ["equalize", "clahe"])
def test_resize_comes_before_the_intensity_step(intensity):
    """The documented order (and the order the model card states): resize, then normalise intensity."""
    pp = Preprocess(PreprocessConfig(size=64, intensity=intensity))
    img = film(320, 320)
    np.testing.assert_array_equal(pp.resize(img), pp.intensity(pp.resize_only(img)))
    other = cv2.resize(pp.intensity(img), (64, 64), interpolation=cv2.INTER_AREA)  # the other order differs
    assert np.abs(other.astype(int) - pp.resize(img).astype(int)).mean() > 1.0


@pytest.mark.parametrize("intensity", ["none", "equalize", "clahe"])
def test_batch_intensity_equals_one_image_at_a_time(intensity):
    pp = Preprocess(PreprocessConfig(size=64, intensity=intensity))
    batch = np.stack([pp.resize_only(film(seed=s)) for s in range(3)])
    np.testing.assert_array_equal(pp.intensity_batch(batch), np.stack([pp.intensity(b) for b in batch]))


def test_normalisation_uses_the_backbones_mean_and_std():
    torch = pytest.importorskip("torch")
    cfg = PreprocessConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), intensity="clahe")
    pp = Preprocess(cfg)
    img = film(32, 32)
    x = pp.array(img)
    eq = pp.resize(img).astype(np.float32)
    np.testing.assert_allclose(x, np.repeat(((eq / 255 - 0.5) / 0.25)[None], 3, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(normalize_batch(torch.from_numpy(pp.resize(img))[None], cfg).numpy()[0], x,
                               rtol=1e-6, atol=1e-5)


def test_batch_normalisation_equals_torch_and_one_image_at_a_time():
    """The ONNX engine normalises uint8 batches with NumPy, the torch engine with torch: same numbers."""
    torch = pytest.importorskip("torch")
    cfg = PreprocessConfig(size=32, intensity="clahe")
    pp = Preprocess(cfg)
    batch = np.stack([pp.resize(film(32, 32, seed=s)) for s in range(4)])
    x = pp.normalize_np(batch)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, np.stack([pp.normalize_np(b) for b in batch]))
    np.testing.assert_allclose(x, normalize_batch(torch.from_numpy(batch), cfg).numpy(), rtol=1e-6, atol=1e-5)


def test_bad_settings_are_refused():
    from pneumoscan.errors import PneumoscanError

    with pytest.raises(PneumoscanError, match="intensity 'sharpen' is unknown"):
        PreprocessConfig(intensity="sharpen")
    with pytest.raises(PneumoscanError, match="image size 0 is out of range"):
        PreprocessConfig(size=0)
