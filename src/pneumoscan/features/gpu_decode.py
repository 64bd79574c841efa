"""JPEG decoding on the GPU for feature extraction (``--decode gpu``): files read by threads, decoded in
batches by nvJPEG.

The CPU only reads each file and its header (a thread pool: reading releases the GIL);
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG) decodes a whole batch to the grey (luma)
plane on the device, and the resize and the intensity step follow, so a uint8 (N, S, S) batch is
ready for the backbone without leaving the device. Files nvJPEG should not take (PNG, DICOM, CMYK,
EXIF-rotated, oversized or broken JPEGs) go through the CPU decoder
:func:`~pneumoscan.data.imaging.load_xray` one by one, which rotates, converts or refuses them with
the same one-line error as on a CPU.

Measured on one H200 with 16 cores (``pneumoscan bench gpu``, ``benchmarks/results/gpu.json``): the
same pixels as the CPU decoder on all 1,024 films compared, and 4,465 images/s end to end against
8,158 for 14 CPU decoding workers, because torchvision's batched decode runs its Huffman stage on the
calling thread. It is the choice for a GPU machine with few cores, not the default. Files more than
twice the input side are decoded whole and area-averaged rather than decoded at a reduced DCT scale
first, so they can differ from the CPU path by a few grey levels.
"""
from __future__ import annotations

import io
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.imaging import DEFAULT_MAX_PIXELS, load_xray
from ..errors import ImageError
from ..preprocess import Preprocess, PreprocessConfig

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
ORIENTATION = 0x0112  # EXIF tag: a rotated film goes to the CPU decoder, which applies it


def available(device) -> bool:
    """Whether nvJPEG decoding can run on ``device`` (a CUDA device and torchvision's GPU decoder)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _read(path: str) -> tuple[bytes | None, str, bool]:
    """The file's bytes, an error, and whether nvJPEG may take it: a baseline or progressive grey or
    RGB JPEG, upright (no EXIF rotation) and within the pixel limit; the header is read, not decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"{path}: cannot be read ({e.strerror or e}); check that the file exists and is readable", False
    if data[:3] != JPEG_MAGIC:
        return data, "", False
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            upright = im.getexif().get(ORIENTATION, 1) == 1
            return data, "", im.mode in ("L", "RGB") and 0 < w * h <= DEFAULT_MAX_PIXELS and upright
    except Exception:  # a broken header: the CPU decoder names what is wrong
        return data, "", False


def read_batches(paths: Sequence[str], batch_size: int, threads: int, ahead: int = 4) -> Iterator[list]:
    """Batches of ``(index, bytes or None, error, for nvJPEG)``, read by ``threads`` threads, ``ahead`` batches
    in flight."""
    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="pneumoscan-read") as pool:
        pending: deque = deque()

        def submit() -> None:
            s = next(starts, None)
            if s is not None:
                idx = range(s, min(s + batch_size, len(paths)))
                pending.append((idx, [pool.submit(_read, paths[i]) for i in idx]))

        for _ in range(ahead):
            submit()
        while pending:
            idx, futs = pending.popleft()
            submit()
            yield [(i, *f.result()) for i, f in zip(idx, futs)]  # (index, bytes or None, error, nvJPEG may take it)


class GpuDecoder:
    """Bytes of a batch -> (indices, uint8 (N, S, S) on ``device``, failures as (index, error))."""

    def __init__(self, prep: PreprocessConfig, device, paths: Sequence[str]) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.prep, self.device, self.paths = prep, torch.device(device), paths
        self._decode, self._gray = decode_jpeg, ImageReadMode.GRAY
        self._pre = Preprocess(prep)
        self._areas: dict[int, torch.Tensor] = {}
        self.on_gpu = 0  # images nvJPEG decoded
        self.on_cpu = 0  # images the CPU decoder took instead

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, list]:
        bad = [(i, err) for i, data, err, _ in items if data is None]
        jpeg = [(i, d) for i, d, _, gpu in items if d is not None and gpu]
        images, refused = self._gpu(jpeg)
        cpu = [(i, d) for i, d, _, gpu in items if d is not None and not gpu] + refused
        for i, d in cpu:
            try:
                images[i] = self._cpu(i, d)
            except ImageError as e:
                bad.append((i, str(e)))
        order = sorted(images)
        s = self.prep.size
        x = torch.stack([images[i] for i in order]) if order else torch.empty(0, s, s, dtype=torch.uint8)
        if self.prep.intensity != "none" and len(order):  # CLAHE / equalisation: OpenCV, as everywhere else
            x = torch.from_numpy(self._pre.intensity_batch(x.cpu().numpy())).to(self.device)
        return torch.tensor(order, dtype=torch.long), x, bad

    def _gpu(self, jpeg: list) -> tuple[dict[int, torch.Tensor], list]:
        """nvJPEG on the whole batch: the resized images by index, and the files it refused (for the CPU
        decoder, which names what is wrong with them); a batch it refuses is retried file by file."""
        if not jpeg:
            return {}, []
        datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in jpeg]
        try:
            out = self._decode(datas, mode=self._gray, device=self.device)
        except RuntimeError:
            out = []
            for t in datas:
                try:
                    out.append(self._decode(t, mode=self._gray, device=self.device))
                except RuntimeError:
                    out.append(None)
        images = {i: self._resize(img) for (i, _), img in zip(jpeg, out) if img is not None}
        self.on_gpu += len(images)
        return images, [(i, d) for (i, d), img in zip(jpeg, out) if img is None]

    def _resize(self, img: torch.Tensor) -> torch.Tensor:
        """(1, H, W) uint8 -> (S, S) uint8. Shrinking is OpenCV's INTER_AREA as two matrix products (the
        same pixels as the CPU path on same-size files); enlarging is bilinear (INTER_LINEAR's rule)."""
        s = self.prep.size
        h, w = img.shape[-2:]
        if (h, w) == (s, s):
            return img[0]
        x = img[0].float()
        if h >= s and w >= s:
            x = self._area(h) @ x @ self._area(w).T
        else:
            x = torch.nn.functional.interpolate(x[None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def _area(self, n: int) -> torch.Tensor:
        """(S, n) weights of area resampling from n to S pixels: each output averages the input it covers."""
        a = self._areas.get(n)
        if a is None:
            s = self.prep.size
            edges = torch.arange(s + 1, dtype=torch.float64) * (n / s)
            j = torch.arange(n, dtype=torch.float64)
            overlap = (torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)).clamp_(min=0)
            a = self._areas[n] = (overlap / (n / s)).float().to(self.device)
        return a

    def _cpu(self, i: int, data: bytes) -> torch.Tensor:
        self.on_cpu += 1
        x = load_xray(data, name=self.paths[i], size_hint=self.prep.size, colour=False)
        px = self._pre.resize_only(x.pixels)
        return torch.from_numpy(np.ascontiguousarray(px)).to(self.device)
