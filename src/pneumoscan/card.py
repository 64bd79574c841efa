"""MODEL_CARD.md: a model directory's provenance, figures and limits, generated from its own files.

Everything in the card comes from the directory itself: ``config.json`` (written by train,
fine-tune or ensemble), ``manifest.csv`` (the exact patient-grouped split) and
``evaluations/NAME.json`` (results on other data, added with ``pneumoscan card --add-eval``).
A field the config does not hold renders as "not recorded"; the card is never half written.

Evaluations live in their own folder rather than in ``config.json`` so that adding one never
rewrites the file that carries the weights' SHA-256 and the model id.
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

from . import INTENDED_USE, LABELS, __version__
from .errors import PneumoscanError
from .modeldir import atomic_write_bytes, json_safe, read_config
from .scope import describe_thresholds

log = logging.getLogger(__name__)

CARD_NAME = "MODEL_CARD.md"
EVAL_DIR = "evaluations"
NOT_RECORDED = "not recorded"
EVAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

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
_META = {"n", "labels", "confusion_matrix", "model", "data"}
CLI_HEAD_BATCH = 64  # the head-training batch size 'pneumoscan train' always uses (TrainConfig default)


class CardError(PneumoscanError, ValueError):
    """An evaluation to add is missing, not JSON, or not a pneumoscan metrics.json."""


# --------------------------------------------------------------------------- formatting helpers


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


# --------------------------------------------------------------------------- sections


def _members(cfg: dict) -> list[dict]:
    m = cfg.get("members")
    return [x for x in m if isinstance(x, dict)] if isinstance(m, list) else []


def _kind(cfg: dict) -> str:
    if cfg.get("kind") == "ensemble":
        n = len(_members(cfg))
        return f"ensemble of {n} model{'s' if n != 1 else ''} (mean of member probabilities)"
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
    text = (f"decode to 8-bit gray; intensity normalisation: {_txt(prep.get('intensity', 'none'))}; "
            f"resize to {_txt(size)} x {_txt(size)} without keeping the aspect ratio; "
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


def section_model(cfg: dict) -> list[str]:
    inp, prep = _preprocess_text(cfg.get("preprocess"))
    thr = cfg.get("threshold")
    rows = [
        ("model id", _txt(cfg.get("model_id"))),
        ("kind", _kind(cfg)),
        *_backbone_rows(cfg),
        ("fine-tuned", _txt(cfg.get("finetuned"))),
        ("input", inp),
        ("preprocessing", prep),
        ("classes (output order)", _txt(cfg.get("labels"))),
        ("pneumonia threshold", _num(thr, 4) if thr is not None else NOT_RECORDED),
        ("threshold chosen by", _txt(cfg.get("threshold_method"))),
        ("decision rule", "pneumonia when P(bacterial) + P(viral) >= threshold; then bacterial or viral, "
                          "whichever is more probable; otherwise normal"),
        ("created", f"{_txt(cfg.get('created'))} with pneumoscan {_txt(cfg.get('pneumoscan_version'))}"),
    ]
    if "tta" in cfg:
        rows.insert(2, ("test-time augmentation", _txt(cfg.get("tta"))))
    out = ["## Model", ""] + _table(["", ""], rows) + [""]
    history = cfg.get("threshold_history")
    if isinstance(history, list) and history:
        out += ["Threshold changes (weights untouched):", ""]
        for h in history:
            h = h if isinstance(h, dict) else {}
            old_t, new_t = h.get("threshold"), h.get("new_threshold")
            out.append(f"- {_txt(h.get('replaced'))}: "
                       f"{_num(old_t, 4) if old_t is not None else NOT_RECORDED} ({_txt(h.get('method'))}) -> "
                       f"{_num(new_t, 4) if new_t is not None else NOT_RECORDED} ({_txt(h.get('new_method'))})")
        out += [""]
    files = cfg.get("files")
    if isinstance(files, dict) and files:
        out += ["Files and their SHA-256 (checked before any weight is loaded):", ""]
        out += [f"- `{name}`: `{_txt(digest)}`" for name, digest in files.items()] + [""]
    members = _members(cfg)
    if cfg.get("kind") == "ensemble":
        out += ["Members:", ""]
        rows = []
        for i, m in enumerate(members, 1):
            auc = _get(m, "val_metrics", "normal_vs_pneumonia", "auc", default=NOT_RECORDED)
            rows.append((i, _txt(m.get("model_id")), _txt(m.get("backbone")), _txt(m.get("weights_source")),
                         _txt(_get(m, "preprocess", "size")), _txt(m.get("finetuned")),
                         _num(m.get("threshold"), 4) if m.get("threshold") is not None else NOT_RECORDED,
                         auc if auc == NOT_RECORDED else _num(auc, 4)))
        out += _table(["#", "model id", "backbone", "weights", "input px", "fine-tuned", "own threshold",
                       "val AUC (own split)"], rows) if rows else [f"Members: {NOT_RECORDED}."]
        out += [""]
    return out


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
    from .data import Manifest

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


def section_data(cfg: dict, model_dir: Path) -> list[str]:
    data = _data_cfg(cfg)
    facts = manifest_facts(model_dir / "manifest.csv")
    out = ["## Training data", ""]
    if facts and "error" not in facts and facts["kermany_named"] < 0.9:
        out += [f"**Note:** only {facts['kermany_named']:.0%} of the file names follow the naming of the "
                "dataset below; this model may have been trained on other data.", ""]
    out += [f"- Dataset: {DATASET['citation']}. Mendeley Data, doi:{DATASET['doi']}, license {DATASET['license']}. "
            f"Frontal pediatric chest radiographs from {DATASET['origin']}.",
            f"- Data root when trained: `{_txt(data.get('root'))}`",
            f"- Manifest SHA-256: `{_txt(_manifest_sha(cfg))}` (over relative path, label, patient, split "
            "and content hash of every image)",
            f"- Files skipped while indexing: {_txt(data.get('skipped'))}; failed to decode: "
            f"{_txt(data.get('failed_to_decode'))}", ""]
    counts = data.get("counts")
    if isinstance(counts, dict) and counts:
        labels = list(cfg.get("labels") or LABELS)
        rows, tot = [], Counter()
        for split, c in counts.items():
            c = c if isinstance(c, dict) else {}
            vals = [c.get(lab) for lab in labels]
            tot.update({lab: v for lab, v in zip(labels, vals) if isinstance(v, int)})
            rows.append([split, *[_txt(v) for v in vals], sum(v for v in vals if isinstance(v, int))])
        rows.append(["**all**", *[tot[lab] for lab in labels], sum(tot.values())])
        out += ["Images per split and class:", ""] + _table(["split", *labels, "total"], rows) + [""]
    else:
        out += [f"Images per split and class: {NOT_RECORDED}.", ""]
    split_cfg = _get(cfg, "train_config") or _get(_members(cfg)[0] if _members(cfg) else {}, "train_config") or {}
    out += ["Split: grouped by patient, so that no child's images are on both sides (several images per "
            "patient; `personN_bacteria` and `personN_virus` are different children), validation share "
            f"{_txt(split_cfg.get('val_fraction'))}, seed {_txt(split_cfg.get('seed'))}. The validation split "
            "is cut from the dataset's training split; the official test split was not used."]
    if facts is None:
        out += [f"`manifest.csv` (the exact split): {NOT_RECORDED} in this directory."]
    elif "error" in facts:
        out += [f"`manifest.csv` is present but unreadable: {_txt(facts['error'])}"]
    else:
        sha = _manifest_sha(cfg)
        match = ("matches the config" if facts["digest"] == sha else
                 f"**does not match** the config's (`{facts['digest'][:12]}...`)" if sha else "")
        out += [f"`manifest.csv` in this directory holds the exact split: {facts['n']} images; patients per split "
                + ", ".join(f"{k} {v}" for k, v in facts["patients"].items())
                + f"; patients in more than one split: {facts['shared_patients']}; byte-identical extra copies: "
                f"{facts['duplicate_files']}, of which in more than one split: {facts['duplicates_across_splits']}; "
                f"its recomputed hash {match}."]
    return out + [""]


def reproduce_command(tc: dict) -> str | None:
    """A ``pneumoscan train`` line with every setting of a head-training config explicit."""
    if not isinstance(tc, dict) or "backbone" not in tc:
        return None
    flags = {"backbone": "--backbone", "size": "--size", "intensity": "--intensity", "lr": "--lr",
             "dropout": "--dropout", "weight_decay": "--weight-decay", "max_epochs": "--epochs",
             "patience": "--patience", "schedule": "--schedule", "step_size": "--step-size",
             "step_gamma": "--step-gamma", "class_weight": "--class-weight",
             "label_smoothing": "--label-smoothing", "threshold_method": "--threshold-method",
             "target_sensitivity": "--target-sensitivity", "val_fraction": "--val-fraction", "seed": "--seed",
             "weights": "--weights"}
    args = ["pneumoscan", "train", "MODEL_DIR/manifest.csv", "--out", "NEW_DIR"]
    for key, flag in flags.items():
        v = tc.get(key)
        if v is not None:
            args += [flag, f"{v:g}" if isinstance(v, float) else str(v)]
    if tc.get("pretrained") is False:
        args.append("--no-pretrained")
    cmd = shlex.join(args)
    if tc.get("batch_size", CLI_HEAD_BATCH) != CLI_HEAD_BATCH:
        cmd += f"  # head batch size {tc['batch_size']} is set only through the Python API (TrainConfig)"
    return cmd


def section_training(cfg: dict) -> list[str]:
    cmd_run = cfg.get("command")
    out = ["## Training procedure", "", f"Command as run: `{_txt(cmd_run)}`" if cmd_run else
           f"Command as run: {NOT_RECORDED}", ""]
    tc = cfg.get("train_config")
    if not cfg.get("finetuned") and cfg.get("kind") != "ensemble":
        cmd = reproduce_command(tc)
        if cmd:
            out += ["The same training with every setting explicit (`manifest.csv` holds absolute image paths; "
                    "on another machine index the data again and check the manifest hash above):", "",
                    f"`{cmd}`", ""]
    configs = {k: v for k, v in cfg.items() if k.endswith("_config") and isinstance(v, dict)}
    if configs:
        for name, c in configs.items():
            out += [f"`{name}`:", ""] + _table(["setting", "value"], [(f"`{k}`", _val(v)) for k, v in c.items()])
            out += [""]
    elif not _members(cfg):
        out += [f"Training configuration: {NOT_RECORDED}.", ""]
    if cfg.get("kind") == "ensemble":
        out += ["The ensemble itself is not trained: it averages its members' probabilities; its threshold is "
                "chosen as recorded under Model. Each member was trained as follows.", ""]
    else:
        seed = _get(tc, "seed", default=cfg.get("seed"))
        best, run = cfg.get("best_epoch"), cfg.get("epochs_run")
        out += [f"- Seed: {_txt(seed)} (split, initialisation, batch order)",
                f"- Best epoch: {_txt(best)}" + (f" of {run} run" if run is not None else "")
                + " (early stopping on validation loss)",
                f"- Time: {_duration(cfg.get('train_seconds'))}",
                f"- Hardware: {_txt(cfg.get('hardware'))}", ""]
    for i, m in enumerate(_members(cfg), 1):
        out += [f"Member {i} (`{_txt(m.get('model_id'))}`): command `{_txt(m.get('command'))}`, seed "
                f"{_txt(_get(m, 'train_config', 'seed'))}, best epoch {_txt(m.get('best_epoch'))}, "
                f"time {_duration(m.get('train_seconds'))}, manifest `{_txt(m.get('manifest_sha256'))}`", ""]
        tc_m = m.get("train_config")
        if isinstance(tc_m, dict):
            out += _table(["setting", "value"], [(f"`{k}`", _val(v)) for k, v in tc_m.items()]) + [""]
    return out


def metrics_block(m: dict) -> list[str]:
    """Every figure of a metrics.json dictionary: tasks with 95 % CIs, other figures, confusion matrix."""
    out = []
    ci_note = any(isinstance(_get(m, key, "ci95"), dict) and _get(m, key, "ci95") for key, _ in _TASKS)
    rows = []
    for key, name in _TASKS:
        t = m.get(key)
        if isinstance(t, dict):
            rows.append([name, *[_with_ci(t, k) for k in _RATES], *[_txt(t.get(k)) for k in _COUNTS]])
    if rows:
        out += _table(["task", "accuracy", "sensitivity", "specificity", "F1", "AUC", "n", "TP", "FP", "TN", "FN"],
                      rows) + [""]
        if ci_note:
            out += ["Figures in brackets are 95 % percentile-bootstrap confidence intervals (resampling images); "
                    "tasks without brackets have none recorded.", ""]
    other = []
    for key, v in m.items():
        if key in _META or key in dict(_TASKS):
            continue
        if isinstance(v, dict):
            other.append(f"- {key.replace('_', ' ')}: " + ", ".join(
                f"{k.replace('_', ' ')} {_num(x) if not isinstance(x, (dict, list)) else _txt(x)}"
                for k, x in v.items()))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            other.append(f"- {key.replace('_', ' ')}: {_num(v)}")
    out += other + ([""] if other else [])
    cm, labels = m.get("confusion_matrix"), m.get("labels") or list(LABELS)
    if isinstance(cm, list) and cm:
        out += ["Confusion matrix (rows: true class, columns: predicted class):", ""]
        out += _table(["true \\ predicted", *labels],
                      [[lab, *(row if isinstance(row, list) else [])] for lab, row in zip(labels, cm)]) + [""]
    else:
        out += [f"Confusion matrix: {NOT_RECORDED}.", ""]
    return out


def section_validation(cfg: dict) -> list[str]:
    vm = cfg.get("val_metrics")
    out = ["## Validation results", ""]
    if not isinstance(vm, dict):
        return out + [f"Validation metrics: {NOT_RECORDED}.", ""]
    thr = _get(vm, "normal_vs_pneumonia", "threshold", default=cfg.get("threshold"))
    out += [f"On the patient-grouped validation split ({_txt(vm.get('n'))} images) at the pneumonia threshold "
            f"{_num(thr, 4) if thr is not None else NOT_RECORDED}. The validation split comes from the same "
            "source and distribution as the training images: expect worse figures on other data (see Known "
            "limitations).", ""]
    vd = cfg.get("val_data")
    if isinstance(vd, dict):
        out += [f"Validation data: `{_txt(vd.get('source'))}`, manifest `{_txt(vd.get('manifest_sha256'))}`, "
                f"{_txt(vd.get('n'))} images; same split as the members' training: {_txt(vd.get('matches_members'))}.",
                ""]
    return out + metrics_block(vm)


def load_evaluations(model_dir: Path) -> list[dict]:
    """Stored evaluations, sorted by name; unreadable files are logged and skipped."""
    out = []
    for p in sorted((model_dir / EVAL_DIR).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
            if isinstance(rec, dict) and isinstance(rec.get("metrics"), dict):
                out.append(rec)
                continue
        except (OSError, json.JSONDecodeError):
            pass
        log.warning("%s is not a stored evaluation; left out of the model card", p)
    return out


def section_evaluations(model_dir: Path) -> list[str]:
    evals = load_evaluations(model_dir)
    out = ["## Evaluations on other data", ""]
    if not evals:
        return out + ["None recorded. Add one with `pneumoscan evaluate --data DIR --model MODEL_DIR --out OUT` "
                      "then `pneumoscan card --model MODEL_DIR --add-eval OUT/metrics.json --name NAME`.", ""]
    for rec in evals:
        m = rec["metrics"]
        thr = _get(m, "normal_vs_pneumonia", "threshold")
        out += [f"### {_txt(rec.get('name'))}", "",
                f"- Data: `{_txt(_get(m, 'data', 'root'))}`, {_txt(m.get('n'))} images; model "
                f"`{_txt(_get(m, 'model', 'id'))}` ({_txt(_get(m, 'model', 'backend'))} backend), threshold "
                f"{_num(thr, 4) if thr is not None else NOT_RECORDED}",
                f"- Added {_txt(rec.get('added'))} from `{_txt(rec.get('source'))}` "
                f"(SHA-256 `{_txt(rec.get('source_sha256'))}`)", ""]
        out += metrics_block(m)
    return out


def section_use() -> list[str]:
    return [
        "## Intended use", "",
        f"> {INTENDED_USE}", "",
        "- Research and education on pediatric (about 1-5 years) frontal (postero-anterior or antero-posterior) "
        "chest radiographs: studying transfer learning, explanations, robustness and evaluation practice.",
        "- Every prediction comes with its probabilities, the threshold and out-of-scope warnings; read them "
        "together with this card.", "",
        "## Out-of-scope use", "",
        "- **Clinical diagnosis, triage or treatment decisions** of any kind: the model is not a medical device, "
        "is not validated clinically and has not been reviewed by any regulator.",
        "- **Adults** and children outside the training age range (the training images are of children aged 1-5).",
        "- **Lateral views**, cropped or rotated films, images with heavy annotations or burned-in overlays.",
        "- **Other modalities and body parts**: CT slices, ultrasound, MRI, photographs, other radiographs.",
        "- **Other diseases**: COVID-19, tuberculosis, effusion, tumours etc. are not classes; such images get "
        "one of the three labels anyway.", "",
        "### Out-of-scope input warnings", "",
        "Predictions still run, but carry a warning, when an input looks unlike the training data:", "",
    ] + _table(["warning", "raised when", "why"], describe_thresholds()) + [
        "", "No image of the training split raises any of these (all are gray, square, 224 px). Lateral views, "
        "adult films and other diseases cannot be detected this way: no warning does not mean in scope.", ""]


def section_limitations(cfg: dict) -> list[str]:
    nvp = _get(cfg, "val_metrics", "normal_vs_pneumonia") or {}
    bv = _get(cfg, "val_metrics", "bacterial_vs_viral") or {}
    spec = f" (specificity {_num(nvp['specificity'])} here)" if "specificity" in nvp else ""
    bv_txt = (f" (validation AUC here: bacterial vs viral {_num(bv.get('auc'))}, normal vs pneumonia "
              f"{_num(nvp.get('auc'))})" if "auc" in bv and "auc" in nvp else "")
    return [
        "## Known limitations", "",
        "- **Single centre.** All images come from one hospital (Guangzhou Women and Children's Medical Center): "
        "one population, one set of machines and protocols. Performance elsewhere is unknown.",
        "- **Ages 1-5.** The patients were children of one to five years; infants, older children and adults "
        "look different on a radiograph.",
        "- **Label noise.** The labels are two physicians' gradings of the images (a third expert checked only "
        "the official test split); the dataset is known to hold mislabelled and ambiguous films. Bacterial vs "
        f"viral in particular is hard to tell on a radiograph{bv_txt}.",
        "- **Shift between the dataset's splits.** The validation figures above come from a split of the "
        "dataset's *training* images. The dataset's official test split is known to differ: models that look "
        f"near perfect on such a validation split{spec} over-call pneumonia on the official test split (many "
        "normal films called pneumonia, i.e. low specificity). Treat the validation figures as an upper bound.",
        "- **Prevalence.** The threshold was chosen at the training data's prevalence (about 74 % pneumonia). "
        "For data with another prevalence pass `--prevalence` to `pneumoscan predict`, or choose a new "
        "threshold on labelled data from there.",
        "- **Reduced resolution.** The bundled copy of the data was downscaled to 224 x 224 px without keeping "
        "the aspect ratio (the originals are grayscale, about 1000-2900 px a side); the model never saw "
        "full-resolution detail, and every input is squeezed to a square the same way.",
        "- **Duplicates.** The dataset holds groups of byte-identical files under different names (always "
        "within one patient, so a patient-grouped split keeps them on one side; see the manifest line above).",
        ""]


# --------------------------------------------------------------------------- card and evaluations


def render_card(model_dir: str | os.PathLike, cfg: dict | None = None) -> str:
    """The Markdown text of a model directory's card (reads its config unless ``cfg`` is given)."""
    d = Path(model_dir)
    cfg = read_config(d) if cfg is None else cfg
    lines = [f"# Model card: {_txt(cfg.get('model_id'))}", "",
             f"> {INTENDED_USE}", "",
             f"Generated by pneumoscan {__version__} from this directory's `config.json`, `manifest.csv` and "
             f"`{EVAL_DIR}/`. Regenerate with `pneumoscan card --model {d}`; do not edit by hand.", ""]
    for section in (section_model(cfg), section_data(cfg, d), section_training(cfg), section_validation(cfg),
                    section_evaluations(d), section_use(), section_limitations(cfg)):
        lines += section
    figures = [f for f in ("history.png",) if (d / f).is_file()]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _rate(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and (not math.isfinite(v) or 0.0 <= v <= 1.0))


