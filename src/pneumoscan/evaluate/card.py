"""MODEL_CARD.md: a model directory's provenance, figures and limits, generated from its own files.

Everything in the card comes from the directory itself: ``config.json`` (written by train,
fine-tune, ensemble or soup), ``manifest.csv`` (the exact patient-grouped split) and
``evaluations/NAME.json`` (results on other data, added with ``pneumoscan card --add-eval``).
:func:`card_context` turns them into formatted values; the prose is the Jinja2 template
``templates/MODEL_CARD.md.j2``. A field the config does not hold renders as "not recorded"; the
card is never half written. Evaluations live in their own folder rather than in ``config.json``
so that adding one never rewrites the file that carries the weights' SHA-256 and the model id.
The config is read without its value checks (``read_config(..., check_values=False)``): a card describes
what the file holds, while ``pneumoscan check`` and every command that predicts refuse values out of range.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .. import INTENDED_USE, __version__
from ..config import flag
from ..data.manifest import Manifest
from ..errors import PneumoscanError
from ..io import atomic_write_json, atomic_write_text, bytes_digest, json_safe
from ..labels import LABELS
from ..nets.modeldir import CARD_NAME, read_config
from ..scope import describe_thresholds
from .schema import FIX, CardError, check_metrics

log = logging.getLogger(__name__)

EVAL_DIR = "evaluations"
NOT_RECORDED = "not recorded"
EVAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TEMPLATE = "MODEL_CARD.md.j2"

DATASET = {
    "citation": ("Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases "
                 "by Image-Based Deep Learning. Cell 172(5):1122-1131, 2018"),
    "doi": "10.17632/rscbjbr9sj",
    "license": "CC BY 4.0",
    "origin": "Guangzhou Women and Children's Medical Center, Guangzhou, China",
}
_KERMANY_NAME = re.compile(r"(person\d+_(bacteria|virus)|(NORMAL2-)?IM-\d+)", re.IGNORECASE)
_TASKS = (("normal_vs_pneumonia", "normal vs pneumonia"), ("bacterial_vs_rest", "bacterial vs rest"),
          ("viral_vs_rest", "viral vs rest"), ("bacterial_vs_viral", "bacterial vs viral (pneumonia only)"))
_RATES = ("accuracy", "sensitivity", "specificity", "f1", "auc")
_COUNTS = ("n", "tp", "fp", "tn", "fn")
_META = {"n", "labels", "confusion_matrix", "model", "data", "training_overlap"}


# --------------------------------------------------------------------------- formatting


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """Nested lookup that never raises: ``_get(cfg, "data", "counts")``."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _txt(v: Any) -> str:
    """A config value for a table cell; missing (None) becomes 'not recorded'."""
    if v is None or v == "":
        return NOT_RECORDED
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_txt(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_val(x)}" for k, x in v.items()) if v else "none"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _val(v: Any) -> str:
    """A value that *is* recorded, possibly as null (e.g. size None = the backbone's default)."""
    return "none" if v is None else _txt(v)


