"""The web service: API schema, page, probes and every hardening case of the issue (FastAPI app)."""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pneumoscan import INTENDED_USE, LABELS
from pneumoscan.cli import main
from pneumoscan.cli.main import build_parser
from pneumoscan.errors import ModelError
from pneumoscan.export.onnx import export_onnx
from pneumoscan.predict import Predictor
from pneumoscan.predict import check_model as check_model_dir
from pneumoscan.web.app import create_app
from pneumoscan.web.config import ServeConfig
from pneumoscan.web.limits import safe_name
from pneumoscan.web.service import Service


def jpeg(size: int = 96, seed: int = 0) -> bytes:
    a = np.random.default_rng(seed).normal(120, 30, (size, size)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with its ONNX export."""
    d = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("web") / "tiny")
    export_onnx(d)
    return d


@contextmanager
def serve(model_dir: Path, **kw):
    """A TestClient on a fresh app (lifespan run), once the model is ready."""
    app = create_app(ServeConfig(model_dir=str(model_dir), **kw))
    with TestClient(app) as client:
        assert app.state.service.ready.wait(60) or app.state.service.error, "model did not load"
        client.service = app.state.service
        yield client


@pytest.fixture(scope="module")
def client(model_dir):
    with serve(model_dir) as c:
        yield c


def post(client, data: bytes, name: str = "x.jpg", path: str = "/api/predict"):
    return client.post(path, files={"file": (name, data, "application/octet-stream")})


# -- API, page, probes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_schema_and_agreement_with_torch(client, model_dir):
    data = jpeg(seed=1)
    r = post(client, data)
    assert r.status_code == 200, r.text
    j = r.json()
    assert {"label", "probabilities", "pneumonia", "threshold", "model", "elapsed_ms", "warnings"} <= set(j)
    assert list(j["probabilities"]) == list(LABELS) and abs(sum(j["probabilities"].values()) - 1) < 1e-5
    cfg = json.loads((model_dir / "config.json").read_text())
    assert j["threshold"] == pytest.approx(cfg["threshold"]) and j["model"] == cfg["model_id"]
    assert j["pneumonia"] == (j["pneumonia_probability"] >= j["threshold"]) and j["elapsed_ms"] > 0
    ref = Predictor(model_dir, backend="torch").predict_bytes(data)
    assert j["label"] == ref.label
    assert max(abs(j["probabilities"][k] - ref.probabilities[k]) for k in LABELS) <= 1e-4
    assert any("very small image" in w for w in j["warnings"])  # 96 px: the scope check speaks


def test_dicom_upload(client):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 160
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (160, 160)).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = post(client, buf.getvalue(), "scan.dcm")
    assert r.status_code == 200, r.text
    assert r.json()["label"] in LABELS and r.json()["warnings"] == []


def test_page_shows_intended_use_and_is_locked_down(client):
    r = client.get("/")
    assert r.status_code == 200 and INTENDED_USE in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_openapi_docs(client):
    spec = client.get("/openapi.json").json()
    assert INTENDED_USE in spec["info"]["description"]
    assert {"/api/predict", "/api/explain", "/healthz", "/readyz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_readyz_is_503_until_loaded(model_dir):
    app = create_app(ServeConfig(model_dir=str(model_dir)))
    client = TestClient(app)  # no lifespan yet: nothing loaded
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and "loading" in r.json()["detail"]
    assert post(client, jpeg()).status_code == 503
    with client:
        assert app.state.service.ready.wait(60)
        assert client.get("/readyz").status_code == 200


@pytest.mark.slow
def test_serves_a_model_without_onnx_by_exporting_a_temp_copy(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir, tmp_path / "plain")
    before = sorted(p.name for p in d.iterdir())
    with serve(d) as c:
        assert c.service.predictor.backend == "onnx"
        assert post(c, jpeg()).status_code == 200
        assert c.service.predictor.model_dir == d
        tmp = c.service.predictor.onnx_path.parent
        assert tmp != d and (tmp / "model.onnx").is_file()
    assert sorted(p.name for p in d.iterdir()) == before  # the user's model folder is untouched
    assert not tmp.exists()  # the temp export is cleaned up at shutdown


# -- upload size: 413 before the body is held, whatever Content-Length says ----------------------------

def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int, bytes]:
    """Drive the ASGI app directly; returns (status, receive calls, body) so reads can be counted."""
    calls = 0
    out: dict = {"body": b""}

    async def receive():
        nonlocal calls
        calls += 1
        if calls <= len(chunks):
            return {"type": "http.request", "body": chunks[calls - 1], "more_body": calls < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"multipart/form-data; boundary=B"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return out["status"], calls, out["body"]


@pytest.fixture(scope="module")
def small_limit_app(model_dir):
    app = create_app(ServeConfig(model_dir=str(model_dir), max_upload_mb=1000 / 2**20))
    app.state.service.ready.set()  # the size check comes before any model work; no load needed here
    return app


def test_413_declared_length_before_reading(small_limit_app):
    status, calls, body = _asgi_post(small_limit_app, [(b"content-length", b"5000")], [b"x" * 5000])
    assert status == 413 and calls == 0 and b"limit" in body


def test_413_lying_content_length(small_limit_app):
    chunks = [b"--B\r\n" + b"x" * 595, b"x" * 600, b"x" * 600, b"x" * 600]
    status, calls, _ = _asgi_post(small_limit_app, [(b"content-length", b"100")], chunks)
    assert status == 413 and calls == 2  # stopped at the chunk that crossed the limit


def test_413_without_content_length(small_limit_app):
    chunks = [b"--B\r\n" + b"x" * 595] * 10
    status, calls, _ = _asgi_post(small_limit_app, [], chunks)
    assert status == 413 and calls == 2


def test_413_default_limit_chunked_upload(client):
    def body():
        for _ in range(21):
            yield b"\0" * 2**20
    r = client.post("/api/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413 and "20 MiB" in r.json()["detail"]
    r = post(client, b"\xff\xd8\xff" + b"\0" * (20 * 2**20))  # a 'JPEG' one byte too many... and more
    assert r.status_code == 413


# -- bad images: 4xx with a message, never 500 -----------------------------------------------------------

def test_decompression_bomb_refused_fast(client):
    import psutil

    rss = psutil.Process().memory_info().rss
    r = post(client, png_bomb(), "bomb.png")
    assert r.status_code == 413 and "pixels" in r.json()["detail"] and r.json()["detail"].startswith("bomb.png: ")
    assert psutil.Process().memory_info().rss - rss < 100 * 2**20  # decoding would take 2.5 GB


def test_own_pixel_limit(model_dir):
    with serve(model_dir, max_pixels=20_000) as c:
        r = post(c, png(np.zeros((200, 200), np.uint8)), "big.png")
        assert r.status_code == 413 and "limit of 20,000" in r.json()["detail"]
        assert post(c, png(np.zeros((100, 100), np.uint8)), "ok.png").status_code == 200


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("name,data,status", [
    ("empty.jpg", b"", 400),
    ("random.png", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), 400),
    ("truncated.jpg", jpeg()[:400], 400),
    ("truncated.png", png(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))[:2000], 400),
    ("notes.png", b"<html>not an image</html>", 400),
    ("scan.dcm", b"\0" * 128 + b"DICM" + b"\0" * 40, 400),
    ("scan.jpg", _tiff(), 415),
    ("scan.png", b"GIF89a" + b"\0" * 64, 415),
    ("scan.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n", 415),
    ("scan.png", b"BM" + b"\0" * 64, 415),
], ids=["empty", "random", "truncated-jpeg", "truncated-png", "html-as-png", "broken-dicom", "tiff-as-jpg",
        "gif-as-png", "eps-as-jpg", "bmp-as-png"])
def test_bad_files_are_4xx_with_message(client, name, data, status):
    r = post(client, data, name)
    assert r.status_code == status, r.text
    assert r.json()["detail"].startswith(f"{name}: ")


def test_content_decides_not_the_name(client):
    assert post(client, jpeg(), "scan.png").status_code == 200


def test_client_name_never_a_path(client, tmp_path):
    r = post(client, b"garbage", "../../../../tmp/evil\x00.png")
    detail = r.json()["detail"]
    assert r.status_code == 400 and detail.startswith("evil") and "/" not in detail.split(":")[0]
    assert safe_name("..\\..\\windows\\x.dcm") == "x.dcm" and safe_name("../") == "upload" and safe_name(None) == "upload"


def test_missing_file_field_and_url_instead_of_file(client):
    assert client.post("/api/predict").status_code == 422
    r = client.post("/api/predict", data={"file": "http://127.0.0.1:9/x.png"})  # a URL is not fetched
    assert 400 <= r.status_code < 500


# -- bounded concurrency and deadlines --------------------------------------------------------------------

def test_queue_full_is_503_at_once_with_retry_after(model_dir):
    with serve(model_dir, workers=1, queue=0, deadline_s=60) as c:
        gate = threading.Event()
        held = c.service.limiter.submit(gate.wait)  # the only worker is busy
        try:
            r = post(c, jpeg())
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        finally:
            gate.set()
            held.result(5)
        assert post(c, jpeg()).status_code == 200


@pytest.mark.slow
def test_deadline_is_503_and_the_next_request_succeeds(model_dir):
    with serve(model_dir, workers=1, queue=4, deadline_s=0.5) as c:
        gate = threading.Event()
        held = c.service.limiter.submit(gate.wait)  # a long job ahead in the queue
        try:
            r = post(c, jpeg())
            assert r.status_code == 503 and "deadline" in r.json()["detail"] and "retry-after" in r.headers
        finally:
            gate.set()
            held.result(5)
        deadline = time.monotonic() + 5
        while c.service.limiter.pending and time.monotonic() < deadline:  # the expired job is dropped
            time.sleep(0.01)
        assert post(c, jpeg()).status_code == 200


def test_concurrent_requests_all_served(client):
    results: list[int] = []

    def worker(seed: int) -> None:
        for k in range(3):
            results.append(post(client, jpeg(seed=seed * 10 + k)).status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 18


# -- weights integrity, binding, CLI ---------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["model.onnx", "model.safetensors"])
def test_tampered_weights_refused(model_dir, tmp_path, victim, capsys):
    d = shutil.copytree(model_dir, tmp_path / "m")
    data = bytearray((d / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / victim).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{victim} fails its integrity check"):
        check_model_dir(str(d))
    assert main(["serve", "--model", str(d), "--port", "1"]) == 2  # refused before binding anything
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error: ") and "integrity check" in err and len(err.splitlines()) == 1
    if victim == "model.onnx":  # the app itself refuses too, and says why on /readyz
        service = Service(ServeConfig(model_dir=str(d)))
        service.load()
        assert not service.ready.is_set() and "integrity check" in service.error
        service.close()


def test_default_bind_is_localhost():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.backend == "onnx"


# -- explanation overlay -------------------------------------------------------------------------------

def test_explain_returns_png(client):
    r = post(client, jpeg(size=128), path="/api/explain")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(r.content))
    assert min(im.size) >= 64
    assert post(client, b"garbage", "bad.png", path="/api/explain").status_code == 400
