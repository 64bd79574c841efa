"""Decode any X-ray a user may have into one 8-bit grayscale array.

JPEG and PNG (8/16-bit grayscale, RGB, RGBA, palette, CMYK, EXIF-rotated) through Pillow;
DICOM through pydicom (modality and VOI LUT applied, MONOCHROME1 inverted). Formats outside
the allow-list are refused, and the pixel count (for DICOM: rows x columns x frames x samples)
is checked *before* decoding so that a decompression bomb costs nothing; a multi-frame DICOM
decodes its first frame only. Whatever a file holds, decoding raises :class:`ImageError` or
returns an :class:`XRay`. :func:`check_content` refuses blank images (the predictor calls it).
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Union

import cv2
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
    colorfulness: float = 0.0  # mean |channel - gray| of the original, in 0..255; 0 for grayscale; NaN: not measured
    notes: list[str] = field(default_factory=list)
    header_reasons: list[str] = field(default_factory=list)  # what the file's own header says it is not (DICOM)


def _name(source: Source, name: str | None) -> str:
    if name:
        return name
    return "upload" if isinstance(source, (bytes, bytearray)) else str(source)


WHOLE_FILE_MAX = 64 << 20  # a file up to this size is read in one call and decoded from memory


def _read_head(source: Source, name: str) -> tuple[bytes, Source]:
    """(the first 132 bytes, what to decode): a file up to :data:`WHOLE_FILE_MAX` is read whole, once, and
    decoded from memory (0.08 ms less per 224-px JPEG than sniffing it, then letting the decoder open it again
    and read it in small pieces); a larger one is decoded from its path."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:132]), source
    try:
        with open(source, "rb") as f:
            if os.fstat(f.fileno()).st_size <= WHOLE_FILE_MAX:
                data = f.read()
                return data[:132], data
            return f.read(132), source
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror})") from None


def load_xray(source: Source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
              size_hint: int | None = None, colour: bool = True) -> XRay:
    """Decode ``source`` (a path or the file's bytes) into an :class:`XRay`.

    ``size_hint`` lets large JPEGs decode at a reduced scale (Pillow ``draft``), never below
    the hint, which is much faster when the target is a 224-320 px model input.
    Raises :class:`ImageError` (or a subclass) with the file name and what to do, whatever the
    file holds: no other exception leaves the decoder (a :class:`MemoryError` aside).
    Decoder warnings that change what the model sees land in :attr:`XRay.notes`. ``colour=False`` skips
    measuring :attr:`XRay.colorfulness` (left NaN) where only the pixels are used (feature extraction,
    training), and has a colour JPEG decoded straight to its luma plane: the pixels are the same for a
    grey film, a few levels apart on a few pixels of a faintly tinted one (the scope check admits
    colourfulness up to 8).
    """
    label = _name(source, name)
    head, source = _read_head(source, label)
    if not head:
        raise ImageError(f"{label}: empty file; send a JPEG, PNG or DICOM chest X-ray")
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageError(f"{label}: not a recognised image (expected JPEG, PNG or DICOM)")
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedFormatError(f"{label}: {fmt.upper()} is not accepted; convert it to PNG, JPEG or DICOM")
    try:
        if fmt == "dicom":
            return _load_dicom(source, label, max_pixels)
        return _load_pil(source, label, fmt, max_pixels, size_hint, colour)
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # a decoder bug on a hostile file is the file's fault: one clear line, never a crash
        log.debug("decoding %s failed", label, exc_info=True)
        raise ImageError(f"{label}: cannot be decoded as {fmt.upper()} ({type(e).__name__}: {_why(e)}); "
                         "the file is corrupt, re-export it") from None