def _num(v: Any, digits: int = 3) -> str:
    """A metric: 3 decimals; absent is 'not recorded', null/NaN (undefined, e.g. one-class AUC) 'undefined'."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "undefined" if v is None else NOT_RECORDED
    if isinstance(v, int):
        return str(v)
    return "undefined" if not math.isfinite(v) else f"{v:.{digits}f}"


def _with_ci(task: dict, key: str) -> str:
    if key not in task:
        return NOT_RECORDED
    s = _num(task[key])
    ci = _get(task, "ci95", key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        s += f" ({_num(ci[0])}–{_num(ci[1])})"
    return s


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return NOT_RECORDED
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _members(cfg: dict) -> list[dict]:
    m = cfg.get("members")
    return [x for x in m if isinstance(x, dict)] if isinstance(m, list) else []


def _kind(cfg: dict) -> str:
    if cfg.get("kind") == "ensemble":
        n = len(_members(cfg))
        return f"ensemble of {n} model{'s' if n != 1 else ''} (mean of member probabilities)"
    if isinstance(cfg.get("soup"), dict):
        return "single network: weight average (soup) of fine-tuned networks of one architecture"
    if isinstance(cfg.get("qat"), dict):
        return "single network: quantisation-aware copy of another model, distilled from it under emulated INT8"
    if cfg.get("finetuned"):
        return "single network, fine-tuned end to end"
    if cfg.get("kind") == "single" or "backbone" in cfg:
        return "single network: frozen ImageNet backbone + trained head (dropout, dense softmax)"
    return NOT_RECORDED


def _preprocess_text(prep: Any) -> tuple[str, str]:
    if not isinstance(prep, dict):
        return NOT_RECORDED, NOT_RECORDED
    size = prep.get("size")
    inp = f"{size} x {size} px, 3 channels (the gray image repeated)" if size else NOT_RECORDED
    text = (f"decode to 8-bit gray; resize to {_txt(size)} x {_txt(size)} without keeping the aspect ratio; "
            f"then intensity normalisation: {_txt(prep.get('intensity', 'none'))}; "
            f"per-channel mean {_txt(prep.get('mean'))}, std {_txt(prep.get('std'))}")
    return inp, text


def _backbone_rows(cfg: dict) -> list[tuple[str, str]]:
    members = _members(cfg) if cfg.get("kind") == "ensemble" else []
    parts = members or [cfg]
    names = ", ".join(_txt(m.get("backbone")) + (f" (timm `{m['timm_name']}`)" if m.get("timm_name") else "")
                      for m in parts)
    weights = ", ".join(_txt(m.get("weights_source")) for m in parts)
    if any(_get(m, "train_config", "pretrained") is False for m in parts):
        weights += " — **random, not pretrained: for tests only, results are meaningless**"
    prefix = "members' " if members else ""
    return [(f"{prefix}backbone", names or NOT_RECORDED), (f"{prefix}backbone weights", weights or NOT_RECORDED)]


def _thr(v: Any) -> str:
    return _num(v, 4) if v is not None else NOT_RECORDED


def model_rows(cfg: dict) -> list[tuple[str, str]]:
    inp, prep = _preprocess_text(cfg.get("preprocess"))
    rows = [
        ("model id", _txt(cfg.get("model_id"))),
        ("kind", _kind(cfg)),
        *_backbone_rows(cfg),
        ("fine-tuned", _txt(cfg.get("finetuned"))),
        ("input", inp),
        ("preprocessing", prep),
        ("classes (output order)", _txt(cfg.get("labels"))),
        ("pneumonia threshold", _thr(cfg.get("threshold"))),
        ("threshold chosen by", _txt(cfg.get("threshold_method"))),
        ("decision rule", "pneumonia when P(bacterial) + P(viral) >= threshold; then bacterial or viral, "
                          "whichever is more probable; otherwise normal"),
        ("created", f"{_txt(cfg.get('created'))} with pneumoscan {_txt(cfg.get('pneumoscan_version'))}"),
    ]
    if "tta" in cfg:
        rows.insert(2, ("test-time augmentation", _txt(cfg.get("tta"))))
    return rows


def _history(cfg: dict) -> list[str]:
    out = []
    for h in cfg.get("threshold_history") or []:
        h = h if isinstance(h, dict) else {}
        out.append(f"{_txt(h.get('replaced'))}: {_thr(h.get('threshold'))} ({_txt(h.get('method'))}) -> "
                   f"{_thr(h.get('new_threshold'))} ({_txt(h.get('new_method'))})")
    return out


def _member_rows(cfg: dict) -> list[list[str]] | None:
    if cfg.get("kind") != "ensemble":
        return None
    rows = []
    for i, m in enumerate(_members(cfg), 1):
        auc = _get(m, "val_metrics", "normal_vs_pneumonia", "auc", default=NOT_RECORDED)
        rows.append([str(i), _txt(m.get("model_id")), _txt(m.get("backbone")), _txt(m.get("weights_source")),
                     _txt(_get(m, "preprocess", "size")), _txt(m.get("finetuned")), _thr(m.get("threshold")),
                     auc if auc == NOT_RECORDED else _num(auc, 4)])
    return rows


def _soup(cfg: dict) -> dict | None:
    soup = cfg.get("soup")
    if not isinstance(soup, dict):
        return None
    rows = []
    for i, (m, w) in enumerate(zip(soup.get("members") or [], soup.get("coefficients") or []), 1):
        auc = _get(m, "val_metrics", "normal_vs_pneumonia", "auc")
        rows.append([str(i), _txt(m.get("model_id")), _num(w), _txt(m.get("finetuned")),
                     NOT_RECORDED if auc is None else _num(auc, 4)])
    return {"rows": rows}


def _data_cfg(cfg: dict) -> dict:
    """The data record; an ensemble without its own falls back to its first member's."""
    data = cfg.get("data")
    if not isinstance(data, dict) and _members(cfg):
        data = _members(cfg)[0].get("data")
    return data if isinstance(data, dict) else {}


