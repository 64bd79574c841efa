"""pneumoscan.data.download against a local HTTP server (127.0.0.1, threaded, with HTTP Range support).

No network: the server below serves a small ZIP that the test builds in the release's layout.
"""
from __future__ import annotations

import hashlib
import io
import re
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pneumoscan.cli import main
from pneumoscan.data.download import download_dataset, safe_extract
from pneumoscan.errors import DownloadError


class _Handler(BaseHTTPRequestHandler):
    """GET with optional Range (``bytes=N-``); can ignore Range, or drop the connection mid-body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.range_ok:
            start = int(re.match(r"bytes=(\d+)-$", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if srv.cut_at is not None:  # simulate a broken connection, once
            cut, srv.cut_at = srv.cut_at, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.range_ok, srv.cut_at = {}, [], True, None
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _release_zip() -> bytes:
    """A small ZIP in the release's layout (plus macOS junk that must be skipped)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("chest_xray/", "")
        for i in range(6):
            z.writestr(f"chest_xray/train/NORMAL/IM-{i:04d}-0001.jpeg", bytes([i]) * 4000)
            z.writestr(f"chest_xray/test/PNEUMONIA/person{i}_bacteria_{i}.jpeg", bytes([i + 100]) * 4000)
        z.writestr("__MACOSX/chest_xray/._IM-0000-0001.jpeg", b"junk")
    return buf.getvalue()


def _zip_with(name: str, data: bytes = b"x", symlink: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("chest_xray/train/NORMAL/IM-0001-0001.jpeg", b"ok")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, data)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith(".extract-") or p.suffix == ".part")


def test_full_download_extracts_and_records_sha(server, tmp_path):
    data = _release_zip()
    server.files["/ChestXRay2017.zip"] = data
    dest = tmp_path / "d"
    root = download_dataset(dest, url=server.base + "/ChestXRay2017.zip", progress=False)
    assert root == dest / "chest_xray"
    assert len(list((root / "train" / "NORMAL").iterdir())) == 6
    assert (root / "test" / "PNEUMONIA" / "person3_bacteria_3.jpeg").read_bytes() == bytes([103]) * 4000
    assert not (dest / "__MACOSX").exists()
    # no checksum was given: the computed one is recorded so that it can be pinned
    assert (dest / "ChestXRay2017.zip.sha256").read_text().split()[0] == _sha(data)
    assert _leftovers(dest) == []
    n = len(server.requests)
    assert download_dataset(dest, url=server.base + "/ChestXRay2017.zip", progress=False) == root
    assert len(server.requests) == n  # already there: no second download


def test_resume_after_interrupted_download(server, tmp_path):
    data = _release_zip()
    server.files["/ChestXRay2017.zip"] = data
    server.cut_at = len(data) // 3
    dest, url = tmp_path / "d", server.base + "/ChestXRay2017.zip"
    with pytest.raises(DownloadError, match="run the same command again"):
        download_dataset(dest, url=url, sha256=_sha(data), progress=False)
    part = dest / "ChestXRay2017.zip.part"
    assert 0 < part.stat().st_size < len(data)
    assert not (dest / "chest_xray").exists()
    have = part.stat().st_size
    root = download_dataset(dest, url=url, sha256=_sha(data), progress=False)
    assert server.requests[-1][1] == f"bytes={have}-"  # the second request resumed
    assert (dest / "ChestXRay2017.zip").read_bytes() == data
    assert len(list((root / "test" / "PNEUMONIA").iterdir())) == 6


def test_resume_of_a_partial_file_on_disk(server, tmp_path):
    data = _release_zip()
    server.files["/ChestXRay2017.zip"] = data
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "ChestXRay2017.zip.part").write_bytes(data[:5000])
    download_dataset(dest, url=server.base + "/ChestXRay2017.zip", sha256=_sha(data), extract=False, progress=False)
    assert server.requests == [("/ChestXRay2017.zip", "bytes=5000-")]
    assert (dest / "ChestXRay2017.zip").read_bytes() == data
    assert not (dest / "chest_xray").exists()  # --no-extract