def _load_pil(source: Source, label: str, fmt: str, max_pixels: int, size_hint: int | None,
              colour: bool = True) -> XRay:
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        # no warnings.catch_warnings() here: it swaps the process's warning filters and is not thread-safe
        # (the service decodes on several threads); the pixel limit below is checked before any decoding, and
        # Pillow's own bomb error stays above twice its limit
        im = Image.open(fp)
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"{label}: {w} x {h} pixels exceeds the limit of {max_pixels:,}; "
                                     "downscale the image first")
        if w < 1 or h < 1:
            raise ImageError(f"{label}: image has no pixels")
        orig_mode = im.mode
        # Grey pixels only (colour=False): libjpeg hands over the luma plane and skips the colour
        # conversion (0.37 -> 0.20 ms per 224-px film); identical to convert("L") on all 5,216 training
        # films (their chroma is flat). Luma is not clipped the way RGB is, so on colour content the two
        # part: on 201 training films tinted to colourfulness 7 (the colour check admits 8) at most 4
        # levels, on 0.2 % of the pixels; more on a photograph.
        luma = fmt == "jpeg" and not colour and im.mode == "RGB"
        # Grey pixels and the colour check (colour=True): libjpeg hands over Y, Cb and Cr unconverted
        # (YCbCr). Where both chroma planes are exactly 128, its RGB conversion gives R = G = B = Y, so
        # the grey image is Y and the colourfulness 0, exactly as decoding to RGB gives them (0.69 ->
        # 0.34 ms per 224-px film); any other chroma decodes again as RGB (below).
        ycc = fmt == "jpeg" and colour and im.mode == "RGB" and _stored_as_ycc(im)
        if fmt == "jpeg" and im.mode in ("L", "RGB", "CMYK") and (size_hint or luma or ycc):
            # With size_hint: decode at 1/2, 1/4 or 1/8 scale when that still leaves >= size_hint px per side.
            im.draft("L" if im.mode == "L" or luma else "YCbCr" if ycc else "RGB",
                     (size_hint, size_hint) if size_hint else (w, h))
        try:
            im.load()
        except OSError:
            if im.mode != "YCbCr":
                raise
            im = _reopen_rgb(fp, size_hint)  # whatever libjpeg could not hand over unconverted: as RGB
        if im.mode == "YCbCr" and not _grey_chroma(im):
            im = _reopen_rgb(fp, size_hint)
        ImageOps.exif_transpose(im, in_place=True)  # no copy of an upright image
        if im.mode == "YCbCr":  # grey chroma: R = G = B = Y, so Y is the grey image (colourfulness 0)
            im = im.getchannel(0)
    except (ImageTooLargeError, ImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{label}: declares too many pixels (decompression bomb guard); "
                                 "downscale the image first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: cannot be decoded as {fmt.upper()}; the file is corrupt or mislabelled") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: broken {fmt.upper()} ({e}); re-export or re-download the file") from None
    pixels, colorfulness = _to_gray8(im, colour)
    if luma:
        colorfulness = float("nan")  # not measured: a luma decode has no colour left to measure
    notes = [n for n in [truncation_note(pixels) if fmt == "jpeg" else None] if n]
    return XRay(pixels, format=fmt, mode=orig_mode, size=(w, h), colorfulness=colorfulness, notes=notes)


def _stored_as_ycc(im: Image.Image) -> bool:
    """Whether libjpeg reads a 3-component JPEG as Y, Cb, Cr (its rule, jdapimin.c): a JFIF file; an Adobe file
    unless its transform is 0 (RGB stored as such); otherwise unless the components are named R, G, B."""
    if "jfif" in im.info:
        return True
    if "adobe_transform" in im.info:
        return im.info["adobe_transform"] != 0
    return [c[0] for c in getattr(im, "layer", [])] != [82, 71, 66]


def _grey_chroma(im: Image.Image) -> bool:
    """Whether both chroma planes of a YCbCr-decoded JPEG are exactly 128 (no colour at all)."""
    return all(im.getchannel(b).getextrema() == (128, 128) for b in (1, 2))


def _reopen_rgb(fp: "io.BytesIO | str | os.PathLike", size_hint: int | None) -> Image.Image:
    """The same JPEG decoded again to RGB (at the same draft scale): libjpeg's own colour conversion."""
    if hasattr(fp, "seek"):
        fp.seek(0)
    im = Image.open(fp)
    if size_hint:
        im.draft("RGB", (size_hint, size_hint))
    im.load()
    return im


