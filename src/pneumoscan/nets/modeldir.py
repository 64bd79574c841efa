"""The model directory on disk, without torch: names, reading the config, integrity checks.

A model directory holds ``model.safetensors`` (and optionally ``model.onnx``) plus
``config.json``, which records the SHA-256 of every weight file, the class order, the
preprocessing and the threshold. Everything here is free of torch so that the ONNX serving
path starts light; :mod:`pneumoscan.nets.checkpoint` saves and loads the networks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelError
from ..io import file_digest
from ..labels import check_labels

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "MODEL_CARD.md"
FORMAT = "pneumoscan-model/1"
PACKAGE_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"  # the shipped model (read-only)


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of a model directory, checked for its format and class order."""
    d = Path(model_dir)
    if not d.exists():
        raise ModelError(f"model directory {d} does not exist; train one with 'pneumoscan train' or omit --model")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise ModelError(f"{d} is not a pneumoscan model directory (no {CONFIG_NAME})")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{p} is not valid JSON ({e}); restore it from the model's source") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ModelError(f"{p} is not a {FORMAT} config")
    check_labels(cfg.get("labels"), str(p))
    return cfg


def verify_file(model_dir: Path, name: str, cfg: dict) -> Path:
    """Check a weight file against the SHA-256 in the config; refuse it on mismatch."""
    path = Path(model_dir) / name
    expected = cfg.get("files", {}).get(name)
    if not path.is_file():
        raise ModelError(f"{path} is missing; the model directory is incomplete")
    if expected is None:
        raise ModelError(f"{Path(model_dir) / CONFIG_NAME} records no SHA-256 for {name}; refusing unverified weights")
    actual = file_digest(path)
    if actual != expected:
        raise ModelError(f"{path} fails its integrity check (SHA-256 {actual[:12]}... != {expected[:12]}... "
                         "recorded in config.json): the file was changed or corrupted; re-export or re-train")
    return path


def default_model_dir() -> Path:
    """The shipped default model (inside the package), or $PNEUMOSCAN_MODEL when set."""
    env = os.environ.get("PNEUMOSCAN_MODEL")
    return Path(env) if env else PACKAGE_MODEL


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    return Path(model) if model else default_model_dir()


def is_package_model(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` is the model shipped inside the package (never written to)."""
    try:
        return Path(model_dir).resolve() == PACKAGE_MODEL
    except OSError:
        return False


def onnx_name(cfg: dict) -> str | None:
    """The ONNX export's file name recorded in the config, or None."""
    return cfg.get("onnx", {}).get("file")


INT8_NAME = "model.int8.onnx"  # the INT8 copy of the export (pneumoscan.export.int8)


def int8_file(cfg: dict) -> str | None:
    """The INT8 export the config records as having passed its gate for the current fp32 export, or None."""
    info = (cfg.get("onnx") or {}).get("int8") or {}
    files = cfg.get("files") or {}
    name = info.get("file")
    if not name or name not in files or not (info.get("gate") or {}).get("passed"):
        return None
    return name if info.get("source_sha256") == files.get(onnx_name(cfg) or "") else None


def has_onnx(model_dir: str | os.PathLike) -> bool:
    """Whether the model directory has an ONNX export recorded in its config (torch-free check)."""
    d = Path(model_dir)
    conf = read_config(d)
    name = onnx_name(conf)
    return bool(name) and (d / name).is_file() and name in conf.get("files", {})