def test_server_without_range_support_restarts(server, tmp_path):
    data = _release_zip()
    server.files["/ChestXRay2017.zip"] = data
    server.range_ok = False
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "ChestXRay2017.zip.part").write_bytes(b"garbage that must not survive" * 100)
    root = download_dataset(dest, url=server.base + "/ChestXRay2017.zip", sha256=_sha(data), progress=False)
    assert server.requests[0][1] is not None  # it asked to resume, the server answered 200 with everything
    assert (dest / "ChestXRay2017.zip").read_bytes() == data
    assert (root / "train" / "NORMAL").is_dir()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.files["/ChestXRay2017.zip"] = _release_zip()
    dest = tmp_path / "d"
    with pytest.raises(DownloadError, match="expected " + "ab" * 32):
        download_dataset(dest, url=server.base + "/ChestXRay2017.zip", sha256="AB" * 32, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == []  # no archive, no part, nothing extracted


def test_a_web_page_instead_of_the_zip_is_refused(server, tmp_path):
    server.files["/ChestXRay2017.zip"] = b"<html><body>Please log in</body></html>"
    dest = tmp_path / "d"
    with pytest.raises(DownloadError, match="not a ZIP archive"):
        download_dataset(dest, url=server.base + "/ChestXRay2017.zip", progress=False)
    assert sorted(p.name for p in dest.iterdir()) == []  # no checksum of the page recorded either


def test_sidecar_checksum_is_enforced(server, tmp_path):
    server.files["/ChestXRay2017.zip"] = _release_zip()
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "ChestXRay2017.zip.sha256").write_text("cd" * 32 + "  ChestXRay2017.zip\n")
    with pytest.raises(DownloadError, match="SHA-256"):
        download_dataset(dest, url=server.base + "/ChestXRay2017.zip", progress=False)
    assert not (dest / "chest_xray").exists() and not (dest / "ChestXRay2017.zip").exists()


def test_404_and_unreachable_name_the_url(server, tmp_path):
    url = server.base + "/nope.zip"
    with pytest.raises(DownloadError, match=r"nope\.zip answered HTTP 404.*--url"):
        download_dataset(tmp_path / "d", url=url, progress=False)
    with pytest.raises(DownloadError, match="cannot reach"):
        download_dataset(tmp_path / "e", url="http://127.0.0.1:9/x.zip", progress=False)  # discard port: refused
    with pytest.raises(DownloadError, match="64 hexadecimal"):
        download_dataset(tmp_path / "f", url=url, sha256="1234", progress=False)


@pytest.mark.parametrize("name,symlink", [("../evil.txt", False), ("chest_xray/../../evil.txt", False),
                                          ("/tmp/evil_abs.txt", False), ("C:/evil.txt", False),
                                          ("chest_xray/link", True)])
def test_malicious_zip_entries_are_refused(server, tmp_path, name, symlink):
    server.files["/ChestXRay2017.zip"] = _zip_with(name, b"/etc/passwd" if symlink else b"pwned", symlink)
    dest = tmp_path / "sub" / "d"
    with pytest.raises(DownloadError, match="refusing"):
        download_dataset(dest, url=server.base + "/ChestXRay2017.zip", progress=False)
    assert not (dest / "chest_xray").exists() and _leftovers(dest) == []
    assert not (tmp_path / "sub" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil_abs.txt").exists()


def test_extract_does_not_overwrite(tmp_path):
    z = tmp_path / "a.zip"
    z.write_bytes(_release_zip())
    (tmp_path / "chest_xray").mkdir()
    with pytest.raises(DownloadError, match="already exists"):
        safe_extract(z, tmp_path, progress=False)
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DownloadError, match="not a readable ZIP"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "x", progress=False)


def test_cli_download(server, tmp_path, capsys):
    data = _release_zip()
    server.files["/ChestXRay2017.zip"] = data
    rc = main(["-q", "data", "download", "--dest", str(tmp_path / "d"), "--url", server.base + "/ChestXRay2017.zip",
               "--sha256", _sha(data)])
    assert rc == 0 and "data ready under" in capsys.readouterr().out
    rc = main(["-q", "data", "download", "--dest", str(tmp_path / "e"), "--url", server.base + "/missing.zip"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pneumoscan: error:") and "missing.zip" in err[0]


def test_a_local_copy_is_read_where_it_lies_and_never_deleted(tmp_path, capsys):
    """--url PATH (the help's 'a local copy', and what the not-a-ZIP error advises) used to be a traceback."""
    local = tmp_path / "downloads" / "ChestXRay2017.zip"
    local.parent.mkdir()
    local.write_bytes(_release_zip())
    dest = tmp_path / "d"
    for url in (str(local), local.as_uri()):
        root = download_dataset(dest, url=url, progress=False)
        assert root == dest / "chest_xray" and len(list((root / "train" / "NORMAL").iterdir())) == 6
    assert (dest / "ChestXRay2017.zip.sha256").is_file() and local.is_file()  # the sidecar beside the data
    with pytest.raises(DownloadError, match="nothing was extracted"):
        download_dataset(tmp_path / "d2", url=str(local), sha256="0" * 64, progress=False)
    assert local.is_file()  # a user's file with the wrong checksum is not deleted
    (tmp_path / "notes.txt").write_text("not a zip")
    for url, needle in ((str(tmp_path / "nope.zip"), "no such file"), (str(tmp_path / "notes.txt"), "not a ZIP")):
        assert main(["-q", "data", "download", "--dest", str(tmp_path / "d3"), "--url", url]) == 2
        assert needle in capsys.readouterr().err
    assert (tmp_path / "notes.txt").is_file()