def _to_gray8(im: Image.Image, colour: bool = True) -> tuple[np.ndarray, float]:
    """uint8 grayscale pixels (stretched for >8-bit data) and the image's colourfulness (NaN: not measured)."""
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
        gray = np.asarray(im.convert("L"))
        if not colour:
            return gray, float("nan")
        diff = cv2.absdiff(np.asarray(im), cv2.merge([gray, gray, gray]))  # |channel - gray|, exact in uint8
        colorfulness = float(sum(cv2.mean(diff)[:3]) / 3)  # 3x faster than the int16 numpy form, same value
        return gray, colorfulness
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im), colorfulness


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _why(e: BaseException) -> str:
    """One line of an exception for a user message (first line, at most 200 characters)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def _load_dicom(source: Source, label: str, max_pixels: int) -> XRay:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ImageError(f"{label}: DICOM needs pydicom; pip install pydicom") from None
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        ds = pydicom.dcmread(fp)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"{label}: unreadable DICOM ({_why(e)})") from None
    try:
        return _decode_dicom(ds, label, max_pixels)
    except ImageError:
        raise
    except Exception as e:  # pydicom parses elements lazily: a broken value surfaces anywhere below
        log.debug("malformed DICOM %s", label, exc_info=True)
        raise ImageError(f"{label}: malformed DICOM header or pixel data ({type(e).__name__}: {_why(e)}); "
                         "re-export the image from the viewer or PACS") from None


def _dicom_int(ds, keyword: str, label: str, default: int | None = None) -> int:
    """An integer element, validated: a corrupt VR or value is one clear :class:`ImageError`."""
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            if default is None:
                raise ImageError(f"{label}: DICOM file holds no image (no {keyword})")
            return default
        return int(value)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"{label}: DICOM {keyword} is unusable ({_why(e)}); re-export the image") from None


def _decode_dicom(ds, label: str, max_pixels: int) -> XRay:
    """The first frame of a parsed dataset, after every size is checked (nothing decoded before)."""
    if "PixelData" not in ds:
        raise ImageError(f"{label}: DICOM file holds no image (no PixelData)")
    rows, cols = _dicom_int(ds, "Rows", label), _dicom_int(ds, "Columns", label)
    frames = _dicom_int(ds, "NumberOfFrames", label, 1)
    samples = _dicom_int(ds, "SamplesPerPixel", label, 1)
    bits = _dicom_int(ds, "BitsAllocated", label)
    if rows < 1 or cols < 1 or frames < 1 or samples not in (1, 3, 4) or bits not in (1, 8, 16, 32, 64):
        raise ImageError(f"{label}: DICOM declares an impossible image ({cols} x {rows}, {frames} frame(s), "
                         f"{samples} sample(s), {bits} bits); re-export the image")
    declared = rows * cols * frames * samples  # every format: pixels held, not only those decoded
    if declared > max_pixels:
        what = f"{cols} x {rows}" + (f" x {frames} frames" if frames > 1 else "") + (
            f" x {samples} samples" if samples > 1 else "")
        raise ImageTooLargeError(f"{label}: {what} pixels ({declared:,}) exceeds the limit of {max_pixels:,}; "
                                 "send a single-frame chest X-ray")
    arr = _first_frame(ds, label)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise ImageError(f"{label}: DICOM pixel data has shape {arr.shape}, not the declared {rows} x {cols}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip()
    notes: list[str] = [n for n in [_dicom_truncation_note(ds, frames)] if n]
    if frames > 1:
        notes.append(f"DICOM holds {frames} frames; only the first is read")
    a = _dicom_lut(arr, ds, notes, label)
    a = _stretch(np.asarray(a, dtype=np.float32))
    if photometric == "MONOCHROME1":  # higher values are darker: invert to the usual look
        a = 255 - a
    return XRay(a, format="dicom", mode=photometric, size=(cols, rows), notes=notes, header_reasons=dicom_scope(ds))


RADIOGRAPHY = ("CR", "DX", "DR", "RG", "OT", "")  # DICOM modalities a chest radiograph is stored under ('' : absent)
LATERAL_VIEWS = ("LL", "RL", "LLD", "RLD", "LAT", "LATERAL")  # ViewPosition values of a lateral film
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "")  # BodyPartExamined values of a chest film ('' : absent)


def dicom_scope(ds) -> list[str]:
    """Why the DICOM header itself says the image is no frontal chest radiograph (another modality, another
    body part, a lateral view): the pixels may look like one, the file says otherwise. Absent tags say nothing."""
    def tag(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip().upper()

    out = []
    if tag("Modality") not in RADIOGRAPHY:
        out.append(f"the DICOM header says modality {tag('Modality')}, not a radiograph (CR/DX)")
    if tag("BodyPartExamined") not in CHEST_PARTS:
        out.append(f"the DICOM header says body part {tag('BodyPartExamined')}, not the chest")
    if tag("ViewPosition") in LATERAL_VIEWS:
        out.append(f"the DICOM header says view {tag('ViewPosition')}: a lateral film; send the frontal (PA/AP) one")
    return out


JPEG_FAMILY = ("JPEG", "HTJ2K")  # transfer syntax keywords whose frames end with an FF D9 marker (JPEG, -LS, 2000)


def _dicom_truncation_note(ds, frames: int) -> str | None:
    """A note when the first frame of JPEG-family pixel data lacks its closing FF D9 marker (EOI, or EOC in JPEG
    2000): its data ended early. pylibjpeg decodes such a frame without a word and fills the missing rows."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not tsyntax.is_encapsulated or not str(tsyntax.keyword).startswith(JPEG_FAMILY):
        return None
    try:
        from pydicom.encaps import get_frame

        frame = bytes(get_frame(ds.PixelData, 0, number_of_frames=frames)).rstrip(b"\0")  # items are padded to even
    except Exception:  # the frame table itself is broken: decoding already succeeded, so say nothing
        return None
    if frame.endswith(b"\xff\xd9"):
        return None
    return ("the compressed pixel data ends early (no end-of-image marker): the file is truncated; re-export it "
            "from the viewer or PACS")