def validate_metrics(m: Any, labels: list[str], source: str, model_id: str | None = None) -> dict:
    """Check that ``m`` is a metrics.json of ``pneumoscan evaluate`` for this model; returns it."""
    fix = "pass the metrics.json written by 'pneumoscan evaluate'"
    if not isinstance(m, dict):
        raise CardError(f"{source}: expected a JSON object, got {type(m).__name__}; {fix}")
    for key in ("n", "confusion_matrix", "normal_vs_pneumonia"):
        if key not in m:
            raise CardError(f"{source}: no {key!r} field; {fix}")
    if not _nonneg_int(m["n"]) or m["n"] == 0:
        raise CardError(f"{source}: 'n' must be a positive integer, got {m['n']!r}")
    if "labels" in m and list(m["labels"] or []) != list(labels):
        raise CardError(f"{source}: labels {m['labels']} differ from the model's {labels}; "
                        "evaluate this model to get matching metrics")
    cm = m["confusion_matrix"]
    k = len(labels)
    if (not isinstance(cm, list) or len(cm) != k
            or not all(isinstance(r, list) and len(r) == k and all(map(_nonneg_int, r)) for r in cm)):
        raise CardError(f"{source}: 'confusion_matrix' must be {k} rows of {k} non-negative integers")
    if sum(map(sum, cm)) != m["n"]:
        raise CardError(f"{source}: the confusion matrix counts {sum(map(sum, cm))} images but 'n' is {m['n']}")
    for key, _ in _TASKS:
        t = m.get(key)
        if key == "normal_vs_pneumonia" or t is not None:
            if not isinstance(t, dict):
                raise CardError(f"{source}: {key!r} must be an object with accuracy, sensitivity, ...")
            bad = [r for r in _RATES if r in t and not _rate(t[r])]
            if bad or (key == "normal_vs_pneumonia" and not all(r in t for r in ("accuracy", "sensitivity",
                                                                                 "specificity"))):
                raise CardError(f"{source}: {key!r} needs accuracy, sensitivity and specificity in [0, 1] "
                                f"(bad or missing: {', '.join(bad) or 'accuracy/sensitivity/specificity'})")
            ci = t.get("ci95", {})
            if not isinstance(ci, dict) or not all(isinstance(v, list) and len(v) == 2 and all(map(_rate, v))
                                                   for v in ci.values()):
                raise CardError(f"{source}: {key!r}.ci95 must map metric names to [low, high] pairs in [0, 1]")
    mid = _get(m, "model", "id")
    if model_id and mid and mid != model_id:
        raise CardError(f"{source} was computed with model {mid}, not with this model ({model_id}); "
                        "evaluate this model directory and add that metrics.json")
    return m


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
    import hashlib

    d = Path(model_dir)
    cfg = read_config(d) if cfg is None else cfg
    _check_name(name)
    validate_metrics(metrics, list(cfg.get("labels") or LABELS), source, cfg.get("model_id"))
    if source_sha256 is None:
        source_sha256 = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()
    rec = {"name": name, "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "source": source, "source_sha256": source_sha256, "metrics": json_safe(metrics)}
    path = d / EVAL_DIR / f"{name}.json"
    if path.exists():
        log.info("replacing the stored evaluation %s", path)
    atomic_write_bytes(path, (json.dumps(rec, indent=2) + "\n").encode())
    return path


def add_evaluation(model_dir: str | os.PathLike, metrics_path: str | os.PathLike, name: str) -> Path:
    """Store a metrics.json as evaluation NAME of the model and regenerate its card; returns the card."""
    import hashlib

    d = Path(model_dir)
    cfg = read_config(d)
    _check_name(name)
    metrics, raw = _read_metrics(metrics_path)
    # validate before writing anything: a bad file changes nothing
    validate_metrics(metrics, list(cfg.get("labels") or LABELS), str(metrics_path), cfg.get("model_id"))
    store_evaluation(d, name, metrics, source=str(Path(metrics_path).resolve()),
                     source_sha256=hashlib.sha256(raw).hexdigest(), cfg=cfg)
    return write_card(d)


def write_card(model_dir: str | os.PathLike, extra_evals: dict | None = None) -> Path:
    """Write (atomically) ``MODEL_CARD.md`` into ``model_dir`` and return its path.

    ``extra_evals`` maps a name to a metrics dictionary (as ``compute_metrics``/``evaluate`` return);
    each is validated and stored under ``evaluations/`` first, so later regenerations keep it.
    """
    d = Path(model_dir)
    cfg = read_config(d)
    if extra_evals:
        checked = []
        for name, metrics in extra_evals.items():  # validate all before storing any
            _check_name(name)
            validate_metrics(metrics, list(cfg.get("labels") or LABELS), f"evaluation {name!r}", cfg.get("model_id"))
            checked.append((name, metrics))
        for name, metrics in checked:
            store_evaluation(d, name, metrics, cfg=cfg)
    path = d / CARD_NAME
    atomic_write_bytes(path, render_card(d, cfg).encode())
    log.info("model card written to %s", path)
    return path
