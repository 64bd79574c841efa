"""Decoding of every input a hospital user may send, and refusal of everything else (imaging.py)."""
from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pneumoscan.data.imaging import load_xray, sniff_format
from pneumoscan.errors import ImageError, ImageTooLargeError, UnsupportedFormatError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def ramp(h: int = 48, w: int = 64) -> np.ndarray:
    """A horizontal 0..255 ramp (uint8): any inversion or clipping shows."""
    return np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring ``width x height`` and a tiny IDAT (a 'bomb' header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare ``width x height``."""
    data = bytearray(encode(Image.fromarray(ramp(16, 16)), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, **extra) -> Dataset:
    """A minimal Secondary Capture DICOM dataset holding ``pixels`` uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- JPEG / PNG: every mode ends as uint8 grayscale with the right look --------------------------

def test_jpeg_gray_and_rgb():
    g = load_xray(encode(Image.fromarray(ramp()), "JPEG", quality=95))
    assert g.format == "jpeg" and g.pixels.dtype == np.uint8 and g.pixels.shape == (48, 64)
    assert abs(int(g.pixels[:, 0].mean()) - 0) < 8 and abs(int(g.pixels[:, -1].mean()) - 255) < 8
    rgb = load_xray(encode(Image.fromarray(ramp()).convert("RGB"), "JPEG", quality=95))
    assert rgb.mode == "RGB" and rgb.colorfulness < 3.0
    assert np.abs(rgb.pixels.astype(int) - g.pixels.astype(int)).max() <= 6


def test_colour_content_is_measured():
    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 0] = 255  # pure red
    x = load_xray(encode(Image.fromarray(a), "PNG"))
    assert x.colorfulness > 50
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    im = Image.fromarray(b)
    want = float(np.abs(b.astype(np.int16) - np.asarray(im.convert("L"))[..., None]).mean())  # the definition
    assert load_xray(encode(im, "PNG")).colorfulness == pytest.approx(want, abs=1e-9)
    skipped = load_xray(encode(im, "PNG"), colour=False)  # where only the pixels matter: same pixels, no measure
    assert np.isnan(skipped.colorfulness) and np.array_equal(skipped.pixels, load_xray(encode(im, "PNG")).pixels)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1"])
def test_png_modes(mode):
    im = Image.fromarray(ramp())
    if mode != "L":
        im = im.convert(mode)
    x = load_xray(encode(im, "PNG"))
    assert x.format == "png" and x.pixels.dtype == np.uint8 and x.pixels.shape == (48, 64)
    if mode != "1":  # a 1-bit image keeps only black and white, but left must still be darker
        assert np.abs(x.pixels.astype(int) - ramp().astype(int)).mean() < 4, mode
    assert x.pixels[:, :8].mean() < x.pixels[:, -8:].mean()


def test_png_16bit_is_stretched():
    a = (np.tile(np.linspace(1000, 5000, 64), (48, 1))).astype(np.uint16)
    im = Image.fromarray(a)  # mode I;16
    x = load_xray(encode(im, "PNG"))
    assert x.mode.startswith("I") and x.pixels.min() == 0 and x.pixels.max() == 255


