"""The model directory on disk, without torch: names, reading the config, integrity checks.

A model directory holds ``model.safetensors`` (and optionally ``model.onnx``) plus
``config.json``, which records the SHA-256 of every weight file, the class order, the
preprocessing and the threshold. Everything here is free of torch so that the ONNX serving
path starts light; :mod:`pneumoscan.nets.checkpoint` saves and loads the networks.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelError
from ..io import file_digest
from ..labels import LABELS, check_labels
from ..preprocess import INTENSITY

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "MODEL_CARD.md"
FORMAT = "pneumoscan-model/1"
PACKAGE_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"  # the shipped model (read-only)


def read_config(model_dir: str | os.PathLike, *, check_values: bool = True) -> dict:
    """``config.json`` of a model directory, checked for its format, class order and (unless
    ``check_values`` is False: 'pneumoscan check' and the card, which report rather than refuse) every
    value a prediction depends on (:func:`config_problems`)."""
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
    problems = config_problems(cfg, d) if check_values else []
    if problems:
        more = f" ({len(problems) - 1} more: 'pneumoscan check --model {d}' lists them)" if len(problems) > 1 else ""
        raise ModelError(problems[0] + more)
    return cfg


# --------------------------------------------------------------------------- the values of config.json


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _between(lo: float, hi: float, closed: bool = False) -> Callable[[Any], bool]:
    return lambda v: _number(v) and (lo <= v <= hi if closed else lo < v < hi)


def _numbers(n: int, positive: bool = False) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and len(v) == n and all(_number(x) for x in v)
                      and (not positive or all(x > 0 for x in v)))


def _section(v: Any) -> bool:
    return v is None or isinstance(v, dict)


@dataclass(frozen=True)
class ConfigRule:
    """What one value of config.json must be for the verdicts to mean anything."""

    key: str  # dotted path; the rule is skipped while the section above it is absent (or null)
    need: str  # what the value must be, as the error says it
    ok: Callable[[Any], bool]  # the test of a present value
    fix: str  # what to do, {d} standing for the model directory
    required: bool = False  # missing is a problem too (within its section, when that is present)


_RESTORE = "restore config.json from a copy of the model"
_REDO = _RESTORE + ", or delete its '{entry}' entry and re-run 'pneumoscan {command} --model {{d}}'"
_THRESHOLD = _REDO.format(entry="threshold", command="threshold")
_CAL, _CONF, _OOD = (_REDO.format(entry=e, command="calibrate") for e in ("calibration", "conformal", "ood"))
_SECTION = "an object (or absent)"
CONFIG_RULES: tuple[ConfigRule, ...] = (
    ConfigRule("threshold", "a finite number strictly between 0 and 1", _between(0, 1), _THRESHOLD),
    ConfigRule("calibration", _SECTION, _section, _CAL),
    ConfigRule("calibration.temperature", "a finite number > 0", _between(0, math.inf), _CAL, required=True),
    ConfigRule("calibration.bias", f"null or {len(LABELS)} finite numbers",
               lambda v: v is None or _numbers(len(LABELS))(v), _CAL),
    ConfigRule("conformal", _SECTION, _section, _CONF),
    ConfigRule("conformal.qhat", "a finite number from 0 to 1", _between(0, 1, closed=True), _CONF, required=True),
    ConfigRule("conformal.alpha", "a finite number strictly between 0 and 1", _between(0, 1), _CONF, required=True),
    ConfigRule("ood", _SECTION, _section, _OOD),
    ConfigRule("ood.file", "the name of the gate's weights file", lambda v: isinstance(v, str) and v != "", _OOD,
               required=True),
    ConfigRule("ood.threshold", "a finite number", _number, _OOD, required=True),
    ConfigRule("ood.upright_threshold", "a finite number", _number, _OOD),
    ConfigRule("preprocess", "an object with size, mean and std", lambda v: isinstance(v, dict), _RESTORE, required=True),
    ConfigRule("preprocess.size", "a positive whole number of pixels",
               lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, _RESTORE, required=True),
    ConfigRule("preprocess.mean", "3 finite numbers", _numbers(3), _RESTORE, required=True),
    ConfigRule("preprocess.std", "3 finite numbers > 0", _numbers(3, positive=True), _RESTORE, required=True),
    ConfigRule("preprocess.intensity", f"one of {', '.join(INTENSITY)}", lambda v: v in INTENSITY, _RESTORE),
)


def config_problems(cfg: dict, model_dir: str | os.PathLike) -> list[str]:
    """One line for each value of ``cfg`` (the config.json of ``model_dir``) that breaks a rule of
    :data:`CONFIG_RULES`, naming the file, the key, the value and what to do; empty when all hold."""
    path = Path(model_dir) / CONFIG_NAME
    out = []
    for rule in CONFIG_RULES:
        *parents, name = rule.key.split(".")
        section: Any = cfg
        for k in parents:
            section = section.get(k) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            continue  # the section is absent, or its own rule reports it
        if name not in section:
            if rule.required:
                out.append(f"{path}: {rule.key} is missing; it must be {rule.need}: {rule.fix.format(d=model_dir)}")
            continue
        if not rule.ok(section[name]):
            out.append(f"{path}: {rule.key} is {reprlib.repr(section[name])}; it must be {rule.need}: "
                       f"{rule.fix.format(d=model_dir)}")
    return out


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