def _manifest_sha(cfg: dict) -> str | None:
    sha = cfg.get("manifest_sha256")
    if sha is None and _members(cfg):
        sha = _members(cfg)[0].get("manifest_sha256")
    return sha


def manifest_facts(path: Path) -> dict | None:
    """Patients per split, patients shared between splits, the recomputed hash; None when absent/unreadable."""

    if not path.is_file():
        return None
    try:
        m = Manifest.load(path)
    except (PneumoscanError, OSError, KeyError, TypeError, ValueError) as e:
        log.warning("cannot read %s for the model card: %s", path, e)
        return {"error": str(e)}
    patients: dict[str, set[str]] = {}
    for s in m.samples:
        patients.setdefault(s.split, set()).add(s.patient)
    splits = sorted(patients, key=lambda s: ("train", "val", "test").index(s) if s in ("train", "val", "test") else 9)
    shared = set()
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            shared |= patients[a] & patients[b]
    by_sha = Counter(s.sha1 for s in m.samples)
    sha_splits: dict[str, set[str]] = {}
    for s in m.samples:
        sha_splits.setdefault(s.sha1, set()).add(s.split)
    named = sum(bool(_KERMANY_NAME.search(Path(s.relpath).name)) for s in m.samples)
    return {"n": len(m), "patients": {s: len(patients[s]) for s in splits}, "shared_patients": len(shared),
            "duplicate_files": sum(c - 1 for c in by_sha.values() if c > 1),
            "duplicates_across_splits": sum(len(v) > 1 for v in sha_splits.values()), "digest": m.digest(),
            "kermany_named": named / max(len(m), 1)}


def data_context(cfg: dict, model_dir: Path) -> dict:
    data = _data_cfg(cfg)
    facts = manifest_facts(model_dir / "manifest.csv")
    labels = list(cfg.get("labels") or LABELS)
    counts = data.get("counts")
    rows = []
    if isinstance(counts, dict) and counts:
        tot: Counter = Counter()
        for split, c in counts.items():
            c = c if isinstance(c, dict) else {}
            vals = [c.get(lab) for lab in labels]
            tot.update({lab: v for lab, v in zip(labels, vals) if isinstance(v, int)})
            rows.append([split, *[_txt(v) for v in vals], str(sum(v for v in vals if isinstance(v, int)))])
        rows.append(["**all**", *[str(tot[lab]) for lab in labels], str(sum(tot.values()))])
    split_cfg = _get(cfg, "train_config") or _get(_members(cfg)[0] if _members(cfg) else {}, "train_config") or {}
    if facts is None:
        line = f"`manifest.csv` (the exact split): {NOT_RECORDED} in this directory."
    elif "error" in facts:
        line = f"`manifest.csv` is present but unreadable: {_txt(facts['error'])}"
    else:
        sha = _manifest_sha(cfg)
        match = ("matches the config" if facts["digest"] == sha else
                 f"**does not match** the config's (`{facts['digest'][:12]}...`)" if sha else "")
        line = (f"`manifest.csv` in this directory holds the exact split: {facts['n']} images; patients per split "
                + ", ".join(f"{k} {v}" for k, v in facts["patients"].items())
                + f"; patients in more than one split: {facts['shared_patients']}; byte-identical extra copies: "
                f"{facts['duplicate_files']}, of which in more than one split: {facts['duplicates_across_splits']}; "
                f"its recomputed hash {match}.")
    other = facts and "error" not in facts and facts["kermany_named"] < 0.9
    return {"root": _txt(data.get("root")), "manifest_sha": _txt(_manifest_sha(cfg)),
            "skipped": _txt(data.get("skipped")), "failed": _txt(data.get("failed_to_decode")), "labels": labels,
            "counts": rows, "val_fraction": _txt(split_cfg.get("val_fraction")), "seed": _txt(split_cfg.get("seed")),
            "manifest_line": line, "other_names": f"{facts['kermany_named']:.0%}" if other else None}