def test_rgba_transparency_flattened_on_black():
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., :3] = 200
    a[:, :10, 3] = 255  # left opaque, right transparent
    x = load_xray(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert x.pixels[:, :10].min() > 190 and x.pixels[:, 10:].max() < 10


def test_palette_with_transparency():
    im = Image.fromarray(ramp()).convert("P")
    im.info["transparency"] = 0
    x = load_xray(encode(im, "PNG", transparency=0))
    assert x.pixels.shape == (48, 64)


def test_cmyk_jpeg():
    x = load_xray(encode(Image.fromarray(ramp()).convert("RGB").convert("CMYK"), "JPEG", quality=95))
    assert x.mode == "CMYK" and x.pixels.shape == (48, 64)
    assert x.pixels[:, :8].mean() < x.pixels[:, -8:].mean()


def test_exif_orientation_applied():
    im = Image.fromarray(ramp(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    x = load_xray(encode(im, "JPEG", exif=exif.tobytes()))
    assert x.pixels.shape == (40, 20)  # height and width swapped
    assert x.pixels[:8].mean() < x.pixels[-8:].mean()  # the dark left edge is now on top


def film(h: int = 240, w: int = 200, seed: int = 0) -> np.ndarray:
    """A grey film-like texture: a ramp with noise, so that every DCT coefficient is busy."""
    rng = np.random.default_rng(seed)
    return np.clip(np.add.outer(np.linspace(20, 230, h), np.zeros(w)) + rng.normal(0, 25, (h, w)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size_hint", [None, 224, 64])
def test_grey_rgb_jpeg_luma_decode_gives_the_served_pixels(size_hint):
    # feature extraction and training (colour=False) decode an RGB JPEG straight to its luma plane;
    # the served path (colour=True) decodes RGB and converts: a grey film must give the same pixels
    g = film()
    d = encode(Image.fromarray(np.stack([g, g, g], -1)), "JPEG")
    served = load_xray(d, size_hint=size_hint).pixels
    fast = load_xray(d, size_hint=size_hint, colour=False)
    assert fast.mode == "RGB" and np.isnan(fast.colorfulness)
    assert fast.pixels.shape == served.shape and np.array_equal(fast.pixels, served)
    if size_hint == 64:
        assert min(served.shape) < 200  # the draft scale applied on both paths


def test_tinted_jpeg_luma_decode_within_a_few_levels():
    # a faint tint the colour check still admits (colourfulness <= 8): a few grey levels on a few pixels
    g = film().astype(float)
    rgb = np.clip(np.stack([g * 1.08, g, g * 0.92], -1), 0, 255).astype(np.uint8)
    d = encode(Image.fromarray(rgb), "JPEG")
    served = load_xray(d)
    assert 1 < served.colorfulness <= 8
    diff = np.abs(served.pixels.astype(int) - load_xray(d, colour=False).pixels)
    assert diff.max() <= 6 and (diff > 0).mean() < 0.05  # noisier than a film: real films 4 levels, 0.2 %


def rgb_reference(data: bytes, size_hint: int | None) -> tuple[np.ndarray, float]:
    """What the served decoder promises for a colour-mode JPEG: libjpeg's RGB, its grey conversion, the
    colourfulness by its definition, EXIF orientation applied."""
    from PIL import ImageOps

    im = Image.open(io.BytesIO(data))
    if size_hint:
        im.draft("RGB", (size_hint, size_hint))
    im = ImageOps.exif_transpose(im)
    g = np.asarray(im.convert("L"))
    return g, float(np.abs(np.asarray(im).astype(np.int16) - g[..., None]).mean())


SAVES = {"baseline": {}, "progressive": {"progressive": True}, "4:4:4": {"subsampling": 0},
         "RGB stored (Adobe)": {"keep_rgb": True}}


@pytest.mark.parametrize("size_hint", [None, 64])
@pytest.mark.parametrize("tint", [0.0, 0.08, 0.5])
@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("save", SAVES)
def test_served_rgb_jpeg_decode_equals_libjpeg_rgb(size_hint, tint, orientation, save, monkeypatch):
    # the served path decodes Y, Cb, Cr unconverted and uses Y where the chroma is exactly 128, else
    # decodes again as RGB: pixels and colourfulness must be those of the RGB decode in every case
    # (a JPEG that stores RGB itself has no Y to hand over: it decodes as RGB at once)
    import pneumoscan.data.imaging as imaging

    g = film().astype(float)
    rgb = np.clip(np.stack([g * (1 + tint), g, g * (1 - tint)], -1), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    d = encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), **SAVES[save])
    reopened = []
    real = imaging._reopen_rgb
    monkeypatch.setattr(imaging, "_reopen_rgb", lambda *a: reopened.append(1) or real(*a))
    x = load_xray(d, size_hint=size_hint)
    want, colour = rgb_reference(d, size_hint)
    assert x.mode == "RGB" and x.pixels.shape == want.shape and np.array_equal(x.pixels, want)
    assert x.colorfulness == pytest.approx(colour, abs=1e-9)
    assert bool(reopened) == (tint > 0 and save != "RGB stored (Adobe)")  # a grey film is decoded once


def test_a_jpeg_libjpeg_cannot_hand_over_as_ycbcr_decodes_as_rgb(monkeypatch):
    # should the colour-space rule ever misjudge a file, the YCbCr request fails and the file decodes as RGB
    import pneumoscan.data.imaging as imaging

    g = film()
    d = encode(Image.fromarray(np.stack([g, g, g], -1)), "JPEG", keep_rgb=True)
    monkeypatch.setattr(imaging, "_stored_as_ycc", lambda im: True)
    x = load_xray(d)
    want, colour = rgb_reference(d, None)
    assert np.array_equal(x.pixels, want) and x.colorfulness == colour == 0.0


def test_large_jpeg_drafted_but_size_reported():
    im = Image.fromarray(np.tile(np.linspace(0, 255, 1200).astype(np.uint8), (1000, 1)))
    x = load_xray(encode(im, "JPEG"), size_hint=224)
    assert x.size == (1200, 1000)
    assert 224 <= min(x.pixels.shape) < 1000


# -- DICOM ------------------------------------------------------------------------------------------

def test_dicom_monochrome2_and_monochrome1_inverted():
    a = np.tile(np.linspace(0, 4000, 64), (48, 1)).astype(np.uint16)
    m2 = load_xray(dicom_bytes(dicom(a)))
    m1 = load_xray(dicom_bytes(dicom(a, "MONOCHROME1")))
    assert m2.format == "dicom" and m2.mode == "MONOCHROME2" and m2.size == (64, 48)
    assert m2.pixels[:, 0].mean() < 5 and m2.pixels[:, -1].mean() > 250
    assert np.array_equal(m1.pixels, 255 - m2.pixels)


def test_dicom_window_applied():
    a = np.tile(np.linspace(0, 4000, 64), (48, 1)).astype(np.uint16)
    x = load_xray(dicom_bytes(dicom(a, WindowCenter=2000, WindowWidth=400)))
    cols = x.pixels.mean(axis=0)
    assert (cols[a[0] < 1790] == 0).all() and (cols[a[0] > 2210] == 255).all()
    mid = (a[0] > 1850) & (a[0] < 2150)
    assert mid.any() and ((cols[mid] > 0) & (cols[mid] < 255)).all()


def test_dicom_rescale_then_window():
    a = np.tile(np.linspace(0, 1000, 64), (48, 1)).astype(np.uint16)
    x = load_xray(dicom_bytes(dicom(a, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=200)))
    hu = a[0].astype(float) * 2 - 1000
    cols = x.pixels.mean(axis=0)
    assert (cols[hu < -110] == 0).all() and (cols[hu > 110] == 255).all()


def test_dicom_rle_compressed_equals_uncompressed():
    a = np.tile(np.linspace(0, 4000, 64), (48, 1)).astype(np.uint16)
    plain = load_xray(dicom_bytes(dicom(a)))
    ds = dicom(a)
    ds.compress(RLELossless)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(load_xray(dicom_bytes(ds)).pixels, plain.pixels)


def test_dicom_jpeg_compressed():
    from pydicom.encaps import encapsulate

    a = ramp()
    ds = dicom(a, bits=8)
    ds.PixelData = encapsulate([encode(Image.fromarray(a), "JPEG", quality=95)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    x = load_xray(dicom_bytes(ds))
    assert np.abs(x.pixels.astype(int) - a.astype(int)).mean() < 4


def test_dicom_jpeg_frame_cut_short_is_noted_as_truncated():
    pytest.importorskip("libjpeg")  # pylibjpeg's decoder: the one that decodes a cut frame without a word
    from pydicom.encaps import encapsulate

    from pneumoscan.scope import check_scope

    a = ramp()
    whole = encode(Image.fromarray(a), "JPEG", quality=95)
    films = {}
    for name, frame in (("whole", whole), ("cut", whole[: len(whole) * 2 // 3])):
        ds = dicom(a, bits=8)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        films[name] = load_xray(dicom_bytes(ds), name=f"{name}.dcm")
    assert films["whole"].notes == []
    assert len(films["cut"].notes) == 1 and "ends early" in films["cut"].notes[0] and "truncated" in films["cut"].notes[0]
    assert any(r.startswith("the file is damaged") for r in check_scope(films["cut"]))  # stopped: no diagnosis


def test_dicom_missing_codec_is_a_clear_error():
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here; no codec is missing")
    ds = dicom(ramp(), bits=8)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    with pytest.raises(ImageError, match=r"(?s)scan\.dcm.*High-Throughput JPEG 2000.*pip install"):
        load_xray(dicom_bytes(ds), name="scan.dcm")


def test_dicom_with_corrupt_compressed_pixels_says_corrupt_not_install_and_logs_no_traceback(caplog):
    from pydicom.encaps import encapsulate

    ds = dicom(ramp(), bits=8)
    ds.PixelData = encapsulate([b"\x01" * 256])  # RLE, whose decoder ships with pydicom: the data is at fault
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        with pytest.raises(ImageError, match=r"scan\.dcm: DICOM pixel data \(RLE Lossless\) is corrupt.*RLE header"
                                             r".*re-export") as e:
            load_xray(dicom_bytes(ds), name="scan.dcm")
    assert "pip install" not in str(e.value)
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.exc_info]  # one line, no traceback


def test_dicom_without_pixels():
    ds = dicom(ramp())
    del ds.PixelData
    with pytest.raises(ImageError, match="no PixelData"):
        load_xray(dicom_bytes(ds))


def test_dicom_bomb_refused_before_decoding():
    ds = dicom(ramp(4, 4))
    ds.Rows, ds.Columns = 60000, 60000  # declares 3.6 G pixels, holds 16 bytes
    with pytest.raises(ImageTooLargeError, match="60000 x 60000"):
        load_xray(dicom_bytes(ds))


# -- bombs and bad files ----------------------------------------------------------------------------

@pytest.mark.parametrize("data", [png_header_only(50_000, 50_000), jpeg_declaring(60_000, 60_000)],
                         ids=["png-50k", "jpeg-60k"])
def test_bomb_headers_refused(data):
    with pytest.raises(ImageTooLargeError):
        load_xray(data, name="bomb")


def test_own_pixel_limit_below_pillows():
    data = encode(Image.fromarray(ramp(200, 200)), "PNG")
    with pytest.raises(ImageTooLargeError, match="200 x 200 pixels exceeds the limit of 10,000"):
        load_xray(data, name="big.png", max_pixels=10_000)
    assert load_xray(data, max_pixels=40_000).pixels.shape == (200, 200)


def _tiff() -> bytes:
    return encode(Image.fromarray(ramp()), "TIFF")


@pytest.mark.parametrize("data,err", [
    (b"", ImageError),
    (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), ImageError),
    (b"just some text, named .png", ImageError),
    (encode(Image.fromarray(ramp()), "JPEG")[:300], ImageError),
    (encode(Image.fromarray(ramp()), "PNG")[:60], ImageError),
    (b"\x89PNG\r\n\x1a\n", ImageError),
    (b"DICM", ImageError),
    (_tiff(), UnsupportedFormatError),
    (encode(Image.fromarray(ramp()), "GIF"), UnsupportedFormatError),
    (encode(Image.fromarray(ramp()), "BMP"), UnsupportedFormatError),
    (encode(Image.fromarray(ramp()), "WEBP"), UnsupportedFormatError),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", UnsupportedFormatError),
    (b"%PDF-1.4\n", UnsupportedFormatError),
], ids=["empty", "random", "text", "truncated-jpeg", "truncated-png", "png-signature-only", "dicm-only",
        "tiff", "gif", "bmp", "webp", "eps", "pdf"])
def test_bad_input_is_refused_with_a_message(data, err):
    with pytest.raises(err) as info:
        load_xray(data, name="scan.png")
    assert str(info.value).startswith("scan.png: ")


def test_bad_paths(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_xray(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_xray(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_file_decodes_the_same_read_whole_or_from_its_path(fmt, tmp_path, monkeypatch):
    # files up to WHOLE_FILE_MAX are read in one call and decoded from memory, larger ones from the path
    import pneumoscan.data.imaging as imaging

    g = film()
    path = tmp_path / f"f.{fmt.lower()}"
    path.write_bytes(encode(Image.fromarray(np.stack([g, g, g], -1)), fmt))
    opened = []
    real = Image.open
    monkeypatch.setattr(imaging.Image, "open", lambda fp, *a, **k: opened.append(fp) or real(fp, *a, **k))
    whole = load_xray(path, size_hint=64)
    assert len(opened) == 1 and isinstance(opened[0], io.BytesIO)  # read once, decoded from memory
    monkeypatch.setattr(imaging, "WHOLE_FILE_MAX", 16)
    streamed = load_xray(path, size_hint=64)
    assert len(opened) == 2 and not isinstance(opened[1], io.BytesIO)  # decoded from the path this time
    assert np.array_equal(whole.pixels, streamed.pixels) and whole.colorfulness == streamed.colorfulness
    assert whole.size == streamed.size and whole.notes == streamed.notes


def test_sniff_format_ignores_names():
    assert sniff_format(encode(Image.fromarray(ramp()), "JPEG")[:132]) == "jpeg"
    assert sniff_format(b"\0" * 128 + b"DICM") == "dicom"
    assert sniff_format(b"hello") is None


# -- #13: the whole DICOM decode path is guarded; multi-frame held to the limit; blank and truncated ----------

def _mutants(data: bytes, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = bytearray(data)
        hi = len(b) if rng.random() < 0.25 else min(len(b), 1024)
        b[int(rng.integers(0, hi))] = int(rng.integers(0, 256))
        yield bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value it reads
def test_mutated_dicoms_raise_only_image_errors():
    """Seeded single-byte mutations of a DICOM (mostly in its header): an ImageError or an XRay, nothing
    else (on main, 53 of 3,000 raised TypeError, NotImplementedError, ValueError, ... from pydicom)."""
    a = np.random.default_rng(0).integers(0, 4096, (32, 32))
    base = dicom_bytes(dicom(a, WindowCenter="2000", WindowWidth="400", RescaleSlope="1", RescaleIntercept="0"))
    outcomes = {"ok": 0, "refused": 0}
    for m in _mutants(base, 600, seed=1):
        try:
            load_xray(m, name="f.dcm")
            outcomes["ok"] += 1
        except ImageError as e:
            assert str(e).startswith("f.dcm: ") and "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["ok"] > 100 and outcomes["refused"] > 10


def test_dicom_unusable_window_and_rescale_are_skipped_with_a_note():
    a = ramp(32, 32).astype(np.uint16) * 16
    data = dicom_bytes(dicom(a, WindowCenter="2001", WindowWidth="400")).replace(b"2001", b"abc ")
    x = load_xray(data, name="w.dcm")
    assert np.array_equal(x.pixels, load_xray(dicom_bytes(dicom(a))).pixels)  # the full range, as without a window
    assert x.notes and "WindowCenter 'abc'" in x.notes[0]


def test_multi_frame_dicom_counts_every_frame_and_decodes_the_first():
    frames = np.stack([ramp(16, 16), ramp(16, 16)[:, ::-1], np.zeros((16, 16), np.uint8)]).astype(np.uint16)
    ds = dicom(frames[0])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    x = load_xray(dicom_bytes(ds))
    assert np.array_equal(x.pixels, load_xray(dicom_bytes(dicom(frames[0]))).pixels)
    with pytest.raises(ImageTooLargeError, match=r"16 x 16 x 3 frames pixels \(768\) exceeds the limit of 700"):
        load_xray(dicom_bytes(ds), max_pixels=700)  # 256 px a frame would pass; 3 frames do not


def test_blank_reason_and_truncation_note():
    from pneumoscan.data.imaging import BlankImageError, XRay, blank_reason, check_content, truncation_note

    flat = XRay(np.full((64, 64), 200, np.uint8), "png", "L", (64, 64))
    assert "blank" in blank_reason(flat)
    with pytest.raises(BlankImageError, match="^f.png: image is blank"):
        check_content(flat, "f.png")
    assert blank_reason(XRay(ramp(), "png", "L", (64, 48))) is None
    img = ramp(200, 50)
    assert truncation_note(img) is None
    img[150:] = 128  # libjpeg's grey fill of the missing quarter
    assert "bottom 25 %" in truncation_note(img)
    img[:, :] = 60
    img[190:] = 128  # 10 rows of mid-grey: 5 %, over one block row and 2 %
    assert truncation_note(img) is not None and truncation_note(ramp(200, 50)) is None


def test_decoding_leaves_the_process_warning_filters_alone(monkeypatch):
    # warnings.catch_warnings() swaps the filters of the whole process: on the service's decoding threads one
    # decode's exit could restore another's filters; the pixel limit is checked before decoding instead
    import warnings

    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: pytest.fail("warning filters swapped"))
    before = list(warnings.filters)
    g = film()
    for data in (encode(Image.fromarray(g), "JPEG"), encode(Image.fromarray(g), "PNG"),
                 encode(Image.fromarray(np.stack([g, g, g], -1)), "JPEG")):
        load_xray(data)
    assert warnings.filters == before
    with pytest.raises(ImageTooLargeError):
        load_xray(png_header_only(9000, 9000))


def test_a_dicom_header_that_names_another_modality_part_or_view_stops_the_image():
    """The pixels of a frontal film with a header saying CT, knee or lateral got a diagnosis: the header wins."""
    from pneumoscan.scope import check_scope

    rng = np.random.default_rng(0)
    a = (rng.random((64, 64)) * 4000).astype(np.uint16)
    assert load_xray(dicom_bytes(dicom(a, Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA"))).header_reasons == []
    cases = {"modality CT": {"Modality": "CT"}, "body part KNEE": {"BodyPartExamined": "KNEE"},
             "view LL: a lateral film": {"ViewPosition": "LL"}}
    for needle, tags in cases.items():
        x = load_xray(dicom_bytes(dicom(a, **tags)))
        assert any(needle in r for r in x.header_reasons) and any(needle in r for r in check_scope(x)), needle


def test_a_dicom_window_beside_the_data_falls_back_to_the_full_range_and_frames_are_noted():
    a = np.tile(np.linspace(0, 4000, 64, dtype=np.uint16), (64, 1))
    x = load_xray(dicom_bytes(dicom(a, WindowCenter=100000, WindowWidth=1)))  # every pixel below the window
    assert x.pixels.std() > 10 and any("leaves nothing visible" in n for n in x.notes)
    ds = dicom(a, NumberOfFrames=3)
    ds.PixelData = np.stack([a, a[::-1], a]).tobytes()
    x = load_xray(dicom_bytes(ds))
    assert x.pixels.shape == (64, 64) and any("3 frames; only the first" in n for n in x.notes)
