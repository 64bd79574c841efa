"""Make one model directory from several: an ensemble (averaged probabilities, optional
test-time flip) or a soup (averaged weights: one network).

An ensemble is an ordinary model directory (``kind: "ensemble"``): ``config.json`` lists each
member's config, ``model.safetensors`` holds every member's weights under ``members.<i>.``,
and the averaging (and the flip) happen inside the network, so predict, evaluate, export and
serve use it unchanged. Members must share the intensity normalisation; a different mean/std is
mapped inside the graph, and a member trained at a lower resolution (e.g. 160 px beside 224 px
ones) gets the ensemble's input resized to its side inside the graph (antialiased bilinear; with
CLAHE the member then sees the equalisation of the larger image, which its validation figures in
the ensemble reflect). The members' shared ``manifest.csv`` is copied,
and the threshold starts as the mean of the members'; re-choose it on validation next
(:func:`pneumoscan.evaluate.operating_point.retune`, which ``pneumoscan ensemble`` runs).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelError
from ..labels import DEFAULT_THRESHOLD
from ..metrics import model_prior
from ..nets.checkpoint import ModelBundle, load_model, save_model
from ..nets.heads import TTA, Ensemble, member_input_affine, member_input_size
from ..nets.modeldir import read_config
from .config import EnsembleConfig

log = logging.getLogger(__name__)

_MEMBER_DROP = ("files",)  # per-directory bookkeeping that means nothing inside the ensemble


def check_compatible(dirs: Sequence[Path], configs: Sequence[dict], force: bool = False, same_size: bool = True) -> None:
    """Members must share labels and intensity normalisation (and, unless ``same_size`` is off, the input
    size), and unless forced the manifest they were trained on; the message names the members that
    differ and the fix."""
    first, d0 = configs[0], dirs[0]
    p0 = first["preprocess"]
    for d, c in zip(dirs[1:], configs[1:]):
        if list(c.get("labels", [])) != list(first.get("labels", [])):
            raise ModelError(f"{d} has labels {c.get('labels')} but {d0} has {first.get('labels')}; "
                             "ensemble members must share the class order")
        p = c["preprocess"]
        for key, what in (("size", "input size"), ("intensity", "intensity normalisation")):
            if key == "size" and not same_size:
                continue
            if p.get(key, "none") != p0.get(key, "none"):
                raise ModelError(f"members differ in {what}: {d0} uses {p0.get(key)!r}, {d} uses {p.get(key)!r}; "
                                 f"ensemble models trained with the same --size and --intensity")
        if c.get("manifest_sha256") != first.get("manifest_sha256"):
            msg = (f"{d} and {d0} were trained on different manifests (manifest_sha256 "
                   f"{str(c.get('manifest_sha256'))[:12]}... vs {str(first.get('manifest_sha256'))[:12]}...): "
                   "one member's training images may sit in another's validation split")
            if not force:
                raise ModelError(msg + "; retrain on one manifest, or pass --force")
            log.warning("%s (--force)", msg)


def _member_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _MEMBER_DROP}


def ensemble_config(dirs: Sequence[Path], configs: Sequence[dict], tta: str, command: str | None) -> dict:
    """The config.json of an ensemble (threshold: mean of the members' until re-chosen)."""
    shared = {c.get("manifest_sha256") for c in configs}
    names = [c.get("name", c.get("backbone", "model")) for c in configs]
    tag = "+".join(dict.fromkeys(names)) if len(set(names)) > 1 else f"{names[0]}x{len(names)}"
    priors = [c["train_prior"] for c in configs if "train_prior" in c]
    cfg = {
        "name": f"ensemble-{tag}" + ("-flip" if tta == "flip" else ""),
        "kind": "ensemble",
        "members": [_member_config(c) for c in configs],
        "member_dirs": [str(d) for d in dirs],
        "tta": tta,
        "preprocess": dict(max((c["preprocess"] for c in configs), key=lambda p: int(p["size"]))),
        "labels": list(configs[0].get("labels", [])),
        "finetuned": any(bool(c.get("finetuned")) for c in configs),
        "threshold": float(np.mean([float(c.get("threshold", DEFAULT_THRESHOLD)) for c in configs])),
        "threshold_method": "mean of the members' thresholds (not yet chosen on validation)",
        "model_prior": np.mean([model_prior(c) for c in configs], axis=0).tolist(),
        "manifest_sha256": shared.pop() if len(shared) == 1 else None,
        "command": command,
    }
    if len(priors) == len(configs):
        cfg["train_prior"] = np.mean(priors, axis=0).tolist()
    return cfg


def _check_members(dirs: Sequence[Path], out: Path) -> None:
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ModelError("a model directory is given twice; list each member once")
    for d in dirs:
        if d.resolve() == out.resolve():
            raise ModelError(f"--out {out} is one of the members; choose a new folder")


def _copy_manifest(dirs: Sequence[Path], cfg: dict, out: Path) -> None:
    """The members' shared manifest.csv (their common split), when they share one."""
    shared = dirs[0] / "manifest.csv"
    if cfg.get("manifest_sha256") is not None and shared.is_file():
        shutil.copyfile(shared, out / "manifest.csv")


def build_ensemble(model_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, tta: str = "none",
                   force: bool = False, command: str | None = None) -> Path:
    """Write an ensemble of ``model_dirs`` into the (new or empty) folder ``out``; returns ``out``."""
    dirs = [Path(d) for d in model_dirs]
    out = Path(out)
    if tta not in TTA:
        raise ModelError(f"--tta {tta!r} is unknown; use one of {', '.join(TTA)}")
    if not dirs or (len(dirs) == 1 and tta == "none"):
        raise ModelError("an ensemble needs two or more model directories (or one with --tta flip)")
    _check_members(dirs, out)
    configs = [read_config(d) for d in dirs]
    check_compatible(dirs, configs, force, same_size=False)  # smaller members get their side inside the graph
    bundles: list[ModelBundle] = [load_model(d) for d in dirs]  # verifies every member's SHA-256
    cfg = ensemble_config(dirs, configs, tta, command)
    affine = [member_input_affine(cfg["preprocess"], c["preprocess"]) for c in configs]
    sizes = [member_input_size(cfg["preprocess"], c["preprocess"]) for c in configs]
    save_model(out, Ensemble([b.net for b in bundles], tta=tta, input_affine=affine, input_sizes=sizes), cfg)
    _copy_manifest(dirs, cfg, out)
    log.info("ensemble of %d written to %s", len(dirs), out)
    return out


SOUP_KEEP = ("backbone", "timm_name", "weights_source", "preprocess", "labels", "head", "train_prior",
             "manifest_sha256", "data")  # member fields that hold for the averaged network too


def check_soup(val_metrics: dict, val_sha256: str | None, members: Sequence[dict], cfg: EnsembleConfig) -> dict:
    """Keep a soup only if its validation figures hold: its normal-vs-pneumonia AUC and 3-class accuracy
    may fall at most ``cfg.max_auc_drop`` / ``cfg.max_accuracy_drop`` below its weakest member's, on the same
    split (members' recorded figures; a soup of networks from different basins falls to chance, Wortsman
    et al. 2022). Returns the comparison (stored in config.json); raises ModelError when it does not hold.
    Members without figures on that split are not compared; with none, the record says so."""
    def figures(vm: dict) -> tuple[float, float]:
        return float(vm["normal_vs_pneumonia"]["auc"]), float(vm["three_class"]["accuracy"])

    auc, acc = figures(val_metrics)
    known = [figures(m["val_metrics"]) for m in members
             if m.get("val_metrics") and val_sha256 is not None and m.get("manifest_sha256") == val_sha256]
    out = {"auc": auc, "accuracy": acc, "max_auc_drop": cfg.max_auc_drop, "max_accuracy_drop": cfg.max_accuracy_drop,
           "members_compared": len(known)}
    if not known:
        out["held"] = None  # nothing to compare with on this split
        return out
    out.update(member_auc=[a for a, _ in known], member_accuracy=[c for _, c in known])
    low_auc, low_acc = min(a for a, _ in known), min(c for _, c in known)
    out["held"] = bool(auc >= low_auc - cfg.max_auc_drop and acc >= low_acc - cfg.max_accuracy_drop)
    if not out["held"]:
        raise ModelError(f"the soup does not hold on validation: AUC {auc:.4f} and 3-class accuracy {acc:.3f} against "
                         f"its weakest member's {low_auc:.4f} / {low_acc:.3f} (allowed drop {cfg.max_auc_drop} / "
                         f"{cfg.max_accuracy_drop}); the members are not from one basin: ensemble them instead "
                         "('pneumoscan ensemble')")
    return out


def build_soup(model_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
               coefficients: Sequence[float] | None = None, force: bool = False, command: str | None = None) -> Path:
    """One network whose weights are the (weighted) mean of the members' (a "model soup").

    Members must be single models of one architecture that started from the same weights: fine-tunes
    of one linear-probe model (``finetune --init-from``) for a uniform soup (Wortsman et al. 2022),
    or a linear-probe model and its fine-tune for WiSE-FT (``coefficients`` 1 - alpha, alpha).
    Unlike an ensemble the result costs one network at inference. Every tensor is averaged (batch-norm
    statistics included); integer counters are taken from the first member. Written into the (new
    or empty) folder ``out``; the threshold starts as the members' mean, as for an ensemble.
    """
    dirs = [Path(d) for d in model_dirs]
    out = Path(out)
    if len(dirs) < 2:
        raise ModelError("a soup needs two or more model directories")
    _check_members(dirs, out)
    if coefficients is not None:  # the rules of the CLI's --coefficients, in one place (EnsembleConfig)
        EnsembleConfig(coefficients=tuple(float(v) for v in coefficients)).check_members(len(dirs))
    w = np.full(len(dirs), 1.0 / len(dirs)) if coefficients is None else np.asarray(coefficients, float)
    w = w / w.sum()
    configs = [read_config(d) for d in dirs]
    for d, c in zip(dirs, configs):
        if c.get("kind", "single") != "single":
            raise ModelError(f"{d} is an ensemble; a soup averages single networks of one architecture")
        if c.get("timm_name") != configs[0].get("timm_name") or c.get("head") != configs[0].get("head"):
            raise ModelError(f"{d} ({c.get('timm_name')}) and {dirs[0]} ({configs[0].get('timm_name')}) differ in "
                             "architecture; only networks of one architecture can be averaged")
    check_compatible(dirs, configs, force)
    bundles = [load_model(d) for d in dirs]  # verifies every member's SHA-256
    states = [b.net.state_dict() for b in bundles]
    soup = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            soup[k] = sum(float(wi) * s[k].double() for wi, s in zip(w, states)).to(v.dtype)
        else:
            soup[k] = v.clone()
    net = bundles[0].net
    net.load_state_dict(soup)
    first = configs[0]
    cfg = {k: first[k] for k in SOUP_KEEP if k in first}
    cfg.update({
        "name": f"soup-{first.get('backbone', 'model')}x{len(dirs)}",
        "kind": "single",
        "finetuned": any(bool(c.get("finetuned")) for c in configs),
        "soup": {"members": [_member_config(c) for c in configs], "member_dirs": [str(d) for d in dirs],
                 "coefficients": [float(v) for v in w]},
        "threshold": float(np.mean([float(c.get("threshold", DEFAULT_THRESHOLD)) for c in configs])),
        "threshold_method": "mean of the members' thresholds (not yet chosen on validation)",
        "command": command,
    })
    if any("train_config" in c for c in configs):  # the first member's, as for an ensemble (its split settings)
        cfg["train_config"] = next(c["train_config"] for c in configs if "train_config" in c)
    save_model(out, net, cfg)
    _copy_manifest(dirs, cfg, out)
    log.info("soup of %d written to %s", len(dirs), out)
    return out