def _first_frame(ds, label: str) -> np.ndarray:
    """Decode frame 0 only (pydicom's ``index``): a multi-frame object never decodes whole."""
    from pydicom.pixels import pixel_array

    try:
        return np.asarray(pixel_array(ds, index=0))
    except Exception as e:
        log.debug("decoding the pixel data of %s failed", label, exc_info=True)
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tname = getattr(tsyntax, "name", str(tsyntax))
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[1] if len(lines) > 1 and lines[0].startswith("Unable to decode") else _why(e)  # the first plugin's
        if _codec_missing(tsyntax):
            raise ImageError(f"{label}: cannot decode DICOM pixel data ({tname}): {why[:200]}; install the codecs "
                             "with 'pip install pneumoscan[dicom-codecs]'") from None
        raise ImageError(f"{label}: DICOM pixel data ({tname}) is corrupt or not what the header declares "
                         f"({why[:200]}); re-export the image from the viewer or PACS") from None


def _codec_missing(tsyntax) -> bool:
    """Whether pydicom has no usable decoder for this transfer syntax (rather than one that failed)."""
    try:
        from pydicom.pixels import get_decoder

        return not get_decoder(tsyntax).is_available
    except Exception:  # an unknown or absent transfer syntax: no decoder to install either way
        return False