def reproduce_command(cfg: dict) -> str | None:
    """The command that trains this model again, every recorded setting explicit, from the config
    class's own fields and flags (the CLI is generated from the same definitions)."""
    from ..train.config import AugmentConfig, FinetuneConfig, TrainConfig

    if isinstance(cfg.get("qat"), dict):
        return _reproduce_qat(cfg["qat"])
    tc = cfg.get("train_config")
    if not isinstance(tc, dict) or "backbone" not in tc or cfg.get("kind") == "ensemble" or cfg.get("soup"):
        return None
    cls, command = (FinetuneConfig, "finetune") if cfg.get("finetuned") else (TrainConfig, "train")
    args = ["pneumoscan", command, "MODEL_DIR/manifest.csv", "--out", "NEW_DIR"]
    items = [(cls, k, v) for k, v in tc.items() if k != "augment"]
    items += [(AugmentConfig, k, v) for k, v in (tc.get("augment") or {}).items()]
    for owner, key, v in items:
        if key not in owner.__dataclass_fields__:
            continue  # a setting of another version
        option = flag(owner, key)
        if isinstance(v, bool):
            if v != owner.__dataclass_fields__[key].default:  # flags switch a default off or on
                args.append(option)
        elif v is not None:
            args += [option, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else
                     (f"{v:g}" if isinstance(v, float) else str(v))]
    return shlex.join(args)


def _reproduce_qat(q: dict) -> str | None:
    """``pneumoscan qat`` again, every recorded setting explicit."""
    from ..train.config import QatConfig

    teacher = _get(q, "teacher", "dir")
    if not teacher or not isinstance(q.get("config"), dict):
        return None
    args = ["pneumoscan", "qat", str(teacher), "--out", "NEW_DIR"]
    for key, v in q["config"].items():
        if key in QatConfig.__dataclass_fields__ and v is not None:
            args += [flag(QatConfig, key), f"{v:g}" if isinstance(v, float) else str(v)]
    return shlex.join(args)


def _qat(cfg: dict) -> str | None:
    """One sentence on a quantisation-aware copy: its teacher and the emulated agreement before and after."""
    q = cfg.get("qat")
    if not isinstance(q, dict):
        return None
    b, a = q.get("before") or {}, q.get("after") or {}

    def pct(d: dict, k: str) -> str:
        return f"{100 * d[k]:.1f} %" if isinstance(d.get(k), (int, float)) else NOT_RECORDED
    return (f"Quantisation-aware copy of `{_txt(_get(q, 'teacher', 'model_id'))}`, distilled from it on its training "
            f"split under ONNX Runtime's INT8 scheme emulated ({_txt(_get(q, 'config', 'epochs'))} epochs, "
            f"{_txt(_get(q, 'config', 'weight_range', default='full'))}-range weights). On "
            f"{_txt(q.get('validation_images'))} validation images the emulated INT8 copy kept {pct(b, 'int8_vs_teacher')} "
            f"of the teacher's verdicts before and {pct(a, 'int8_vs_teacher')} after; its fp32 graph keeps "
            f"{pct(a, 'fp32_vs_teacher')}, and INT8 agrees with fp32 on {pct(a, 'int8_vs_fp32')} (the export gate measures "
            "this last one on the real INT8 graph). The training configuration below is the teacher's.")


def _config_tables(cfg: dict) -> list[tuple[str, list]]:
    out = []
    if isinstance(cfg.get("qat"), dict) and isinstance(cfg["qat"].get("config"), dict):
        out.append(("qat config", [(f"`{k}`", _val(v)) for k, v in cfg["qat"]["config"].items()]))
    for name, c in cfg.items():
        if name.endswith("_config") and isinstance(c, dict):
            out.append((name, [(f"`{k}`", _val(v)) for k, v in c.items()]))
    return out


def _member_runs(cfg: dict) -> list[dict]:
    runs = []
    for m in _members(cfg):
        tc = m.get("train_config")
        runs.append({"id": _txt(m.get("model_id")), "command": _txt(m.get("command")),
                     "seed": _txt(_get(m, "train_config", "seed")), "best": _txt(m.get("best_epoch")),
                     "time": _duration(m.get("train_seconds")), "manifest": _txt(m.get("manifest_sha256")),
                     "config": [(f"`{k}`", _val(v)) for k, v in tc.items()] if isinstance(tc, dict) else None})
    return runs


