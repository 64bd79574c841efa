"""Error types. The CLI prints any :class:`PneumoscanError` as one line and exits non-zero."""
from __future__ import annotations


class PneumoscanError(Exception):
    """Base class for errors caused by user input (bad file, bad option, missing model)."""


class ConfigError(PneumoscanError, ValueError):
    """A setting or option has a value that cannot be used (out of range, unknown choice)."""


class DataError(PneumoscanError, ValueError):
    """A dataset folder or manifest is missing, empty or not in a known layout."""


class ImageError(PneumoscanError, ValueError):
    """An image file cannot be decoded, is of a refused format or is too large."""


class UnsupportedFormatError(ImageError):
    """The file is a real image but of a format outside the allow-list (TIFF, GIF, ...)."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured limit (decompression bomb guard)."""


class OutOfScopeError(ImageError):
    """The input is not a pediatric frontal chest X-ray the model can read (the out-of-scope gate)."""


class ModelError(PneumoscanError):
    """A model directory is missing, incomplete, or its weights fail the integrity check."""


class WeightsError(PneumoscanError):
    """Pretrained weights cannot be had (offline, no file given) and were not waived."""


class DownloadError(PneumoscanError):
    """A download failed or its checksum did not match."""
