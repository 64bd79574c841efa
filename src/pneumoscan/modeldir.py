"""The model directory on disk, without torch: names, integrity checks and atomic writes.

A model directory holds ``model.safetensors`` (and optionally ``model.onnx``) plus
``config.json``, which records the SHA-256 of every weight file. Everything here is free of
torch so that the ONNX serving path starts light.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ModelError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "pneumoscan-model/1"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then ``os.replace``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """JSON has no NaN or infinity: undefined figures (e.g. the AUC of a one-class task) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n").encode())


def read_config(model_dir: str | os.PathLike) -> dict:
    d = Path(model_dir)
    if not d.exists():
        raise ModelError(f"model directory {d} does not exist; train one with 'pneumoscan train' or omit --model")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise ModelError(f"{d} is not a pneumoscan model directory (no {CONFIG_NAME})")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{p} is not valid JSON ({e}); restore it from the model's source") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ModelError(f"{p} is not a {FORMAT} config")
    return cfg


def verify_file(model_dir: Path, name: str, cfg: dict) -> Path:
    """Check a weight file against the SHA-256 in the config; refuse it on mismatch."""
    path = model_dir / name
    expected = cfg.get("files", {}).get(name)
    if not path.is_file():
        raise ModelError(f"{path} is missing; the model directory is incomplete")
    if expected is None:
        raise ModelError(f"{model_dir / CONFIG_NAME} records no SHA-256 for {name}; refusing unverified weights")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"{path} fails its integrity check (SHA-256 {actual[:12]}... != {expected[:12]}... "
                         "recorded in config.json): the file was changed or corrupted; re-export or re-train")
    return path


def default_model_dir() -> Path:
    """The shipped default model (inside the package), or $PNEUMOSCAN_MODEL when set."""
    env = os.environ.get("PNEUMOSCAN_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "models" / "default"


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    return Path(model) if model else default_model_dir()


def has_onnx(model_dir: str | os.PathLike) -> bool:
    """Whether the model directory has an ONNX export recorded in its config (torch-free check)."""
    d = Path(model_dir)
    conf = read_config(d)
    name = conf.get("onnx", {}).get("file")
    return bool(name) and (d / name).is_file() and name in conf.get("files", {})