def metrics_context(m: dict) -> dict:
    """Every figure of a metrics.json dictionary as formatted table rows and lines."""
    tasks, has_ci = [], False
    for key, name in _TASKS:
        t = m.get(key)
        if isinstance(t, dict):
            tasks.append([name, *[_with_ci(t, k) for k in _RATES], *[_txt(t.get(k)) for k in _COUNTS]])
            has_ci = has_ci or bool(isinstance(t.get("ci95"), dict) and t.get("ci95"))
    other = []
    for key, v in m.items():
        if key in _META or key in dict(_TASKS):
            continue
        if isinstance(v, dict):
            other.append(f"{key.replace('_', ' ')}: " + ", ".join(
                f"{k.replace('_', ' ')} {_num(x) if not isinstance(x, (dict, list)) else _txt(x)}"
                for k, x in v.items()))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            other.append(f"{key.replace('_', ' ')}: {_num(v)}")
    cm, labels = m.get("confusion_matrix"), list(m.get("labels") or LABELS)
    confusion = ([[lab, *map(str, row if isinstance(row, list) else [])] for lab, row in zip(labels, cm)]
                 if isinstance(cm, list) and cm else None)
    return {"tasks": tasks, "has_ci": has_ci, "other": other, "confusion": confusion, "labels": labels}


def _history_data(cfg: dict) -> str:
    """Where the current threshold was chosen, from the last threshold change ('' when not recorded)."""
    h = (cfg.get("threshold_history") or [None])[-1]
    if not isinstance(h, dict) or h.get("new_threshold") != cfg.get("threshold") or not h.get("data"):
        return ""
    return " on " + (f"{_txt(h['n_val'])} images of " if h.get("n_val") is not None else "") + f"`{_txt(h['data'])}`"


def _validation(cfg: dict) -> dict | None:
    """The validation figures, the threshold they were measured at, and the data they came from. A threshold
    re-chosen on other data (``pneumoscan threshold --data``) leaves the figures as they were: then the card says
    so, and the data line (which describes the new choice, not the figures) is left out."""
    vm = cfg.get("val_metrics")
    if not isinstance(vm, dict):
        return None
    now = cfg.get("threshold")
    measured = _get(vm, "normal_vs_pneumonia", "threshold", default=now)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (now, measured))
    earlier = None
    if numbers and not math.isclose(measured, now, rel_tol=1e-9):
        earlier = {"now": _thr(now), "where": _history_data(cfg)}
    vd = cfg.get("val_data")
    source = None
    if isinstance(vd, dict) and earlier is None and vd.get("n") == vm.get("n"):
        same = vd.get("matches_model", vd.get("matches_members"))
        source = (f"`{_txt(vd.get('source'))}`, manifest `{_txt(vd.get('manifest_sha256'))}`, {_txt(vd.get('n'))} "
                  f"images; same split as the model's training: {_txt(same)}.")
    return {"n": _txt(vm.get("n")), "source": source, "metrics": metrics_context(vm), "threshold": _thr(measured),
            "earlier": earlier}


def evaluation_files(model_dir: str | os.PathLike) -> list[Path]:
    """The stored evaluations' files (``evaluations/*.json``), sorted by name."""
    return sorted((Path(model_dir) / EVAL_DIR).glob("*.json"))


def read_evaluation(path: Path, cfg: dict) -> dict:
    """One stored evaluation, checked as :func:`store_evaluation` checked it; :class:`CardError` when the
    file is not one (unreadable, not JSON, no metrics, or metrics of another model or class order)."""
    fix = (f"delete it, or store the evaluation again with 'pneumoscan card --model {path.parent.parent} "
           f"--add-eval METRICS.json --name {path.stem}'")
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{path} is not a stored evaluation: not valid JSON ({e}); {fix}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
        raise CardError(f"{path} is not a stored evaluation: it holds no 'metrics' object; {fix}")
    try:
        check_metrics(rec["metrics"], list(cfg.get("labels") or LABELS), "its metrics", cfg.get("model_id"))
    except CardError as e:
        raise CardError(f"{path} is not a stored evaluation: {str(e).removesuffix('; ' + FIX)}; {fix}") from None
    return rec


def load_evaluations(model_dir: Path, cfg: dict) -> list[dict]:
    """Stored evaluations, sorted by name; a file that is not one is logged and left out of the card
    ('pneumoscan check' fails on it)."""
    out = []
    for p in evaluation_files(model_dir):
        try:
            out.append(read_evaluation(p, cfg))
        except CardError as e:
            log.warning("%s; left out of the model card", e)
    return out


