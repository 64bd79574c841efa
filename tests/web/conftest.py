"""Fixtures of the web tests: the tiny model with its ONNX export, and a live server on 127.0.0.1."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with its ONNX export (logits, features and the Grad-CAM output)."""
    from pneumoscan.export.onnx import export_onnx

    d = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("web") / "tiny")
    export_onnx(d)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model_dir: Path, **kw):
    """The real server (uvicorn with pneumoscan's protocol bounds) in a thread; yields (url, app)."""
    import uvicorn

    from pneumoscan.web.app import create_app
    from pneumoscan.web.config import ServeConfig
    from pneumoscan.web.server import uvicorn_config

    cfg = ServeConfig(model_dir=str(model_dir), port=free_port(), **kw)
    app = create_app(cfg)
    srv = uvicorn.Server(uvicorn_config(app, cfg, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert app.state.service.error is None, app.state.service.error
        time.sleep(0.1)
    else:
        pytest.fail("server did not become ready")
    try:
        yield url, app
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def live(model_dir):
    """``live(**serve_settings)``: a context manager running the real server; yields (url, app)."""
    return lambda **kw: live_server(model_dir, **kw)


def _dicom(pixels, frames: int = 1, photometric: str = "MONOCHROME2", **extra) -> bytes:
    """A Secondary Capture DICOM (16-bit, uncompressed) holding ``pixels`` (H x W, or F x H x W)."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    a = np.asarray(pixels, np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = a.shape[-2:]
    if a.ndim == 3:
        ds.NumberOfFrames = a.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = a.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def make_dicom():
    """``make_dicom(pixels, **elements)``: the bytes of a small uncompressed DICOM file."""
    pytest.importorskip("pydicom")
    return _dicom
