"""config.json's values are checked where the file is read: a threshold, temperature, conformal quantile,
gate threshold or preprocessing out of range is refused on load with one line (file, key, value, what to
do), never turned into silent NaN or never-called pneumonia; 'pneumoscan check' lists each as a failed
check instead of crashing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pneumoscan.cli import main
from pneumoscan.errors import ModelError
from pneumoscan.labels import DEFAULT_THRESHOLD
from pneumoscan.nets.modeldir import CONFIG_NAME, PACKAGE_MODEL, config_problems, read_config

NAN, INF = float("nan"), float("inf")


def _set(cfg: dict, key: str, value) -> None:
    """Set (or, with ``...``, delete) a dotted key of a config dictionary."""
    *parents, name = key.split(".")
    for k in parents:
        cfg = cfg[k]
    if value is ...:
        del cfg[name]
    else:
        cfg[name] = value


def _edited(src: Path, dst: Path, key: str, value) -> Path:
    """A copy of the model directory ``src`` whose config.json has ``key`` set to ``value``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    _set(cfg, key, value)
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))  # json writes NaN and Infinity as Python's json reads them
    return dst


def _config_only(tmp_path: Path, key: str, value) -> Path:
    """A directory holding only the shipped model's config.json with ``key`` set to ``value`` (enough to load it)."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = json.loads((PACKAGE_MODEL / CONFIG_NAME).read_text())
    _set(cfg, key, value)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    return d


# (key, bad value, what the message shows of it, the command whose re-run the message offers or None)
BAD = [
    ("threshold", 5, "5", "threshold"),
    ("threshold", NAN, "nan", "threshold"),
    ("threshold", "abc", "'abc'", "threshold"),
    ("threshold", None, "None", "threshold"),
    ("threshold", 0.0, "0.0", "threshold"),
    ("threshold", 1, "1", "threshold"),
    ("threshold", True, "True", "threshold"),
    ("calibration", "x", "'x'", "calibrate"),
    ("calibration.temperature", 0, "0", "calibrate"),
    ("calibration.temperature", -0.3, "-0.3", "calibrate"),
    ("calibration.temperature", INF, "inf", "calibrate"),
    ("calibration.temperature", ..., "missing", "calibrate"),
    ("calibration.bias", [0.1, NAN, 0.0], "[0.1, nan, 0.0]", "calibrate"),
    ("calibration.bias", [0.1, 0.2], "[0.1, 0.2]", "calibrate"),
    ("conformal.qhat", 1.5, "1.5", "calibrate"),
    ("conformal.qhat", -0.1, "-0.1", "calibrate"),
    ("conformal.qhat", None, "None", "calibrate"),
    ("conformal.alpha", 0, "0", "calibrate"),
    ("conformal.alpha", "0.1", "'0.1'", "calibrate"),
    ("ood.threshold", INF, "inf", "calibrate"),
    ("ood.threshold", NAN, "nan", "calibrate"),
    ("ood.threshold", ..., "missing", "calibrate"),
    ("ood.upright_threshold", "high", "'high'", "calibrate"),
    ("preprocess", ..., "missing", None),
    ("preprocess", [224], "[224]", None),
    ("preprocess.size", -1, "-1", None),
    ("preprocess.size", 0, "0", None),
    ("preprocess.size", "224", "'224'", None),
    ("preprocess.size", 224.5, "224.5", None),
    ("preprocess.mean", [0.5, 0.5], "[0.5, 0.5]", None),
    ("preprocess.mean", [0.5, NAN, 0.5], "[0.5, nan, 0.5]", None),
    ("preprocess.std", [0.5, 0, 0.5], "[0.5, 0, 0.5]", None),
    ("preprocess.std", [0.5, -0.5, 0.5], "[0.5, -0.5, 0.5]", None),
    ("preprocess.std", "0.5", "'0.5'", None),
    ("preprocess.intensity", "sharpen", "'sharpen'", None),
]


@pytest.mark.parametrize(("key", "value", "shown", "rerun"), BAD,
                         ids=[f"{k}={'missing' if v is ... else repr(v)}" for k, v, *_ in BAD])
def test_a_bad_value_is_refused_on_load_with_one_line(tmp_path, key, value, shown, rerun):
    d = _config_only(tmp_path, key, value)
    with pytest.raises(ModelError) as e:
        read_config(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d / CONFIG_NAME}: {key} is {shown}")  # the file, the key, the value
    assert "it must be" in msg and "restore config.json from a copy of the model" in msg  # what it must be, what to do
    if rerun is None:
        return
    entry = key.split(".")[0]
    assert f"delete its '{entry}' entry and re-run 'pneumoscan {rerun} --model {d}'" in msg
    _set(cfg := json.loads((d / CONFIG_NAME).read_text()), entry, ...)  # do as the message says: the model loads
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    assert config_problems(read_config(d), d) == []


def test_every_problem_is_counted_and_check_lists_them(tmp_path):
    assert config_problems(read_config(PACKAGE_MODEL), PACKAGE_MODEL) == []  # the shipped config holds every rule
    d = _config_only(tmp_path, "threshold", NAN)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["conformal"]["qhat"], cfg["preprocess"]["std"] = 2, [0.5, 0, 0.5]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    problems = config_problems(cfg, d)
    assert [p.split(" is ")[0] for p in problems] == [f"{d / CONFIG_NAME}: {k}" for k in
                                                      ("threshold", "conformal.qhat", "preprocess.std")]
    with pytest.raises(ModelError) as e:
        read_config(d)
    assert str(e.value) == f"{problems[0]} (2 more: 'pneumoscan check --model {d}' lists them)"


def test_a_model_without_calibration_or_threshold_still_loads(tiny_model_dir, tmp_path):
    """Sections are checked only when present: an uncalibrated model, or one whose threshold was never
    chosen, is valid (temperature 1, the default threshold)."""
    from pneumoscan.predict import Predictor

    d = _edited(tiny_model_dir, tmp_path / "m", "threshold", ...)
    assert "calibration" not in read_config(d) and Predictor(d).threshold == DEFAULT_THRESHOLD
    cfg = read_config(d)
    cfg["calibration"] = {"temperature": "1"}  # ... but what is there must be usable
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="calibration.temperature is '1'"):
        Predictor(d)


@pytest.mark.parametrize(("key", "value"), [("calibration", {"temperature": 0.0, "bias": None}), ("threshold", 5.0),
                                            ("threshold", NAN)])
def test_predict_refuses_a_corrupt_config_instead_of_a_wrong_verdict(tiny_model_dir, dataset_dir, tmp_path, capsys,
                                                                     key, value):
    """Temperature 0 gave NaN probabilities and 'normal'; threshold 5 or NaN never called pneumonia."""
    d = _edited(tiny_model_dir, tmp_path / "m", key, value)
    image = next((dataset_dir / "train" / "PNEUMONIA").iterdir())
    assert main(["-q", "predict", "--model", str(d), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"pneumoscan: error: {d / CONFIG_NAME}: ")


@pytest.mark.parametrize(("key", "value"), [("threshold", "abc"), ("preprocess", ...), ("preprocess.size", -1),
                                            ("calibration", {"temperature": 0, "bias": None}), ("threshold", 5)])
def test_check_fails_each_bad_value_instead_of_crashing(tiny_model_dir, tmp_path, capsys, key, value):
    """A fresh card must not make a corrupt config pass ('pneumoscan card' refuses such a config, as every
    command that rewrites a model does; the card's Python writer describes it, as it does any config)."""
    from pneumoscan.evaluate.card import write_card

    d = _edited(tiny_model_dir, tmp_path / "m", key, value)
    assert main(["-q", "card", "--model", str(d)]) == 2
    write_card(d)
    capsys.readouterr()
    assert main(["-q", "check", "--no-parity", "--model", str(d)]) == 2
    out, err = capsys.readouterr()
    assert f"FAIL {d / CONFIG_NAME}: {key}" in out and "MODEL_CARD.md: up to date" in out
    assert err.startswith("pneumoscan: error: 1 check(s) failed") and "Traceback" not in err