def _evaluation(rec: dict) -> dict:
    m = rec["metrics"]
    overlap = m.get("training_overlap")
    warn = None
    if isinstance(overlap, dict) and overlap.get("n"):
        warn = (f"{overlap['n']} of these {_txt(m.get('n'))} images are in this model's training split: the "
                "figures below are optimistic and are not an independent test")
    return {"name": _txt(rec.get("name")), "root": _txt(_get(m, "data", "root")), "n": _txt(m.get("n")),
            "model": _txt(_get(m, "model", "id")), "backend": _txt(_get(m, "model", "backend")),
            "threshold": _thr(_get(m, "normal_vs_pneumonia", "threshold")), "added": _txt(rec.get("added")),
            "source": _txt(rec.get("source")), "sha": _txt(rec.get("source_sha256")), "overlap": warn,
            "metrics": metrics_context(m)}


def _limits(cfg: dict) -> dict:
    nvp = _get(cfg, "val_metrics", "normal_vs_pneumonia") or {}
    bv = _get(cfg, "val_metrics", "bacterial_vs_viral") or {}
    return {"spec": f" (specificity {_num(nvp['specificity'])} here)" if "specificity" in nvp else "",
            "bv": (f" (validation AUC here: bacterial vs viral {_num(bv.get('auc'))}, normal vs pneumonia "
                   f"{_num(nvp.get('auc'))})" if "auc" in bv and "auc" in nvp else "")}


def _gate(cfg: dict, model_dir: Path) -> dict:
    """The out-of-scope gate, calibration and prediction sets as recorded by ``pneumoscan calibrate``."""
    ood, cal, conf = cfg.get("ood"), cfg.get("calibration"), cfg.get("conformal")
    out: dict = {"ood": None, "calibration": None, "conformal": None, "suite": None}
    if isinstance(ood, dict):
        out["ood"] = {"method": _txt(ood.get("method")), "pca_dim": _txt(ood.get("pca_dim")),
                      "n_train": _txt(ood.get("n_train")), "file": _txt(ood.get("file")),
                      "threshold": _num(ood.get("threshold"), 2), "quantile": f"{ood.get('quantile', 0):.0%}",
                      "flagged": f"{ood.get('validation_flagged', 0):.1%}"}
    if isinstance(cal, dict):
        out["calibration"] = {"temperature": _num(cal.get("temperature")), "n": _txt(cal.get("n")),
                              "bias": None if cal.get("bias") is None else ", ".join(f"{b:+.3f}" for b in cal["bias"]),
                              "choice": None if not isinstance(cal.get("ece_by_scaling"), dict) or len(cal["ece_by_scaling"]) < 2
                              else "; ".join(f"{k} {v:.3f}" for k, v in cal["ece_by_scaling"].items()),
                              **{k: _num(cal.get(k)) for k in ("ece_before", "ece_after", "brier_before", "brier_after")}}
    if isinstance(conf, dict):
        held = conf.get("heldout") or {}
        out["conformal"] = {
            "alpha": _txt(conf.get("alpha")), "qhat": _num(conf.get("qhat")),
            "method": {"lac": "every class whose probability is at least 1 - quantile (LAC, Sadinle et al. 2019)",
                       "aps": "adaptive prediction sets (APS, Romano et al. 2020)"}.get(conf.get("method"),
                                                                                        _txt(conf.get("method"))),
            "coverage": _num(held.get("coverage")),
            "size": _num(held.get("mean_set_size"), 2), "target": f"{1 - float(conf.get('alpha', 0.1)):.0%}",
            "rows": [[lab, _txt(v.get("n")), _num(v.get("coverage")), _num(v.get("mean_set_size"), 2)]
                     for lab, v in (held.get("by_class") or {}).items()]}
    suite = cfg.get("scope_suite")
    if isinstance(suite, dict) and isinstance(suite.get("groups"), dict):
        out["suite"] = {"when": _txt(suite.get("written")),
                        "rows": [[name.replace("_", " "), _txt(g.get("n")), f"{g.get('flagged', 0):.1%}"]
                                 for name, g in suite["groups"].items()]}
    return out


