"""Writing files so that nothing is ever half written, and the digests that identify files.

Every artifact of pneumoscan (model weights, configs, manifests, caches, reports, figures) goes
through :func:`atomic_write` or :func:`atomic_dir`: the content is written to a uniquely named
temporary file (or folder) next to its target, then moved into place with ``os.replace``; on any
error, Ctrl-C included, the temporary is removed and the target is untouched. Files get the
usual permissions (0666 minus the umask), as ``open()`` would give them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

CHUNK = 1 << 20  # bytes read per step when hashing


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", on_chunk=None) -> str:
    """Hex digest of a file's bytes (``sha256`` for weights and archives, ``sha1`` for image content);
    ``on_chunk(n)`` is called with each chunk's size (a progress bar)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h.hexdigest()


def bytes_digest(data: bytes, algorithm: str = "sha256") -> str:
    return hashlib.new(algorithm, data).hexdigest()


def _umask_by_setting() -> int:
    """The file-creation mask by setting it and back: briefly 0 for the whole process, so only at import."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_by_setting()


def _umask() -> int:
    """The process's file-creation mask, read without changing it (Linux: /proc/self/status), so that a file
    another thread creates meanwhile never gets mask 0; elsewhere the mask at import."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; it replaces ``path`` when the block ends
    without an error, and is removed otherwise. ``mode`` is "wb" or "w" (text, UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": newline})) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a full disk on write names no file: say which output failed
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_path(path: str | os.PathLike) -> Path:
    """A unique, not yet existing temporary name next to ``path`` that keeps its suffix (for
    writers that take a file name, e.g. ``savefig`` or ``safetensors``); see :func:`atomic_path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name next to ``path`` for a writer that takes a name; it replaces ``path``
    when the block ends without an error (and is removed otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """JSON has no NaN or infinity: undefined figures (e.g. the AUC of a one-class task) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; when the block ends without an error it becomes
    ``path``, replacing an existing folder as a whole only with ``overwrite`` (the old one is removed
    only after the new one is in place). On an error the temporary folder is removed."""
    from .errors import PneumoscanError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp."))
    if path.is_dir() and any(path.iterdir()) and not overwrite:  # checked first, so no work is wasted
        shutil.rmtree(tmp, ignore_errors=True)
        raise PneumoscanError(f"{path} is not empty; choose a new folder or pass --overwrite")
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists() and not path.is_dir():
            raise PneumoscanError(f"{path} exists and is not a folder; choose another output")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise PneumoscanError(f"{path} is not empty; choose a new folder or pass --overwrite")
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, kind: str = "dir", what: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder is wanted (or
    the reverse), or a location whose nearest existing folder is not writable. ``kind``: "dir" or "file"."""
    from .errors import PneumoscanError

    if not str(path).strip():
        raise PneumoscanError(f"{what} is empty; give a {'folder' if kind == 'dir' else 'file name'}")
    path = Path(path)
    if kind == "file" and (path.is_symlink() or (path.exists() and not path.is_file() and not path.is_dir())):
        # written atomically, the output would replace the link, the device or the pipe itself with a plain file
        what_it_is = "a symbolic link" if path.is_symlink() else "a device, pipe or socket"
        raise PneumoscanError(f"{what} {path} is {what_it_is}; give the path of a plain file (or omit {what} to "
                              "print to the terminal)")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise PneumoscanError(f"{what} {path} is a file; give a folder")
        if kind == "file" and path.is_dir():
            raise PneumoscanError(f"{what} {path} is a folder; give a file name")
    base = path if path.is_dir() else _nearest_existing(path.parent)
    if not base.is_dir():
        raise PneumoscanError(f"{what} {path}: {base} is a file, so {path} cannot be created; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PneumoscanError(f"{what} {path}: {base} is not writable; choose a writable location")
    try:  # what access() cannot see (a pseudo or read-only-bound file system, a full inode table): try it
        fd, probe = tempfile.mkstemp(dir=base, prefix=".pneumoscan-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PneumoscanError(f"{what} {path}: cannot create files in {base} ({e.strerror or e}); "
                              "choose a writable location") from None
    return path


def check_new_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "--out") -> Path:
    """An output folder that will be replaced as a whole: it must not exist, be empty, or ``overwrite``."""
    from .errors import PneumoscanError

    path = check_writable(path, "dir", what)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise PneumoscanError(f"{what} {path} is not empty; choose a new folder or pass --overwrite to replace it")
    if path.is_dir() and overwrite and not os.access(path.parent, os.W_OK | os.X_OK):
        raise PneumoscanError(f"{what} {path} cannot be replaced: {path.parent} is not writable")
    return path


@contextlib.contextmanager
def all_or_earlier(folder: str | os.PathLike, names: Iterable[str]) -> Iterator[Path]:
    """Write ``names`` (files or folders) of ``folder`` in place, all or nothing: what an earlier run left under
    those names is moved aside first, deleted once the block succeeds, and put back when it fails or is
    interrupted (Ctrl-C included), after what the block wrote under them is removed. A folder this block
    created is removed again on failure, so a retry finds it as before. Other entries are never touched."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    names = list(names)
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.earlier."))
    moved = []
    for n in names:
        if (folder / n).exists() or (folder / n).is_symlink():
            os.replace(folder / n, aside / n)
            moved.append(n)
    try:
        yield folder
    except BaseException:
        for n in names:
            target = folder / n
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
        for n in moved:
            os.replace(aside / n, folder / n)
        shutil.rmtree(aside, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``path`` to write a set of outputs into; when the block succeeds each
    entry is moved into ``path`` (replacing files of the same name, keeping everything else there).
    On an error nothing reaches ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staged."))
    try:
        yield tmp
        for entry in sorted(tmp.iterdir()):
            target = path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
