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
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from synthetic import chest

from pneumoscan import INTENDED_USE, LABELS
from pneumoscan.cli import main
from pneumoscan.cli.main import build_parser
from pneumoscan.errors import ModelError, PneumoscanError
from pneumoscan.predict import Predictor
from pneumoscan.predict import check_model as check_model_dir
from pneumoscan.web.app import create_app
from pneumoscan.web.config import ServeConfig
from pneumoscan.web.limits import safe_name
from pneumoscan.web.service import Service


def jpeg(size: int = 128, seed: int = 0) -> bytes:  # 128 px: the smallest side in scope
    a = chest(size, seed=seed)  # chest-like, so that the out-of-scope gate lets it through
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def noise(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def jpeg_from(a: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
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


BASE = "http://127.0.0.1:8000"  # a Host the default bind serves (TestClient's 'testserver' is refused)


@contextmanager
def serve(model_dir: Path, raise_server_exceptions: bool = True, **kw):
    """A TestClient on a fresh app (lifespan run), once the model is ready."""
    app = create_app(ServeConfig(model_dir=str(model_dir), **kw))
    with TestClient(app, base_url=BASE, raise_server_exceptions=raise_server_exceptions) as client:
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
    assert j["in_scope"] is True and j["reasons"] == [] and j["verdict"] == j["label"]
    small = post(client, jpeg(96)).json()  # 96 px: the scope check stops it, a 200 without a diagnosis
    assert small["in_scope"] is False and small["label"] is None and "too small" in small["reasons"][0]


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
    ds.PixelData = (4095 - _xray_like(160)).astype(np.uint16).tobytes()  # MONOCHROME1: 0 is white
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


def test_the_page_template_is_not_served_raw(client):
    """/static/index.html served the template itself: a literal {{INTENDED_USE}} and no Content-Security-Policy."""
    r = client.get("/static/index.html")
    assert r.status_code == 404 and "INTENDED_USE" not in r.text
    assert client.get("/static/app.js").status_code == 200


def test_openapi_docs(client):
    spec = client.get("/openapi.json").json()
    assert INTENDED_USE in spec["info"]["description"]
    assert {"/api/predict", "/api/explain", "/healthz", "/readyz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_readyz_is_503_until_loaded(model_dir):
    app = create_app(ServeConfig(model_dir=str(model_dir)))
    client = TestClient(app, base_url=BASE)  # no lifespan yet: nothing loaded
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
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=B"), *headers],
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
        r = post(c, png(noise(200)), "big.png")
        assert r.status_code == 413 and "limit of 20,000" in r.json()["detail"]
        assert post(c, png(noise(100)), "ok.png").status_code == 200


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
    # a text part where the file belongs: said in the user's terms, not pydantic's ("Expected UploadFile ...")
    assert r.status_code == 422 and "holds text, not a file" in r.json()["detail"] and "UploadFile" not in r.text


# -- bounded concurrency and deadlines --------------------------------------------------------------------

def test_queue_full_is_503_after_the_queue_wait_with_retry_after(model_dir):
    with serve(model_dir, workers=1, queue=0, deadline_s=60, queue_wait_ms=50) as c:
        gate = threading.Event()
        held = c.service.limiter.submit(gate.wait)  # the only worker is busy
        try:
            r = post(c, jpeg())
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        finally:
            gate.set()
            held.result(5)
        assert post(c, jpeg()).status_code == 200


def test_a_request_that_finds_the_queue_full_is_served_when_a_slot_frees_within_the_wait(model_dir):
    with serve(model_dir, workers=1, queue=0, deadline_s=60, queue_wait_ms=20_000) as c:
        gate = threading.Event()
        held = c.service.limiter.submit(gate.wait)  # the only worker is busy
        got: list = []
        t = threading.Thread(target=lambda: got.append(post(c, jpeg())))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.3)
        assert not got  # held at the door, not refused
        gate.set()
        held.result(5)
        t.join(30)
        assert got[0].status_code == 200 and time.monotonic() - t0 >= 0.3


def test_queue_wait_zero_refuses_at_once(model_dir):
    with serve(model_dir, workers=1, queue=0, deadline_s=60, queue_wait_ms=0) as c:
        gate = threading.Event()
        held = c.service.limiter.submit(gate.wait)
        try:
            r = post(c, jpeg())
            assert r.status_code == 503 and r.json()["code"] == "busy" and r.headers["retry-after"] == "1"
        finally:
            gate.set()
            held.result(5)


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


# -- #13 defect 1: a malformed DICOM (or any file) is never a 500 ---------------------------------------

def _xray_like(side: int = 160, seed: int = 0) -> np.ndarray:
    """12-bit 'X-ray' values: chest-like structure plus noise (not blank, not uniform)."""
    return chest(side, seed=seed, scale=16.0)


def _patch(data: bytes, tag: bytes, value: bytes) -> bytes:
    """Overwrite the value of the explicit-VR element ``tag`` (4 bytes, little endian) keeping its length."""
    i = data.index(tag)
    n = int.from_bytes(data[i + 6:i + 8], "little")
    assert len(value) == n, (value, n)
    return data[:i + 8] + value + data[i + 8 + n:]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values
@pytest.mark.parametrize("case", ["window-center-abc", "rescale-slope-x", "rows-bad-vr", "rows-vr-DS", "frames-bad"])
def test_malformed_dicom_headers_are_never_500(client, make_dicom, case):
    a = _xray_like()
    if case == "window-center-abc":
        data = _patch(make_dicom(a, WindowCenter="2001", WindowWidth="400"), b"\x28\x00\x50\x10", b"abc ")
    elif case == "rescale-slope-x":
        data = _patch(make_dicom(a, RescaleSlope="7", RescaleIntercept="0"), b"\x28\x00\x53\x10", b"x ")
    elif case == "frames-bad":
        data = _patch(make_dicom(a, NumberOfFrames="1"), b"\x28\x00\x08\x00", b"x ")
    else:
        data = bytearray(make_dicom(a))
        i = data.index(b"\x28\x00\x10\x00US")
        data[i + 4:i + 6] = b"ZZ" if case == "rows-bad-vr" else b"DS"
        data = bytes(data)
    for path in ("/api/predict", "/api/explain"):
        r = post(client, data, "scan.dcm", path=path)
        assert r.status_code in (200, 400), (path, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["detail"].startswith("scan.dcm: ") and "Traceback" not in r.text
    r = post(client, data, "scan.dcm")
    if case in ("window-center-abc", "rescale-slope-x"):  # display hints only: skipped, and said so
        assert r.status_code == 200 and any("unusable" in w for w in r.json()["warnings"]), r.text


def _mutants(data: bytes, n: int, seed: int, head: int = 1024):
    """``n`` single-byte mutations of ``data``, seeded; 3 in 4 land in the first ``head`` bytes (headers)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = bytearray(data)
        hi = len(b) if rng.random() < 0.25 else min(len(b), head)
        b[int(rng.integers(0, hi))] = int(rng.integers(0, 256))
        yield bytes(b)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value it reads
def test_fuzzed_uploads_never_500(model_dir, make_dicom):
    """3,000 seeded single-byte mutations of a DICOM, a PNG and a JPEG: no 500 (on main: 11+ crashes in DICOM)."""
    dcm = make_dicom(_xray_like(32), WindowCenter="2000", WindowWidth="400", RescaleSlope="1", RescaleIntercept="0")
    pic = np.asarray(_xray_like(48) / 16, np.uint8)
    seeds = {"scan.dcm": (dcm, 1600), "scan.png": (png(pic), 700), "scan.jpg": (jpeg(48), 700)}
    statuses: dict[str, Counter] = {}
    with serve(model_dir, raise_server_exceptions=False) as c:
        for name, (data, n) in seeds.items():
            statuses[name] = Counter(post(c, m, name).status_code for m in _mutants(data, n, seed=len(name)))
    assert all(500 not in s for s in statuses.values()), statuses
    assert all(set(s) <= {200, 400, 413, 415, 422} for s in statuses.values()), statuses
    assert all(s[200] > 0 and sum(s.values()) - s[200] > 0 for s in statuses.values()), statuses  # both kinds seen


def test_an_unexpected_exception_is_a_generic_logged_500(model_dir, caplog):
    with serve(model_dir, raise_server_exceptions=False) as c:
        def broken(*args):
            raise RuntimeError("secret internals at /opt/x")
        c.service.prepare = broken  # what the prediction route runs on a worker
        with caplog.at_level("ERROR", logger="pneumoscan.web.app"):
            r = post(c, jpeg())
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "internal" and "secret" not in r.text and "RuntimeError" not in r.text
    ref = body["detail"].split("logged as ")[1].split(")")[0]
    assert any(ref in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the traceback is in the log


# -- #13 defect 2: multi-frame DICOM is held to the pixel limit before decoding ------------------------

def test_multi_frame_dicom_refused_before_decoding(client, make_dicom):
    import psutil

    frames = np.zeros((4, 16, 16), np.uint16)
    data = bytearray(make_dicom(frames))  # then declare 75 frames of 4096 x 4096 (1.26 G pixels)
    data = data.replace(b"\x28\x00\x10\x00US\x02\x00\x10\x00", b"\x28\x00\x10\x00US\x02\x00\x00\x10")
    data = data.replace(b"\x28\x00\x11\x00US\x02\x00\x10\x00", b"\x28\x00\x11\x00US\x02\x00\x00\x10")
    data = _patch(bytes(data), b"\x28\x00\x08\x00", b"75")
    rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    r = post(client, data, "cine.dcm")
    assert r.status_code == 413 and "75 frames" in r.json()["detail"], r.text
    assert time.perf_counter() - t0 < 1.0 and psutil.Process().memory_info().rss - rss < 100 * 2**20


def test_multi_frame_dicom_under_the_limit_uses_its_first_frame(client, make_dicom):
    a = _xray_like(160)
    frames = np.stack([a, a[::-1], a[:, ::-1]])
    one = post(client, make_dicom(a), "one.dcm").json()
    three = post(client, make_dicom(frames), "three.dcm").json()
    assert three["probabilities"] == pytest.approx(one["probabilities"], abs=1e-6)


# -- #13 defect 6: blank images are refused, truncated JPEGs flagged --------------------------------------

@pytest.mark.parametrize("name,data", [
    ("grey.png", png(np.full((300, 300), 128, np.uint8))),
    ("white.png", png(np.full((300, 300), 255, np.uint8))),
    ("black.png", png(np.zeros((300, 300), np.uint8))),
    ("almost.png", png((128 + np.random.default_rng(0).integers(-1, 2, (300, 300))).astype(np.uint8))),
    ("flat.jpg", jpeg_from(np.full((300, 300), 90, np.uint8))),
], ids=["grey", "white", "black", "near-constant", "flat-jpeg"])
def test_blank_images_are_refused(client, name, data):
    r = post(client, data, name)
    assert r.status_code == 422 and r.json()["code"] == "blank_image", r.text
    assert r.json()["detail"].startswith(f"{name}: image is blank")


def test_black_25_megapixel_image_refused(model_dir):
    with serve(model_dir) as c:
        r = post(c, png(np.zeros((5000, 5000), np.uint8)), "black.png")
    assert r.status_code == 422 and r.json()["code"] == "blank_image"


def test_truncated_jpeg_is_flagged(client):
    yy, xx = np.mgrid[0:256, 0:256]
    full = jpeg_from((128 + 60 * np.sin(xx / 9) * np.cos(yy / 13)).astype(np.uint8))
    cut = full[:int(len(full) * 0.6)] + b"\xff\xd9"  # data ends early, the end marker is there: libjpeg fills grey
    r = post(client, cut, "cut.jpg")  # a damaged film: out of scope (#14), a 200 with no diagnosis
    j = r.json()
    assert r.status_code == 200 and j["in_scope"] is False and j["label"] is None, r.text
    assert any("JPEG data ends early" in w for w in j["reasons"]) and j["verdict"] == "not a pediatric frontal chest X-ray"
    ok = post(client, full, "full.jpg").json()
    assert not any("ends early" in w for w in ok["reasons"] + ok["warnings"])


# -- #13 defect 7: one error schema (RFC 9457), response models, HEAD, one file part ----------------------

PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "code"}


def test_every_error_is_problem_details(client):
    cases = {
        "missing-file": lambda: client.post("/api/predict"),
        "bad-image": lambda: post(client, b"garbage", "x.png"),
        "tiff": lambda: post(client, _tiff(), "x.tif"),
        "bomb": lambda: post(client, png_bomb(), "bomb.png"),
        "not-found": lambda: client.get("/nope"),
        "method": lambda: client.delete("/healthz"),
        "host": lambda: client.get("/healthz", headers={"host": "evil.example"}),
    }
    for what, call in cases.items():
        r = call()
        assert r.status_code >= 400 and r.headers["content-type"] == "application/problem+json", (what, r.text)
        body = r.json()
        assert PROBLEM_KEYS <= set(body) and body["status"] == r.status_code and isinstance(body["detail"], str), what
    missing = client.post("/api/predict").json()
    assert missing["status"] == 422 and missing["errors"][0]["loc"] == ["body", "file"]  # was a bare list


def test_two_file_parts_are_refused(client):
    r = client.post("/api/predict", files=[("file", ("a.jpg", jpeg(seed=1), "image/jpeg")),
                                           ("file", ("b.jpg", jpeg(seed=2), "image/jpeg"))])
    assert r.status_code == 400 and r.json()["code"] == "one_file" and "got 2" in r.json()["detail"]  # was a silent 200


def test_openapi_documents_bodies_and_errors(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    predict = spec["paths"]["/api/predict"]["post"]["responses"]
    ref = predict["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"pneumonia_probability", "compute_ms", "elapsed_ms", "probabilities", "warnings"} <= set(schemas[ref]["properties"])
    for code in ("400", "413", "415", "422", "503"):
        assert predict[code]["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem"), code
    for path in ("/healthz", "/readyz", "/api/info"):
        assert "$ref" in spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"], path
    assert "503" in spec["paths"]["/api/explain"]["post"]["responses"]


def test_head_of_page_and_probes(client):
    for path in ("/", "/healthz", "/readyz", "/api/info", "/api/card"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path  # was 405
    assert client.get("/favicon.ico").status_code == 200


def test_prediction_keys_match_the_model(client):
    j = post(client, jpeg(128), "x.jpg").json()
    assert set(j) == {"label", "probabilities", "pneumonia", "pneumonia_probability", "threshold", "model", "warnings",
                      "image", "compute_ms", "elapsed_ms", "in_scope", "verdict", "prediction_set", "ood_score", "reasons",
                      "preview"}
    assert j["preview"] is None and j["prediction_set"] is None and j["ood_score"] is None  # uncalibrated test model
    assert j["image"] == {"format": "jpeg", "mode": "L", "width": 128, "height": 128}
    with_preview = client.post("/api/predict?preview=true", files={"file": ("x.jpg", jpeg(128), "image/jpeg")}).json()
    assert with_preview["preview"].startswith("data:image/jpeg;base64,")


# -- #13 defect 9: trusted hosts from --host ---------------------------------------------------------

def test_host_header_checked_against_the_bind(model_dir):
    app = create_app(ServeConfig(model_dir=str(model_dir)))
    c = TestClient(app, base_url=BASE)
    for host, status in [("127.0.0.1:8000", 200), ("localhost", 200), ("[::1]:8000", 200), ("evil.example", 400),
                         ("127.0.0.1.evil.example", 400), ("", 400)]:
        r = c.get("/healthz", headers={"host": host})
        assert r.status_code == status, (host, r.text)
    assert ServeConfig(host="0.0.0.0").trusted_hosts() == ["*"]
    assert ServeConfig(host="10.1.2.3").trusted_hosts() == ["10.1.2.3"]
    named = TestClient(create_app(ServeConfig(model_dir=str(model_dir), allowed_hosts=("xray.example.org", "*.lab.org"))),
                       base_url="http://xray.example.org")
    assert named.get("/healthz").status_code == 200
    assert named.get("/healthz", headers={"host": "ct.lab.org"}).status_code == 200
    assert named.get("/healthz", headers={"host": "localhost"}).status_code == 400
    with pytest.raises(PneumoscanError, match="allowed-hosts"):
        ServeConfig(allowed_hosts=("a.*.org",))


# -- #13 defect 10: file names in messages ------------------------------------------------------------------

def test_file_names_in_messages_keep_their_script():
    assert safe_name("Röntgen_胸部_ß.dcm") == "Röntgen_胸部_ß.dcm"  # was R_ntgen_____.dcm
    assert safe_name("x\u202egnp.exe") == "x_gnp.exe"  # a bidi override cannot disguise the name
    long = safe_name("a" * 5000 + ".jpeg")
    assert len(long) <= 80 and long.endswith("\u2026.jpeg")


def test_non_ascii_and_long_names_in_responses(client):
    r = post(client, b"garbage", "Röntgen_胸部.png")
    assert r.json()["detail"].startswith("Röntgen_胸部.png: ")
    r = post(client, b"garbage", "b" * 1000 + ".png")
    assert r.status_code == 400 and r.json()["detail"].startswith("b" * 60) and "\u2026.png: " in r.json()["detail"]
    r = post(client, jpeg(), "c" * 5000 + ".jpg")  # over python-multipart's 4 KiB part-header limit: a clear 400
    assert r.status_code == 400 and "file name" in r.json()["detail"]


# -- #13 defect 8: /docs and /redoc from the package --------------------------------------------------------

def test_docs_served_without_a_cdn(client):
    import re

    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: *["']([^"']+)["']""", r.text)
        urls = [u for pair in urls for u in pair if u]
        assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], (page, urls)
        for u in urls:
            assert client.get(u).status_code == 200, u
        assert "fonts.googleapis" not in r.text and "cdn.jsdelivr" not in r.text


# -- #13 defects 3 and 4 (app side): bytes in flight and body time --------------------------------------------

def _asgi(app, scope_headers, receive):
    out: dict = {"body": b"", "headers": {}}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = dict(msg["headers"])
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": scope_headers}
    return app(scope, receive, send), out


def test_bytes_in_flight_are_capped():
    from pneumoscan.web.limits import BodyLimitMiddleware, InFlight

    gate = asyncio.Event()

    async def app(scope, receive, send):  # holds its body until the gate opens
        while (await receive()).get("more_body"):
            pass
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = BodyLimitMiddleware(app, max_bytes=1000, inflight=InFlight(1500))

    def request(n: int):
        async def receive():
            return {"type": "http.request", "body": b"x" * n, "more_body": False}
        return _asgi(mw, [(b"content-length", str(n).encode())], receive)

    async def main():
        first, out1 = request(900)
        task = asyncio.ensure_future(first)
        await asyncio.sleep(0.01)
        second, out2 = request(900)
        await second  # 900 + 900 > 1500: refused at once
        gate.set()
        await task
        third, out3 = request(900)
        await third
        return out1, out2, out3

    out1, out2, out3 = asyncio.run(main())
    assert out1["status"] == 200 and out3["status"] == 200 and mw.inflight.held == 0
    assert out2["status"] == 503 and out2["headers"][b"retry-after"] == b"2" and b"busy_uploads" in out2["body"]


def test_slow_body_is_a_408():
    from pneumoscan.web.limits import BodyLimitMiddleware

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    mw = BodyLimitMiddleware(app, max_bytes=10_000, body_timeout_s=0.3)

    async def trickle():
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def main():
        coro, out = _asgi(mw, [(b"content-length", b"9000")], trickle)
        t0 = time.perf_counter()
        await coro
        return out, time.perf_counter() - t0

    out, dt = asyncio.run(main())
    assert out["status"] == 408 and out["headers"][b"connection"] == b"close" and dt < 1.0


# -- #13 defect 5: explanations on their own queue, without torch ----------------------------------------------

def test_explanations_never_take_the_prediction_workers(model_dir):
    with serve(model_dir, explain_workers=1, explain_queue=0) as c:
        gate = threading.Event()
        held = c.service.explain_limiter.submit(gate.wait)  # the explanation worker is busy
        try:
            r = post(c, jpeg(), path="/api/explain")
            assert r.status_code == 503 and r.json()["code"] == "busy" and r.headers["retry-after"] == "1"
            t0 = time.perf_counter()
            assert post(c, jpeg()).status_code == 200 and time.perf_counter() - t0 < 2  # predictions go on
        finally:
            gate.set()
            held.result(5)
        assert post(c, jpeg(), path="/api/explain").status_code == 200


def test_explain_uses_the_onnx_cam(client):
    assert client.service.predictor.has_cam and client.get("/api/info").json()["explain_status"] == "ready"
    r = post(client, jpeg(size=128), path="/api/explain")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def _legacy_export(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose ONNX has only ``logits``, like exports made before #13 (the shipped model's)."""
    import onnx

    from pneumoscan.io import atomic_write_json, file_digest

    d = shutil.copytree(src, dst)
    m = onnx.load(str(d / "model.onnx"))
    del m.graph.output[1:]
    onnx.save(m, str(d / "model.onnx"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["files"]["model.onnx"] = file_digest(d / "model.onnx")
    for key in ("outputs", "features", "cam"):
        cfg["onnx"].pop(key, None)
    atomic_write_json(d / "config.json", cfg)
    return d


SERVICE_PROBE = """
import io, json, sys, time
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from pneumoscan.web.app import create_app
from pneumoscan.web.config import ServeConfig
sys.path.insert(0, sys.argv[2]); from synthetic import chest  # chest-like: in scope for the gate
buf = io.BytesIO(); Image.fromarray(chest(128)).save(buf, "PNG")
files = {"file": ("x.png", buf.getvalue(), "image/png")}
out = {}
with TestClient(create_app(ServeConfig(model_dir=sys.argv[1])), base_url="http://127.0.0.1") as c:
    assert c.app.state.service.ready.wait(120)
    out["predict"] = c.post("/api/predict", files=files).status_code
    out["explain_first"] = c.post("/api/explain", files=files).status_code
    deadline = time.monotonic() + 300
    while c.get("/api/info").json()["explain_status"] in ("loading", "preparing") and time.monotonic() < deadline:
        time.sleep(0.5)
    out["info"] = c.get("/api/info").json()["explain_status"]
    r = c.post("/api/explain", files=files)
    out["explain"] = [r.status_code, r.headers["content-type"]]
    out["predict_after"] = c.post("/api/predict", files=files).status_code
out["torch"] = [m for m in ("torch", "timm", "captum") if m in sys.modules]
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cam-export", "legacy-export"])
def test_the_service_explains_without_torch(model_dir, tmp_path, kind):
    """Predictions and explanations in a server process that never imports torch: from the export's CAM
    output, or for an older export (the shipped model's) from a copy re-exported in a child process."""
    import subprocess
    import sys

    d = model_dir if kind == "cam-export" else _legacy_export(model_dir, tmp_path / "legacy")
    r = subprocess.run([sys.executable, "-c", SERVICE_PROBE, str(d), str(Path(__file__).parents[1])],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["predict"] == 200 and out["predict_after"] == 200 and out["info"] == "ready"
    assert out["explain"] == [200, "image/png"] and out["torch"] == [], out
    assert out["explain_first"] == (200 if kind == "cam-export" else 503)  # 503 + Retry-After while re-exporting


@pytest.mark.slow
def test_a_guarded_int8_model_is_served_and_its_guard_counted(model_dir, tmp_path):
    """The service runs a model whose INT8 export has a guard: /api/info says so and counts the images the guard
    sent back to fp32; each answer is fp32's verdict where it was sent back."""
    import shutil

    from pneumoscan.cli import main
    from pneumoscan.predict import Predictor

    d = shutil.copytree(model_dir, tmp_path / "int8")
    assert main(["-q", "calibrate", "--model", str(d), "--pca-dim", "4"]) == 0
    assert main(["-q", "export", "--model", str(d), "--int8", "--min-agreement", "0.5"]) == 0
    exact = Predictor(d, backend="onnx", precision="fp32")
    with serve(d, precision="int8") as c:
        before = c.get("/api/info").json()
        assert before["precision"] == "int8" and "guard" in before["precision_reason"]
        assert before["int8_guard"]["images"] >= 1  # the warm-up's predictions count too
        bodies = [jpeg(seed=s) for s in range(4)]
        got = [post(c, b).json() for b in bodies]
        info = c.get("/api/info").json()
        assert info["int8_guard"]["images"] == before["int8_guard"]["images"] + 4
        assert 0 <= info["int8_guard"]["fp32"] <= info["int8_guard"]["images"]
        want = [exact.predict_bytes(b).verdict for b in bodies]
        assert sum(g["verdict"] == w for g, w in zip(got, want)) >= 3  # the tiny random net: most verdicts agree
    with serve(model_dir) as c:
        assert c.get("/api/info").json()["int8_guard"] is None  # no INT8 export: nothing to count