def card_context(model_dir: Path, cfg: dict, shown_as: str | os.PathLike | None = None) -> dict:
    """Everything the template shows, formatted."""
    tc = cfg.get("train_config") if isinstance(cfg.get("train_config"), dict) else {}
    noisy = cfg.get("noisy_labels")
    init = cfg.get("init_from")
    kind = "ensemble" if cfg.get("kind") == "ensemble" else "soup" if isinstance(cfg.get("soup"), dict) else "single"
    return {
        "model_id": _txt(cfg.get("model_id")), "intended_use": INTENDED_USE, "version": __version__,
        "eval_dir": EVAL_DIR, "shown_as": str(shown_as or model_dir), "model_rows": model_rows(cfg),
        "threshold_history": _history(cfg), "kind": kind,
        "files": [(n, _txt(d)) for n, d in (cfg.get("files") or {}).items()],
        "members": _member_rows(cfg), "soup": _soup(cfg), "data": data_context(cfg, model_dir), "dataset": DATASET,
        "command": cfg.get("command"), "reproduce": reproduce_command(cfg),
        "noisy": (f"{noisy['n_flagged']} ({', '.join(f'{k} {v}' for k, v in noisy['flagged_by_class'].items())}; "
                  f"{_txt(noisy.get('method'))})" if isinstance(noisy, dict) else None),
        "init_from": _txt(init.get("model_id")) if isinstance(init, dict) else None, "qat": _qat(cfg),
        "configs": _config_tables(cfg), "member_runs": _member_runs(cfg),
        "run": {"seed": _txt(tc.get("seed", cfg.get("seed"))),
                "best": _txt(cfg.get("best_epoch")) + (f" of {cfg['epochs_run']} run" if "epochs_run" in cfg else ""),
                "time": _duration(cfg.get("train_seconds")), "hardware": _txt(cfg.get("hardware"))},
        "validation": _validation(cfg), "evaluations": [_evaluation(r) for r in load_evaluations(model_dir, cfg)],
        "scope_rows": describe_thresholds(), "limits": _limits(cfg), "gate": _gate(cfg, model_dir),
        "independent": [{k: _txt(t.get(k)) for k in ("data", "source", "when", "threshold", "figures")}
                        | {"note": t.get("note")} for t in cfg.get("independent_test") or [] if isinstance(t, dict)],
        "figures": [f for f in ("history.png",) if (model_dir / f).is_file()], "int8": _int8(cfg),
    }


def _int8(cfg: dict) -> dict | None:
    """The INT8 copy's gate figures, when the config records one that passed for the current export."""
    from ..nets.modeldir import int8_file

    if int8_file(cfg) is None:
        return None
    info = cfg["onnx"]["int8"]
    g = info["gate"]
    auc = (lambda v: NOT_RECORDED if v is None else f"{v:.4f}")
    weights = {"full": "full-range s8 weights (-127..127: exact on a VNNI-class CPU only)",
               "reduced": "reduced-range s8 weights (-64..64: exact on any CPU)"}.get(info.get("weights"),
                                                                                   "full-range s8 weights")
    measured = f"; the gate ran on a CPU with {g['instruction_set']}" if g.get("instruction_set") else ""
    rows = [["normal-vs-pneumonia AUC", auc(g.get("auc_fp32")), auc(g.get("auc_int8")), f"drop <= {g['max_auc_drop']:g}"]]
    if g.get("ood_threshold"):
        t, n = g["ood_threshold"], g.get("out_of_scope") or {}
        rows.append(["out-of-scope threshold (images stopped)", f"{t['fp32']:.2f} ({_txt(n.get('fp32'))})",
                     f"{t['int8']:.2f} ({_txt(n.get('int8'))})",
                     "INT8's mapped on training images" + ("; the guard reads it, fp32's decides" if g.get("guard") else "")])
    served = "identical verdicts"
    guard = []
    if g.get("guard"):
        served += " (INT8 with its guard, as served)"
        alone = g["int8_alone"]
        guard = [["identical verdicts of INT8 alone", "", f"{alone['agreement']:.1%} ({alone['identical_verdicts']} of "
                  f"{g['images']})", "context"],
                 [f"images the guard ran again in fp32 (margins: {g['guard']['quantile']:g} quantile of INT8's error on "
                  "the calibration images)", "", f"{g['guard']['fp32_share']:.1%} ({g['guard']['fp32_images']})", ""]]
    return {"file": info["file"], "how": f"{info.get('quantiser', NOT_RECORDED)}, {weights}, calibrated on "
                                         f"{_get(info, 'calibrated_on', 'images', default='?')} training images{measured}",
            "rows": [*rows,
                     [served, "", f"{g['agreement']:.1%} ({g['identical_verdicts']} of {g['images']})",
                      f">= {g['min_agreement']:.0%}"], *guard,
                     ["max / mean probability difference", "", f"{g['max_abs_prob_diff']:.3f} / "
                                                                 f"{g['mean_abs_prob_diff']:.4f}", ""]]}


