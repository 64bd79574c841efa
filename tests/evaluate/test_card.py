"""MODEL_CARD.md: regenerated from a real (tiny) model directory and checked section by section
against its config.json; evaluations added with ``card --add-eval``; the intended-use line and the
card path in ``predict`` output."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from pneumoscan import INTENDED_USE, LABELS
from pneumoscan.cli import main
from pneumoscan.evaluate.card import EVAL_DIR, NOT_RECORDED, write_card
from pneumoscan.evaluate.schema import CardError
from pneumoscan.nets.checkpoint import load_model
from pneumoscan.nets.modeldir import CARD_NAME, FORMAT
from pneumoscan.scope import DEFAULT_THRESHOLDS

SECTIONS = ("Model", "Training data", "Training procedure", "Validation results", "Evaluations on other data",
            "Intended use", "Out-of-scope use", "Calibration and prediction sets", "Known limitations")


@pytest.fixture()
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model (the session fixture must stay untouched)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def eval_metrics(tiny_model_dir, dataset_dir, tmp_path_factory) -> Path:
    """metrics.json of the real evaluator on the synthetic data set."""
    from pneumoscan.evaluate.config import EvaluateConfig
    from pneumoscan.evaluate.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    evaluate(dataset_dir, out, tiny_model_dir, EvaluateConfig(n_boot=200), progress=False)
    return out / "metrics.json"


def sections(card: str) -> dict[str, str]:
    """'## Title' -> body (subsections stay inside their section)."""
    out = {}
    for block in card.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        out[title.strip()] = body
    return out


def _rate(task: dict, key: str) -> str:
    lo, hi = task["ci95"][key]
    return f"{task[key]:.3f} ({lo:.3f}–{hi:.3f})"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_training_writes_the_card(tiny_model_dir):
    card = (tiny_model_dir / CARD_NAME).read_text()
    assert card.startswith("# Model card: ")
    assert list(sections(card))[:len(SECTIONS)] == list(SECTIONS)


def test_card_sections_match_config(model_dir):
    (model_dir / CARD_NAME).unlink()
    assert main(["-q", "card", "--model", str(model_dir)]) == 0
    card = (model_dir / CARD_NAME).read_text()
    cfg = json.loads((model_dir / "config.json").read_text())
    s = sections(card)
    assert cfg["model_id"] in card.splitlines()[0] and INTENDED_USE in card

    model = s["Model"]
    for text in (f"| pneumonia threshold | {cfg['threshold']:.4f} |", cfg["threshold_method"], cfg["backbone"],
                 cfg["timm_name"], cfg["weights_source"], ", ".join(cfg["labels"]), cfg["files"]["model.safetensors"],
                 f"{cfg['preprocess']['size']} x {cfg['preprocess']['size']} px"):
        assert text in model, text

    data = s["Training data"]
    assert "doi:10.17632/rscbjbr9sj" in data and "CC BY 4.0" in data and "Kermany" in data
    assert f"`{cfg['manifest_sha256']}`" in data and "recomputed hash matches the config" in data
    assert "grouped by patient" in data and "patients in more than one split: 0" in data
    for split, counts in cfg["data"]["counts"].items():
        row = [counts[lab] for lab in LABELS]
        assert f"| {split} | " + " | ".join(map(str, row)) + f" | {sum(row)} |" in data
    total = sum(sum(c.values()) for c in cfg["data"]["counts"].values())
    assert f"| {total} |" in data and "**Note:**" not in data  # file names follow the dataset's naming

    proc = s["Training procedure"]
    tc = cfg["train_config"]
    assert f"Command as run: `{cfg['command']}`" in proc
    assert f"--seed {tc['seed']}" in proc and f"--backbone {tc['backbone']}" in proc and "--no-pretrained" in proc
    assert f"- Seed: {tc['seed']}" in proc and f"Best epoch: {cfg['best_epoch']} of {cfg['epochs_run']}" in proc
    for key in tc:
        assert f"| `{key}` |" in proc, key
    assert f"cpus: {cfg['hardware']['cpus']}" in proc

    val = s["Validation results"]
    vm = cfg["val_metrics"]
    nvp = vm["normal_vs_pneumonia"]
    row = next(line for line in val.splitlines() if line.startswith("| normal vs pneumonia |"))
    for key in ("accuracy", "sensitivity", "specificity", "f1", "auc"):
        assert _rate(nvp, key) in row, key
    assert row.endswith(f"| {nvp['n']} | {nvp['tp']} | {nvp['fp']} | {nvp['tn']} | {nvp['fn']} |")
    assert f"{vm['three_class']['accuracy']:.3f}" in val and f"{vm['three_class']['macro_f1']:.3f}" in val
    for lab, counts in zip(LABELS, vm["confusion_matrix"]):
        assert f"| {lab} | " + " | ".join(map(str, counts)) + " |" in val
    for task in ("bacterial vs rest", "viral vs rest", "bacterial vs viral"):
        assert f"| {task}" in val

    assert "None recorded" in s["Evaluations on other data"]
    assert "Research and education" in s["Intended use"]
    oos = s["Out-of-scope use"]
    for word in ("Clinical diagnosis", "Adults", "Lateral views", "Other modalities"):
        assert word in oos
    t = DEFAULT_THRESHOLDS
    for text in (f"> {t.max_colorfulness:g}", f"> {t.max_aspect_ratio:g}", f"< {t.min_side_px} px"):
        assert text in oos
    lim = s["Known limitations"]
    for word in ("Single centre", "Ages 1-5", "Label noise", "Shift between the dataset's splits",
                 "over-call pneumonia", "224 x 224"):
        assert word in lim
    assert f"specificity {nvp['specificity']:.3f} here" in lim


def test_add_eval_stores_and_regenerates(model_dir, eval_metrics):
    before = (model_dir / "config.json").read_bytes()
    assert main(["-q", "card", "--model", str(model_dir), "--add-eval", str(eval_metrics), "--name", "synthetic"]) == 0
    m = json.loads(eval_metrics.read_text())
    rec = json.loads((model_dir / EVAL_DIR / "synthetic.json").read_text())
    assert rec["metrics"] == m and rec["name"] == "synthetic"
    assert (model_dir / "config.json").read_bytes() == before  # ids and SHA-256 untouched
    load_model(model_dir)  # weights still verify
    ev = sections((model_dir / CARD_NAME).read_text())["Evaluations on other data"]
    assert "### synthetic" in ev and f"{m['n']} images" in ev
    row = next(line for line in ev.splitlines() if line.startswith("| normal vs pneumonia |"))
    assert _rate(m["normal_vs_pneumonia"], "specificity") in row
    for lab, counts in zip(LABELS, m["confusion_matrix"]):
        assert f"| {lab} | " + " | ".join(map(str, counts)) + " |" in ev
    # a plain regeneration keeps it
    write_card(model_dir)
    assert "### synthetic" in (model_dir / CARD_NAME).read_text()


def test_extra_evals_from_python(model_dir, eval_metrics):
    m = json.loads(eval_metrics.read_text())
    m["normal_vs_pneumonia"]["auc"] = float("nan")  # undefined figures must survive as null
    path = write_card(model_dir, {"from-python": m})
    assert path == model_dir / CARD_NAME
    stored = json.loads((model_dir / EVAL_DIR / "from-python.json").read_text())["metrics"]
    assert stored["normal_vs_pneumonia"]["auc"] is None
    ev = sections(path.read_text())["Evaluations on other data"]
    assert "### from-python" in ev
    assert "| undefined (" in next(line for line in ev.splitlines() if line.startswith("| normal vs pneumonia |"))
    with pytest.raises(CardError):
        write_card(model_dir, {"bad": {"n": 3}})
    assert not (model_dir / EVAL_DIR / "bad.json").exists()


def _bad_metrics(eval_metrics: Path, tmp_path: Path) -> dict[str, Path]:
    m = json.loads(eval_metrics.read_text())
    cases = {
        "not-json": "{not json",
        "a-list": "[1, 2, 3]",
        "no-confusion": {k: v for k, v in m.items() if k != "confusion_matrix"},
        "wrong-n": {**m, "n": m["n"] + 1},
        "wrong-labels": {**m, "labels": ["a", "b", "c"]},
        "rate-out-of-range": {**m, "normal_vs_pneumonia": {**m["normal_vs_pneumonia"], "accuracy": 7}},
        "other-model": {**m, "model": {**m["model"], "id": "someone-else-000000000000"}},
    }
    out = {}
    for name, content in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        out[name] = p
    out["missing"] = tmp_path / "nope.json"
    return out


@pytest.mark.slow
def test_bad_add_eval_changes_nothing(model_dir, eval_metrics, tmp_path, capsys):
    before = _snapshot(model_dir)
    for case, path in _bad_metrics(eval_metrics, tmp_path).items():
        rc = main(["-q", "card", "--model", str(model_dir), "--add-eval", str(path), "--name", "x"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, case
        assert err.startswith("pneumoscan: error:") and len(err.splitlines()) == 1, (case, err)
        assert str(path) in err, (case, err)
    for argv in (["--add-eval", str(eval_metrics)], ["--name", "x"],
                 ["--add-eval", str(eval_metrics), "--name", "../escape"]):
        assert main(["-q", "card", "--model", str(model_dir), *argv]) == 2
        assert capsys.readouterr().err.startswith("pneumoscan: error:")
    assert main(["-q", "card", "--model", str(tmp_path / "absent")]) == 2
    assert _snapshot(model_dir) == before
    assert not list(model_dir.glob(".*tmp"))


def test_missing_fields_render_not_recorded(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": FORMAT, "data": {"counts": "garbage"},
                                               "val_metrics": "garbage", "members": 3}))
    (d / "manifest.csv").write_text("not,a,manifest\n")
    card = write_card(d).read_text()
    assert list(sections(card))[:len(SECTIONS)] == list(SECTIONS)
    assert card.count(NOT_RECORDED) >= 10
    assert "unreadable" in sections(card)["Training data"]


def test_ensemble_card_lists_members(tiny_model_dir, tmp_path):
    member = json.loads((tiny_model_dir / "config.json").read_text())
    d = tmp_path / "ens"
    d.mkdir()
    cfg = {"format": FORMAT, "kind": "ensemble", "name": "ensemble", "model_id": "ensemble-abc",
           "threshold": 0.4, "threshold_method": "Youden's J on validation", "command": "pneumoscan ensemble ...",
           "members": [member, {**member, "model_id": "second-member"}], "labels": list(LABELS)}
    (d / "config.json").write_text(json.dumps(cfg))
    s = sections(write_card(d).read_text())
    assert "ensemble of 2 models" in s["Model"]
    assert member["model_id"] in s["Model"] and "second-member" in s["Model"]
    assert f"`{member['manifest_sha256']}`" in s["Training data"]  # falls back to the members' data
    assert "Member 2 (`second-member`)" in s["Training procedure"]


def _predict(argv: list[str], capsys) -> str:
    assert main(["-q", "predict", *argv]) == 0
    return capsys.readouterr().out


def test_predict_outputs_carry_intended_use_and_card(tiny_model_dir, dataset_dir, capsys):
    img = str(next((dataset_dir / "train" / "NORMAL").glob("*.jpeg")))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    out = json.loads(_predict([img, "--model", str(tiny_model_dir), "--json"], capsys))
    assert out["intended_use"] == INTENDED_USE and out["model"] == cfg["model_id"]
    assert Path(out["model_card"]) == tiny_model_dir / CARD_NAME and Path(out["model_card"]).is_file()
    text = _predict([img, "--model", str(tiny_model_dir)], capsys)
    assert text.splitlines()[0] == f"# {INTENDED_USE}" and cfg["model_id"] in text.splitlines()[1]
    table = _predict([img, "--model", str(tiny_model_dir), "--csv"], capsys)
    rows = list(csv.reader(io.StringIO(table)))  # valid CSV: no comment line (the JSON and table carry the notice)
    assert rows[0][:3] == ["path", "in_scope", "label"] and rows[1][0] == img


def test_card_of_a_real_ensemble(tiny_model_dir, tmp_path):
    from pneumoscan.evaluate.operating_point import retune
    from pneumoscan.train.ensemble import build_ensemble

    out = build_ensemble([tiny_model_dir], tmp_path / "ens", tta="flip", command="pneumoscan ensemble test")
    retune(out)  # as 'pneumoscan ensemble' does
    cfg = json.loads((out / "config.json").read_text())
    s = sections(write_card(out).read_text())
    assert f"| pneumonia threshold | {cfg['threshold']:.4f} |" in s["Model"]
    assert "| test-time augmentation | flip |" in s["Model"]
    assert "random, not pretrained" in s["Model"]
    assert "Command as run: `pneumoscan ensemble test`" in s["Training procedure"]
    nvp = cfg["val_metrics"]["normal_vs_pneumonia"]
    assert _rate(nvp, "auc") in s["Validation results"]


def test_reproduce_command_parses_back_to_the_recorded_config(tiny_model_dir):
    """The card's command, run through the real parser, gives exactly the training config it records."""
    import dataclasses
    import shlex

    from pneumoscan.cli.flags import build
    from pneumoscan.cli.main import build_parser
    from pneumoscan.evaluate.card import reproduce_command
    from pneumoscan.train.config import TrainConfig

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cmd = reproduce_command(dict(cfg, train_config={**cfg["train_config"], "batch_size": 16}))
    assert "--head-batch-size 16" in cmd
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    rebuilt = dataclasses.asdict(build(TrainConfig, args))
    assert rebuilt == {**cfg["train_config"], "batch_size": 16}
    assert "Python API" not in (tiny_model_dir / "MODEL_CARD.md").read_text()


