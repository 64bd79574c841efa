"""Decode any X-ray a user may have into one 8-bit grayscale array.

JPEG and PNG (8/16-bit grayscale, RGB, RGBA, palette, CMYK, EXIF-rotated) through Pillow;
DICOM through pydicom (modality and VOI LUT applied, MONOCHROME1 inverted). Formats outside
the allow-list are refused, and the pixel count is checked *before* decoding so that a
decompression bomb costs nothing.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError, UnsupportedFormatError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("jpeg", "png", "dicom")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; the largest originals are about 3000 x 3000
Source = Union[str, os.PathLike, bytes]

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"%!PS", "eps"),
    (b"\xc5\xd0\xd3\xc6", "eps"),
    (b"RIFF", "webp"),
    (b"%PDF", "pdf"),
)


def sniff_format(head: bytes) -> str | None:
    """Format from the first bytes (at least 132 for DICOM); ``None`` when unknown."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for sig, name in _SIGNATURES:
        if head.startswith(sig):
            return name
    return None


@dataclass
class XRay:
    """A decoded image: 8-bit grayscale pixels plus facts about the original file."""

    pixels: np.ndarray  # uint8, H x W, 0 = black
    format: str  # "jpeg", "png" or "dicom"
    mode: str  # source mode (Pillow mode, or DICOM photometric interpretation)
    size: tuple[int, int]  # original (width, height)
    colorfulness: float = 0.0  # mean |channel - gray| of the original, in 0..255; 0 for grayscale
    notes: list[str] = field(default_factory=list)


def _name(source: Source, name: str | None) -> str:
    if name:
        return name
    return "upload" if isinstance(source, (bytes, bytearray)) else str(source)


def _read_head(source: Source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:132])
    try:
        with open(source, "rb") as f:
            return f.read(132)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror})") from None


def load_xray(source: Source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
              size_hint: int | None = None) -> XRay:
    """Decode ``source`` (a path or the file's bytes) into an :class:`XRay`.

    ``size_hint`` lets large JPEGs decode at a reduced scale (Pillow ``draft``), never below
    the hint, which is much faster when the target is a 224-320 px model input.
    Raises :class:`ImageError` (or a subclass) with the file name and what to do.
    """
    label = _name(source, name)
    head = _read_head(source, label)
    if not head:
        raise ImageError(f"{label}: empty file; send a JPEG, PNG or DICOM chest X-ray")
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageError(f"{label}: not a recognised image (expected JPEG, PNG or DICOM)")
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedFormatError(f"{label}: {fmt.upper()} is not accepted; convert it to PNG, JPEG or DICOM")
    if fmt == "dicom":
        return _load_dicom(source, label, max_pixels)
    return _load_pil(source, label, fmt, max_pixels, size_hint)


def _load_pil(source: Source, label: str, fmt: str, max_pixels: int, size_hint: int | None) -> XRay:
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"{label}: {w} x {h} pixels exceeds the limit of {max_pixels:,}; "
                                         "downscale the image first")
            if w < 1 or h < 1:
                raise ImageError(f"{label}: image has no pixels")
            orig_mode = im.mode
            if fmt == "jpeg" and size_hint and im.mode in ("L", "RGB", "CMYK"):
                # Decode at 1/2, 1/4 or 1/8 scale when that still leaves >= size_hint px per side.
                im.draft("L" if im.mode == "L" else "RGB", (size_hint, size_hint))
            im.load()
            im = ImageOps.exif_transpose(im)
    except (ImageTooLargeError, ImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{label}: declares too many pixels (decompression bomb guard); "
                                 "downscale the image first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: cannot be decoded as {fmt.upper()}; the file is corrupt or mislabelled") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: broken {fmt.upper()} ({e}); re-export or re-download the file") from None
    pixels, colorfulness = _to_gray8(im)
    return XRay(pixels, format=fmt, mode=orig_mode, size=(w, h), colorfulness=colorfulness)


def _to_gray8(im: Image.Image) -> tuple[np.ndarray, float]:
    """uint8 grayscale pixels (stretched for >8-bit data) and the image's colourfulness."""
    colorfulness = 0.0
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        return _stretch(a), 0.0
    if im.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
        if im.mode == "RGBA":  # flatten transparency onto black, the background of an X-ray
            bg = Image.new("RGB", im.size, (0, 0, 0))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
    if im.mode == "RGB":
        rgb = np.asarray(im, dtype=np.int16)
        gray = np.asarray(im.convert("L"))
        colorfulness = float(np.abs(rgb - gray[..., None]).mean())
        return gray, colorfulness
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im), colorfulness


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _load_dicom(source: Source, label: str, max_pixels: int) -> XRay:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ImageError(f"{label}: DICOM needs pydicom; pip install pydicom") from None
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        ds = pydicom.dcmread(fp)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"{label}: unreadable DICOM ({e})") from None
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if "PixelData" not in ds or rows == 0 or cols == 0:
        raise ImageError(f"{label}: DICOM file holds no image (no PixelData)")
    if rows * cols > max_pixels:
        raise ImageTooLargeError(f"{label}: {cols} x {rows} pixels exceeds the limit of {max_pixels:,}")
    try:
        arr = ds.pixel_array
    except Exception as e:
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tname = getattr(tsyntax, "name", str(tsyntax))
        raise ImageError(f"{label}: cannot decode DICOM pixel data ({tname}): {e}; "
                         "install the codecs with 'pip install pneumoscan[dicom-codecs]'") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    elif arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    a = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        a = apply_voi_lut(a, ds)
    a = _stretch(np.asarray(a, dtype=np.float32))
    if photometric == "MONOCHROME1":  # higher values are darker: invert to the usual look
        a = 255 - a
    return XRay(a, format="dicom", mode=photometric, size=(cols, rows))