def render_card(model_dir: str | os.PathLike, cfg: dict | None = None, shown_as: str | os.PathLike | None = None) -> str:
    """The Markdown text of a model directory's card (reads its config unless ``cfg`` is given)."""
    import jinja2

    d = Path(model_dir)
    cfg = read_config(d, check_values=False) if cfg is None else cfg
    env = jinja2.Environment(loader=jinja2.PackageLoader("pneumoscan.evaluate", "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.get_template(TEMPLATE).render(**card_context(d, cfg, shown_as))
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


# --------------------------------------------------------------------------- evaluations


def _read_metrics(path: str | os.PathLike) -> tuple[Any, bytes]:
    p = Path(path)
    if not p.is_file():
        raise CardError(f"{p}: no such file; pass the metrics.json written by 'pneumoscan evaluate'")
    try:
        raw = p.read_bytes()
        return json.loads(raw), raw
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{p}: not valid JSON ({e}); pass the metrics.json written by 'pneumoscan evaluate'") \
            from None




def _check_name(name: str) -> str:
    if not isinstance(name, str) or not EVAL_NAME.match(name):
        raise CardError(f"evaluation name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-' "
                        "(e.g. official-test)")
    return name


def store_evaluation(model_dir: str | os.PathLike, name: str, metrics: dict, *, source: str = "python",
                     source_sha256: str | None = None, cfg: dict | None = None) -> Path:
    """Validate ``metrics`` and write ``evaluations/NAME.json`` atomically (replacing one of the same name)."""
    d = Path(model_dir)
    cfg = read_config(d, check_values=False) if cfg is None else cfg
    _check_name(name)
    check_metrics(metrics, list(cfg.get("labels") or LABELS), source, cfg.get("model_id"))
    if source_sha256 is None:
        source_sha256 = bytes_digest(json.dumps(metrics, sort_keys=True).encode())
    rec = {"name": name, "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "source": source, "source_sha256": source_sha256, "metrics": json_safe(metrics)}
    path = d / EVAL_DIR / f"{name}.json"
    if path.exists():
        log.info("replacing the stored evaluation %s", path)
    atomic_write_json(path, rec)
    return path


def add_evaluation(model_dir: str | os.PathLike, metrics_path: str | os.PathLike, name: str) -> Path:
    """Store a metrics.json as evaluation NAME of the model and regenerate its card; returns the card."""
    d = Path(model_dir)
    cfg = read_config(d, check_values=False)
    _check_name(name)
    metrics, raw = _read_metrics(metrics_path)
    # validate before writing anything: a bad file changes nothing
    check_metrics(metrics, list(cfg.get("labels") or LABELS), str(metrics_path), cfg.get("model_id"))
    store_evaluation(d, name, metrics, source=str(Path(metrics_path).resolve()), source_sha256=bytes_digest(raw),
                     cfg=cfg)
    return write_card(d)


def write_card(model_dir: str | os.PathLike, extra_evals: dict | None = None,
               shown_as: str | os.PathLike | None = None) -> Path:
    """Write (atomically) ``MODEL_CARD.md`` into ``model_dir`` and return its path.

    ``extra_evals`` maps a name to a metrics dictionary (as ``compute_metrics``/``evaluate`` return);
    each is validated and stored under ``evaluations/`` first, so later regenerations keep it.
    ``shown_as``: the directory's final name when the card is written in a temporary folder.
    """
    d = Path(model_dir)
    cfg = read_config(d, check_values=False)
    if extra_evals:
        for name, metrics in extra_evals.items():  # validate all before storing any
            _check_name(name)
            check_metrics(metrics, list(cfg.get("labels") or LABELS), f"evaluation {name!r}", cfg.get("model_id"))
        for name, metrics in extra_evals.items():
            store_evaluation(d, name, metrics, cfg=cfg)
    path = d / CARD_NAME
    atomic_write_text(path, render_card(d, cfg, shown_as))
    log.info("model card written to %s", path)
    return path