def _check(model_dir: Path, capsys) -> tuple[int, str]:
    """'pneumoscan check' after regenerating the card (a fresh card must not hide anything): (exit, stdout)."""
    assert main(["-q", "card", "--model", str(model_dir)]) == 0
    capsys.readouterr()
    rc = main(["-q", "check", "--no-parity", "--model", str(model_dir)])
    return rc, capsys.readouterr().out


def test_check_fails_on_a_missing_manifest(model_dir, capsys):
    (model_dir / "manifest.csv").unlink()
    rc, out = _check(model_dir, capsys)
    assert rc == 2 and "FAIL manifest.csv: missing, but config.json records the split the model was trained on" in out


def test_check_accepts_no_manifest_only_where_none_was_recorded(model_dir, capsys):
    """An ensemble of members trained on different splits records no manifest and has none: check says so."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["manifest_sha256"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg))
    (model_dir / "manifest.csv").unlink()
    rc, out = _check(model_dir, capsys)
    assert rc == 0 and "ok   manifest.csv: absent, as expected: config.json records no training manifest" in out


@pytest.mark.parametrize(("content", "why"), [
    ('{"name": "x", "metr', "not valid JSON"),
    ('{"name": "x"}', "it holds no 'metrics' object"),
    ('{"name": "x", "metrics": {"n": 3}}', "its metrics: "),
])
def test_check_fails_on_a_corrupt_stored_evaluation(model_dir, eval_metrics, capsys, content, why):
    assert main(["-q", "card", "--model", str(model_dir), "--add-eval", str(eval_metrics), "--name", "good"]) == 0
    (model_dir / EVAL_DIR / "x.json").write_text(content)
    rc, out = _check(model_dir, capsys)
    assert rc == 2 and f"ok   {EVAL_DIR}/good.json: a stored evaluation of this model" in out
    assert f"FAIL {model_dir / EVAL_DIR / 'x.json'} is not a stored evaluation: {why}" in out
    assert f"delete it, or store the evaluation again with 'pneumoscan card --model {model_dir} --add-eval" in out
    assert "### x" not in (model_dir / CARD_NAME).read_text() and "### good" in (model_dir / CARD_NAME).read_text()
