"""Fetch the public chest X-ray release (Kermany et al., Mendeley Data, doi:10.17632/rscbjbr9sj).

The archive is ``ChestXRay2017.zip`` of the record's version 2 (about 1.2 GB; ``chest_xray/``
with ``train/`` and ``test/``, each holding ``NORMAL/`` and ``PNEUMONIA/``). The download

* shows a tqdm progress bar and resumes a partial download (``<archive>.part``) with an HTTP
  ``Range`` request; a server that ignores ``Range`` (answers 200) is handled by starting over;
* checks the archive's SHA-256. The release publishes no checksum and this project could not
  fetch the file to compute one, so none is built in (none is invented). The expected value is,
  in order: ``sha256=`` (``--sha256``), or the sidecar ``<archive>.sha256`` next to the archive
  (``sha256sum`` format). Without either, the computed SHA-256 is written to that sidecar and
  logged, so that later runs verify against it and a user can pin it with ``--sha256``;
* extracts safely: entries with absolute paths, ``..`` components or symbolic links are refused,
  everything is extracted into a temporary folder inside ``dest`` and renamed into place only
  when complete, so a failure never leaves a half-extracted dataset.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from tqdm.auto import tqdm

from .. import __version__
from ..errors import DownloadError
from ..io import atomic_write_text, file_digest

log = logging.getLogger(__name__)

ARCHIVE_NAME = "ChestXRay2017.zip"
DOI = "10.17632/rscbjbr9sj"
# ChestXRay2017.zip of version 2 of the Mendeley record; the first is the current public-files
# endpoint (redirects to the storage host), the second the older per-version file link. Tried in
# order; --url overrides both (e.g. a mirror or a local copy served over HTTP).
DEFAULT_URLS: tuple[str, ...] = (
    "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
    "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded",
    "https://data.mendeley.com/datasets/rscbjbr9sj/2/files/"
    "41d542e7-7f91-47f6-9ff2-dd8e5a5a7861/ChestXRay2017.zip?dl=1",
)
CHUNK = 1 << 20  # bytes read per network/disk step
TIMEOUT_S = 60.0  # socket timeout of each request
_SKIP = ("__MACOSX/",)  # macOS resource forks shipped inside some ZIPs: not data
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DownloadConfig:
    """Where the public release is fetched to (``pneumoscan data download``)."""

    FLAGS: ClassVar[dict[str, str]] = {"extract": "--no-extract"}

    dest: str = "data"  # destination folder
    url: str | None = None  # archive URL to use instead of Mendeley Data's (a mirror or a local copy)
    sha256: str | None = None  # expected SHA-256 of the archive (the release publishes none: pin the one you trust)
    extract: bool = True  # False: keep the ZIP without extracting it


def download_dataset(dest: str | os.PathLike = "data", url: str | None = None, sha256: str | None = None,
                     extract: bool = True, progress: bool = True) -> Path:
    """Download (resuming), verify and extract the release into ``dest``.

    Returns the folder that holds the data (the extracted ``chest_xray`` with ``train/`` and
    ``test/``), or, with ``extract=False``, the folder that holds the verified archive.
    Raises :class:`DownloadError` naming the URL and what to do.
    """
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create destination {dest} ({e.strerror}); choose another --dest") from None
    urls = (url,) if url else DEFAULT_URLS
    local = _local_path(url)
    if local is not None and not local.is_file():
        raise DownloadError(f"--url {url}: no such file; give an http(s) URL or the path of a downloaded "
                            f"{ARCHIVE_NAME}")
    archive = local or dest / _archive_name(url)  # a local copy is read where it lies, never copied or deleted
    sidecar = dest / f"{archive.name}.sha256"  # beside the data, also for a local copy read where it lies
    expected = _expected_sha256(sidecar, sha256)
    done = _extracted_root(dest, archive)
    if extract and done is not None and (expected is None or _marker_sha(dest, archive) == expected):
        log.info("data already extracted under %s", done)
        return done
    if not archive.is_file():
        _fetch_any(urls, archive, expected, progress)
    if not zipfile.is_zipfile(archive):  # e.g. a login or landing page served instead of the file
        if local is not None:
            raise DownloadError(f"--url {url} is not a ZIP archive; give the path of {ARCHIVE_NAME} itself")
        archive.unlink()
        raise DownloadError(f"what {urls[0]} served is not a ZIP archive (a web page?); it was deleted: check the "
                            "URL, or download ChestXRay2017.zip by hand and pass its location with --url")
    actual = _verify(archive, expected, source=urls[0], sidecar=sidecar, keep=local is not None)
    if not extract:
        return dest
    root = safe_extract(archive, dest, progress=progress)
    _write_text(dest / f".{archive.name}.extracted", f"{actual}  {root.name}\n")
    return root


def sha256_of(path: str | os.PathLike, progress: bool = False) -> str:
    """SHA-256 of a file, streamed, with a progress bar."""
    size = Path(path).stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc="sha256", disable=not progress, leave=False) as bar:
        return file_digest(path, "sha256", on_chunk=bar.update)


def fetch(url: str, target: str | os.PathLike, progress: bool = True, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``target`` via ``target.part``, resuming a partial file with HTTP Range.

    The ``.part`` file is kept when the transfer breaks off, so a second call continues it.
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    try:
        req = urllib.request.Request(url, headers={"User-Agent": f"pneumoscan/{__version__}"})
    except ValueError as e:  # unknown url type
        raise DownloadError(f"cannot download {url} ({e}); give an http(s) URL or the path of a local copy") from None
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch, or the .part does not fit the file
            total = _range_total(e.headers.get("Content-Range"))
            e.close()
            if total == have:
                os.replace(part, target)
                return target
            part.unlink()
            return fetch(url, target, progress, timeout)
        raise DownloadError(f"{url} answered HTTP {e.code} ({e.reason}); check the URL or pass a mirror with --url") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url} ({reason}); check the network connection, or pass a mirror "
                            "with --url") from None
    with resp:
        status = getattr(resp, "status", 200)
        length = resp.headers.get("Content-Length")
        if status == 206:
            start = _range_start(resp.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"{url} resumed at byte {start}, not {have}; delete {part} and run again")
            total = _range_total(resp.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the server ignored Range (or there was nothing to resume): start over
            if have:
                log.info("%s does not support resuming; downloading from the start", url)
            have, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=target.name, disable=not progress) as bar:
            try:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                raise DownloadError(f"download of {url} broke off after {f.tell()} bytes ({e}); run the same "
                                    f"command again to resume from {part}") from None
            got = f.tell()
    if total is not None and got != total:
        raise DownloadError(f"download of {url} ended at {got} of {total} bytes; run the same command again "
                            f"to resume from {part}")
    os.replace(part, target)
    return target


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> Path:
    """Extract a ZIP into ``dest`` through a temporary folder; returns the data folder.

    Refuses (before writing anything) entries with absolute paths, ``..`` components, drive
    letters or symbolic links, and entries that would overwrite an existing file or folder.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{archive} is not a readable ZIP ({e}); delete it and download again") from None
    with zf:
        members = [(info, _safe_name(info, archive)) for info in zf.infolist()]
        members = [(i, n) for i, n in members if n is not None]
        tops = sorted({n.parts[0] for _, n in members})
        if not tops:
            raise DownloadError(f"{archive} holds no files; delete it and download again")
        clash = [t for t in tops if (dest / t).exists()]
        if clash:
            raise DownloadError(f"{dest / clash[0]} already exists; remove it or choose another --dest")
        need = sum(i.file_size for i, _ in members)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise DownloadError(f"extracting {archive} needs {need / 1e9:.1f} GB, {dest} has {free / 1e9:.1f} GB free")
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
        try:
            for info, name in tqdm(members, desc="extract", unit="file", disable=not progress):
                out = tmp.joinpath(*name.parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            for t in tops:
                os.replace(tmp / t, dest / t)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DownloadError(f"extracting {archive} failed ({e}); delete it and download again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _data_root(dest, tops)


def _safe_name(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath | None:
    """The entry's relative path, ``None`` for entries to skip; raises on unsafe entries."""
    raw = info.filename.replace("\\", "/")
    if raw.startswith(_SKIP) or raw.rsplit("/", 1)[-1] in (".DS_Store",):
        return None
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DownloadError(f"{archive} holds a symbolic link {info.filename!r}; refusing to extract it "
                            "(the archive is not the expected release)")
    p = PurePosixPath(raw)
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in p.parts:
        raise DownloadError(f"{archive} holds an unsafe path {info.filename!r} (absolute or with '..'); "
                            "refusing to extract it (the archive is not the expected release)")
    parts = [q for q in p.parts if q not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def _data_root(dest: Path, tops: list[str]) -> Path:
    """The extracted folder that holds train/ or test/ (or the class folders)."""
    markers = ("train", "test", "NORMAL", "PNEUMONIA", "normal")
    for t in tops:
        for cand in (dest / t, *sorted((dest / t).glob("*"))):
            if cand.is_dir() and any((cand / m).is_dir() for m in markers):
                return cand
    dirs = [dest / t for t in tops if (dest / t).is_dir()]
    return dirs[0] if len(dirs) == 1 else dest


def _extracted_root(dest: Path, archive: Path) -> Path | None:
    marker = dest / f".{archive.name}.extracted"
    if not marker.is_file():
        return None
    parts = marker.read_text().split(maxsplit=1)
    root = dest / parts[1].strip() if len(parts) == 2 else None
    return root if root is not None and root.is_dir() else None


def _marker_sha(dest: Path, archive: Path) -> str | None:
    marker = dest / f".{archive.name}.extracted"
    return marker.read_text().split()[0] if marker.is_file() else None


def _local_path(url: str | None) -> Path | None:
    """The file ``--url`` names when it is a path or a file:// URL, not something to download; else None."""
    if not url:
        return None
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(url).expanduser() if parsed.scheme == "" else None


def _archive_name(url: str | None) -> str:
    if url:
        name = Path(urllib.parse.urlparse(url).path).name
        if name.lower().endswith(".zip"):
            return name
    return ARCHIVE_NAME


def _expected_sha256(side: Path, given: str | None) -> str | None:
    if given is not None:
        h = given.strip().lower()
        if not _HEX64.match(h):
            raise DownloadError(f"--sha256 {given!r} is not a SHA-256 (64 hexadecimal digits)")
        return h
    if side.is_file():
        text = side.read_text().split()
        if not text or not _HEX64.match(text[0].lower()):
            raise DownloadError(f"{side} holds no SHA-256; fix or delete it")
        return text[0].lower()
    return None


def _fetch_any(urls: tuple[str, ...], archive: Path, expected: str | None, progress: bool) -> None:
    errors = []
    for u in urls:
        try:
            log.info("downloading %s (doi:%s) to %s", u, DOI, archive)
            fetch(u, archive, progress)
            return
        except DownloadError as e:
            part = archive.with_name(archive.name + ".part")
            if part.is_file() and part.stat().st_size:  # a transfer started: resume it, not another URL
                raise
            errors.append(str(e))
    raise DownloadError(errors[0] if len(errors) == 1 else "all download URLs failed: " + " | ".join(errors))


def _verify(archive: Path, expected: str | None, source: str, sidecar: Path, keep: bool = False) -> str:
    """The archive's SHA-256, checked against ``expected`` or recorded in ``sidecar``; a mismatch deletes a
    downloaded file (``keep``: a user's local copy, never deleted) and extracts nothing."""
    actual = sha256_of(archive)
    if expected is None:
        _write_text(sidecar, f"{actual}  {archive.name}\n")
        log.warning("no published SHA-256 for %s: computed %s and recorded it in %s; pin it with "
                    "--sha256 %s", archive.name, actual, sidecar, actual)
        return actual
    if actual != expected:
        if keep:
            raise DownloadError(f"{archive} has SHA-256 {actual}, expected {expected}; nothing was extracted: check "
                                f"the file, or --sha256 / {sidecar}")
        archive.unlink(missing_ok=True)  # a wrong file is never kept, nor extracted
        raise DownloadError(f"{archive.name} from {source} has SHA-256 {actual}, expected {expected}; the file "
                            "was deleted: run again to re-download, or check --sha256 / the .sha256 sidecar")
    log.info("SHA-256 of %s verified (%s)", archive.name, actual)
    return actual


_write_text = atomic_write_text


def _range_start(header: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    return int(m.group(1)) if m else None


def _range_total(header: str | None) -> int | None:
    m = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", header or "")
    return int(m.group(1)) if m else None