class _NoPluginTracebacks(logging.Filter):
    """pydicom logs every failing decoding plugin with its traceback at ERROR (``LOGGER.exception``); the failure
    becomes one :class:`ImageError` line here, so a malformed upload must not write a traceback to the service log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoPluginTracebacks())


def _values(ds, *keywords: str) -> str:
    """``Keyword 'value'`` for each element present, read safely (for messages)."""
    out = []
    for k in keywords:
        try:
            v = ds[k].value if k in ds else None
        except Exception:
            v = "<unreadable>"
        if v is not None:
            out.append(f"{k} {str(v)[:40]!r}")
    return ", ".join(out) or "a LUT sequence"


def _dicom_lut(arr: np.ndarray, ds, notes: list[str], label: str) -> np.ndarray:
    """Modality then VOI LUT; a broken rescale or window (display hints only: the image is stretched
    to its own range afterwards) is skipped with a note instead of refusing the image."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    a = arr
    try:
        a = apply_modality_lut(arr, ds)
    except Exception as e:
        notes.append(f"DICOM rescale is unusable ({_values(ds, 'RescaleSlope', 'RescaleIntercept')}); "
                     "stored values used as they are")
        log.info("%s: modality LUT skipped: %s", label, e)
    try:
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            windowed = apply_voi_lut(a, ds)
            if np.ptp(windowed) == 0 and np.ptp(a) > 0:  # a window beside the data shows nothing: a display hint only
                notes.append(f"DICOM window leaves nothing visible ({_values(ds, 'WindowCenter', 'WindowWidth')}); "
                             "the image's full range is used instead")
            else:
                a = windowed
    except Exception as e:
        notes.append(f"DICOM window is unusable ({_values(ds, 'WindowCenter', 'WindowWidth')}); "
                     "the image's full range is used instead")
        log.info("%s: VOI LUT skipped: %s", label, e)
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ImageError(f"{label}: DICOM pixel values are not finite after rescaling; re-export the image")
    return a


# ----------------------------------------------------------------------------------------------
# content checks: blank images are refused, truncated JPEGs flagged

BLANK_STD = 2.0  # gray levels (0..255): below this spread the image holds nothing to classify
FILL_GRAY = 128  # what libjpeg writes for the blocks of a JPEG whose data ended early ("premature end")


class BlankImageError(ImageError):
    """The image decodes but is blank or nearly uniform: there is nothing to classify."""


def blank_reason(x: XRay) -> str | None:
    """Why ``x`` holds nothing to classify (uniform or nearly), or None. Checked on at most ~1 M pixels."""
    h, w = x.pixels.shape
    k = max(1, int(np.sqrt(h * w / 1e6)))
    m, sd = cv2.meanStdDev(np.ascontiguousarray(x.pixels[::k, ::k]))  # one pass in OpenCV (numpy's: 6x slower)
    mean, std = float(m[0, 0]), float(sd[0, 0])
    if std < BLANK_STD:
        return (f"image is blank or nearly uniform (mean {mean:.0f}, spread {std:.2f} gray levels "
                f"< {BLANK_STD:g}); send the X-ray itself")
    return None


def check_content(x: XRay, label: str) -> XRay:
    """Raise :class:`BlankImageError` for a blank image; returns ``x`` (its notes may say more)."""
    why = blank_reason(x)
    if why:
        raise BlankImageError(f"{label}: {why}")
    return x


def truncation_note(pixels: np.ndarray) -> str | None:
    """A note when the bottom of a decoded JPEG is libjpeg's grey fill: the file's data ended early.

    libjpeg only *warns* ("Premature end of JPEG file" / "premature end of data segment") and
    Pillow does not pass its warnings on, so the fill itself is the evidence: whole rows of
    exactly 128 at the bottom, at least 8 (one block row) and 2 % of the height.
    """
    h = pixels.shape[0]
    if h == 0 or not np.all(pixels[-1] == FILL_GRAY):  # the usual case, from the bottom row alone
        return None
    flat = np.all(pixels == FILL_GRAY, axis=1)
    n = int(np.argmin(flat[::-1])) if not flat.all() else h  # flat rows at the bottom
    if n >= max(8, int(0.02 * h)):
        return (f"the JPEG data ends early: the bottom {100 * n / h:.0f} % of the image is the decoder's grey "
                "fill (libjpeg: premature end of data); the file is truncated, re-export or re-download it")
    return None
