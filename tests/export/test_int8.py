"""The INT8 copy of an export: calibrated on training images, kept only when it passes the validation gate,
recorded with its SHA-256 and figures, chosen only on a VNNI-class CPU (the flags are passed in: the seam)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.errors import ModelError
from pneumoscan.export.config import QuantizeConfig
from pneumoscan.export.int8 import INT8_NAME, Int8GateError, export_int8, plan_int8
from pneumoscan.export.onnx import export_onnx
from pneumoscan.io import file_digest
from pneumoscan.nets.modeldir import int8_file, read_config
from pneumoscan.predict import Predictor, choose_precision
from pneumoscan.runtime import cpu_flags, int8_ready, weight_range

VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})
NO_VNNI = frozenset({"avx2", "fma"})


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Path:
    d = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("int8") / "tiny")
    export_onnx(d)
    return d


@pytest.fixture(scope="module")
def quantised(exported, tmp_path_factory) -> Path:
    """The tiny model exported with --int8 through the CLI (ONNX Runtime's quantiser: no extra package)."""
    d = shutil.copytree(exported, tmp_path_factory.mktemp("int8q") / "tiny")
    assert main(["-q", "export", "--model", str(d), "--int8", "--quantiser", "onnxruntime"]) == 0
    return d


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_int8_export_passes_the_gate_and_is_recorded(quantised):
    cfg = read_config(quantised)
    info = cfg["onnx"]["int8"]
    assert (quantised / INT8_NAME).is_file() and cfg["files"][INT8_NAME] == file_digest(quantised / INT8_NAME)
    assert info["source_sha256"] == cfg["files"]["model.onnx"] and int8_file(cfg) == INT8_NAME
    g = info["gate"]
    assert g["passed"] and g["agreement"] >= 0.99 and g["images"] == len(_val(quantised))
    assert g["auc_drop"] is None or g["auc_drop"] <= 0.003
    assert info["calibrated_on"]["split"] == "train" and info["calibrated_on"]["images"] > 0
    card = (quantised / "MODEL_CARD.md").read_text()
    assert "INT8" in card and f"{g['agreement']:.1%}" in card and INT8_NAME in card
    assert f"{info['weights']}-range s8 weights" in card
    assert g["instruction_set"] == (int8_ready() or "none of avx512_vnni, avx_vnni, amx_int8")  # what measured the gate
    assert f"the gate ran on a CPU with {g['instruction_set']}" in card
    assert leftovers(quantised) == []


def _val(d: Path):
    from pneumoscan.data.splits import validation_set

    return validation_set(None, read_config(d), d)


@pytest.mark.slow
def test_engine_runs_int8_only_on_a_vnni_cpu(quantised, dataset_dir):
    fast = Predictor(quantised, backend="onnx", cpu_flags=VNNI)
    plain = Predictor(quantised, backend="onnx", cpu_flags=NO_VNNI)
    assert fast.precision == "int8" and fast.onnx_path.name == INT8_NAME and "avx512_vnni" in fast.precision_reason
    assert plain.precision == "fp32" and plain.onnx_path.name == "model.onnx" and "VNNI" not in plain.precision_reason
    assert "avx512_vnni" in plain.precision_reason  # names the instructions it looked for
    info = read_config(quantised)["onnx"]["int8"]
    assert info["weights"] == weight_range("auto")[0]  # what this CPU computes exactly (the gate measured it)
    if info["weights"] == "reduced":  # exact on any CPU
        forced = Predictor(quantised, backend="onnx", precision="int8", cpu_flags=NO_VNNI)
        assert forced.precision == "int8" and "no faster" in forced.precision_reason
    else:  # full-range weights saturate in the kernels of a CPU without VNNI: refused, not served
        with pytest.raises(ModelError, match="saturating sums.*--weight-range reduced"):
            Predictor(quantised, backend="onnx", precision="int8", cpu_flags=NO_VNNI)
    files = sorted(str(p) for p in Path(dataset_dir).rglob("*.jpeg"))[:6]
    a, _ = fast.predict_files(files)
    b, _ = plain.predict_files(files)
    assert [p.label for p in a] == [p.label for p in b]
    assert max(abs(x.probabilities[k] - y.probabilities[k]) for x, y in zip(a, b) for k in x.probabilities) < 0.1
    assert fast.has_cam and fast.explain_xray(fast.decode(files[0]), "x")[1] is not None  # maps from the fp32 graph


@pytest.mark.slow
def test_failing_the_gate_writes_nothing(exported, tmp_path):
    d = shutil.copytree(exported, tmp_path / "m")
    before = (d / "config.json").read_bytes(), file_digest(d / "model.onnx")
    size = read_config(d)["preprocess"]["size"]
    # calibrated on flat grey frames, every activation range is a point: real X-rays saturate and verdicts change
    flat = [np.full((4, 3, size, size), 0.01, np.float32)]
    with pytest.raises(Int8GateError, match=r"failed the validation gate: .*identical verdicts .*nothing was written"):
        export_int8(d, cfg=QuantizeConfig(quantiser="onnxruntime", min_agreement=1.0, max_auc_drop=0.0),
                    calibration=flat)
    assert not (d / INT8_NAME).exists() and leftovers(d) == []
    assert ((d / "config.json").read_bytes(), file_digest(d / "model.onnx")) == before


@pytest.mark.slow
def test_nncf_quantiser(exported, tmp_path):
    pytest.importorskip("nncf")
    d = shutil.copytree(exported, tmp_path / "m")
    g = export_int8(d, cfg=QuantizeConfig(quantiser="nncf", calibration_images=16))
    info = read_config(d)["onnx"]["int8"]
    assert g["passed"] and info["quantiser"].startswith("nncf") and int8_file(read_config(d)) == INT8_NAME
    assert Predictor(d, backend="onnx", cpu_flags=VNNI).precision == "int8"


def test_missing_data_is_one_line_before_the_export(tiny_model_dir, tmp_path, capsys):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    rows = (d / "manifest.csv").read_text().splitlines()
    (d / "manifest.csv").write_text("\n".join([rows[0]] + [r.replace("/", "/gone/", 1) for r in rows[1:]]) + "\n")
    assert main(["-q", "export", "--model", str(d), "--int8", "--quantiser", "onnxruntime"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not on this machine" in err[0] and "--data" in err[0]
    assert not (d / "model.onnx").exists()  # refused before the minute of exporting


@pytest.mark.parametrize("kw, message", [
    ({"calibration_images": 0}, "--calibration-images 0"),
    ({"calibration": "mean"}, "--calibration 'mean'"),
    ({"min_agreement": 1.5}, "--min-agreement 1.5"),
    ({"quantiser": "tensorrt"}, "--quantiser 'tensorrt'"),
    ({"guard_quantile": 1.5}, "--guard-quantile 1.5"),
])
def test_bad_settings_name_the_value(kw, message):
    with pytest.raises(ModelError, match=message):
        QuantizeConfig(**kw)


@pytest.mark.slow
def test_reexport_drops_the_stale_int8(quantised, tmp_path):
    d = shutil.copytree(quantised, tmp_path / "m")
    export_onnx(d)
    cfg = read_config(d)
    assert INT8_NAME not in cfg["files"] and "int8" not in cfg["onnx"] and not (d / INT8_NAME).exists()


def _config(passed: bool = True, stale: bool = False, exact: bool = True) -> dict:
    return {"files": {"model.onnx": "a", INT8_NAME: "b"},
            "onnx": {"file": "model.onnx", "int8": {"file": INT8_NAME, "source_sha256": "old" if stale else "a",
                                                   "weights": "reduced" if exact else "full",
                                                   "gate": {"passed": passed, "agreement": 0.995, "images": 1000}}}}


@pytest.mark.parametrize("config, requested, flags, expected", [
    (_config(), "auto", VNNI, "int8"),
    (_config(), "auto", frozenset({"avx_vnni", "avx2"}), "int8"),
    (_config(), "auto", frozenset({"amx_int8"}), "int8"),
    (_config(), "auto", NO_VNNI, "fp32"),
    (_config(), "fp32", VNNI, "fp32"),
    (_config(passed=False), "auto", VNNI, "fp32"),
    (_config(stale=True), "auto", VNNI, "fp32"),  # made from another fp32 graph
    ({"files": {"model.onnx": "a"}, "onnx": {"file": "model.onnx"}}, "auto", VNNI, "fp32"),
    (_config(), "int8", NO_VNNI, "int8"),  # reduced-range weights: exact here, only not faster
    (_config(exact=False), "int8", VNNI, "int8"),
    (_config(exact=False), "auto", NO_VNNI, "fp32"),
])
def test_precision_rule(config, requested, flags, expected):
    assert choose_precision(config, requested, flags)[0] == expected


def test_full_range_int8_is_refused_where_its_sums_saturate():
    for cfg in (_config(exact=False), {**_config(), "onnx": {**_config()["onnx"], "int8": {
            k: v for k, v in _config()["onnx"]["int8"].items() if k != "weights"}}}):  # older exports: full
        with pytest.raises(ModelError, match=r"full-range weights.*saturating sums.*--precision fp32"):
            choose_precision(cfg, "int8", NO_VNNI)


@pytest.mark.parametrize("requested, flags, expected", [
    ("auto", VNNI, "full"), ("auto", frozenset({"amx_int8"}), "full"), ("auto", NO_VNNI, "reduced"),
    ("auto", frozenset(), "reduced"), ("full", NO_VNNI, "full"), ("reduced", VNNI, "reduced"),
])
def test_weight_range_follows_the_cpu(requested, flags, expected):
    got, why = weight_range(requested, flags)
    assert got == expected and why
    if requested == "auto" and expected == "reduced":
        assert "saturate" in why


def test_unknown_weight_range_is_refused():
    with pytest.raises(ModelError, match="--weight-range 'half' is unknown"):
        QuantizeConfig(weight_range="half")
    with pytest.raises(ModelError, match="unknown"):
        weight_range("half", VNNI)


@pytest.fixture(scope="module")
def gated(exported, tmp_path_factory) -> Path:
    """The tiny model calibrated (with the learned out-of-scope gate), then exported with --int8."""
    d = shutil.copytree(exported, tmp_path_factory.mktemp("int8ood") / "tiny")
    assert main(["-q", "calibrate", "--model", str(d), "--pca-dim", "4"]) == 0
    assert main(["-q", "export", "--model", str(d), "--int8", "--min-agreement", "0.5"]) == 0
    return d


@pytest.mark.slow
def test_int8_has_its_own_out_of_scope_threshold_and_the_engine_uses_it(gated):
    from pneumoscan.export.int8 import int8_ood_threshold
    from pneumoscan.runtime import ort_session
    from pneumoscan.uncertainty import OODScorer, ood_threshold

    cfg = read_config(gated)
    t32, t8 = cfg["ood"]["threshold"], cfg["onnx"]["int8"]["ood_threshold"]
    assert t8 is not None and t8 != t32
    assert cfg["onnx"]["int8"]["gate"]["ood_threshold"] == {"fp32": t32, "int8": t8}
    assert ood_threshold(cfg, "int8") == t8 and ood_threshold(cfg, "fp32") == ood_threshold(cfg) == t32
    guarded = Predictor(gated, backend="onnx", cpu_flags=VNNI)  # the guard reads INT8's threshold; fp32's decides
    assert guarded._int8_ood_threshold == t8 and guarded.ood_threshold == t32
    assert Predictor(gated, backend="onnx", cpu_flags=NO_VNNI).ood_threshold == t32
    assert Predictor(gated, backend="torch").ood_threshold == t32
    assert f"{t8:.2f}" in (gated / "MODEL_CARD.md").read_text()  # the card shows INT8's threshold beside fp32's
    # a graph that computes what fp32 computes needs no other threshold
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    ood = OODScorer.load(gated / cfg["ood"]["file"])
    s = ood.score(ort_session(gated / "model.onnx").run(["features"], {"input": x})[0])
    assert int8_ood_threshold(s, s, t32) == pytest.approx(t32, rel=1e-9)
    assert int8_ood_threshold(s, np.sqrt(s ** 2 + 3.0), t32) == pytest.approx(np.sqrt(t32 ** 2 + 3.0))


@pytest.fixture(scope="module")
def unguarded(gated, tmp_path_factory) -> Path:
    """The same model exported with --int8 --guard-quantile 0: INT8 answers every image alone."""
    d = shutil.copytree(gated, tmp_path_factory.mktemp("int8raw") / "tiny")
    assert main(["-q", "export", "--model", str(d), "--int8", "--min-agreement", "0.5", "--guard-quantile", "0"]) == 0
    return d


@pytest.mark.slow
def test_the_served_int8_path_is_the_one_the_gate_measured(gated, unguarded, dataset_dir):
    """The guard's margins are recorded; the predictor sends back to fp32 exactly the images the gate counted and
    gives exactly the verdicts the gate counted as identical; without the guard, INT8 answers alone."""
    info = read_config(gated)["onnx"]["int8"]
    g = info["gate"]
    assert info["guard"]["quantile"] == 0.9 and info["guard"]["margins"] == g["guard"]["margins"]
    assert set(g["int8_alone"]) >= {"agreement", "class_agreement", "auc_int8"}
    val = _val(gated)
    fast = Predictor(gated, backend="onnx", cpu_flags=VNNI)
    exact = Predictor(gated, backend="onnx", precision="fp32")
    a, _ = fast.predict_files(val.paths, batch_size=7)
    b, _ = exact.predict_files(val.paths)
    assert sum(x.verdict == y.verdict for x, y in zip(a, b)) == g["identical_verdicts"]
    assert fast.rechecked == {"images": len(val.paths), "fp32": g["guard"]["fp32_images"]}
    assert "guard" in fast.precision_reason
    raw_info = read_config(unguarded)["onnx"]["int8"]
    assert raw_info["guard"] is None and "guard" not in raw_info["gate"]
    assert raw_info["gate"]["agreement"] == g["int8_alone"]["agreement"]  # the same graph, alone
    raw = Predictor(unguarded, backend="onnx", cpu_flags=VNNI)
    assert raw.ood_threshold == raw_info["ood_threshold"] and "guard" not in raw.precision_reason
    c, _ = raw.predict_files(val.paths)
    assert sum(x.verdict == y.verdict for x, y in zip(c, b)) == raw_info["gate"]["identical_verdicts"]
    assert raw.rechecked is None and exact.rechecked is None


def test_int8_requested_without_a_gated_export_says_what_to_do():
    with pytest.raises(ModelError, match="no INT8 export that passed .*'pneumoscan export --int8"):
        choose_precision(_config(passed=False), "int8", VNNI)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n")
    flags = cpu_flags(f)
    assert {"avx2", "avx512_vnni"} <= flags and int8_ready(flags) == "avx512_vnni"
    assert cpu_flags(tmp_path / "absent") == frozenset() and int8_ready(frozenset({"avx2"})) is None


def test_plan_checks_the_images(tiny_model_dir):
    plan = plan_int8(tiny_model_dir, None, QuantizeConfig(calibration_images=5))
    assert len(plan.calibration) == 5 and len(plan.val) > 0
    val = set(plan.val.paths)
    assert not val & set(plan.calibration)  # calibrated on training images, never on the gate's
    assert json.loads((tiny_model_dir / "config.json").read_text())  # nothing written


def test_a_histogram_calibration_that_would_not_fit_in_memory_is_refused_before_the_work(exported, tmp_path, capsys,
                                                                                       monkeypatch):
    """ONNX Runtime's percentile/entropy calibrators keep every activation of every image: a run that would
    not fit is one line naming how many images would, before anything is quantised; min-max is never refused."""
    import onnx

    from pneumoscan.export import int8

    model = onnx.load(str(exported / "model.onnx"))
    per = int8.activation_bytes(model)
    assert per > 3 * 64 * 64 * 4  # at least the input image's worth of activations (64 px tiny model)
    cfg = QuantizeConfig(quantiser="onnxruntime", calibration="percentile")
    int8.check_calibration_memory(model, 10, cfg, available=100 * per)  # fits: nothing said
    with pytest.raises(ModelError, match=r"--calibration-images \d+ or fewer"):
        int8.check_calibration_memory(model, 256, cfg, available=100 * per)
    int8.check_calibration_memory(model, 256, QuantizeConfig(quantiser="onnxruntime"), available=100 * per)  # min-max
    d = shutil.copytree(exported, tmp_path / "m")
    before = sorted(p.name for p in d.iterdir())
    monkeypatch.setattr(int8, "memory_available", lambda: 4 * per)  # a machine with little memory
    rc = main(["-q", "export", "--model", str(d), "--int8", "--quantiser", "onnxruntime", "--calibration", "entropy",
               "--calibration-images", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--calibration-images 3 or fewer" in err[0]
    assert sorted(p.name for p in d.iterdir()) == before  # refused before the export: nothing written


def test_memory_available_is_this_machine_s():
    import psutil

    from pneumoscan.runtime import memory_available

    assert 0 < memory_available() <= psutil.virtual_memory().total


def _with_margins(src: Path, dst: Path, margin: float) -> Path:
    d = shutil.copytree(src, dst)
    cfg = read_config(d)
    cfg["onnx"]["int8"]["guard"]["margins"] = {k: margin for k in cfg["onnx"]["int8"]["guard"]["margins"]}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.slow
def test_the_guard_answers_with_fp32_where_it_sends_images_back(gated, unguarded, tmp_path, dataset_dir):
    files = sorted(str(p) for p in Path(dataset_dir).rglob("*.jpeg"))
    exact = Predictor(gated, backend="onnx", precision="fp32")
    every = Predictor(_with_margins(gated, tmp_path / "every", 1e9), backend="onnx", cpu_flags=VNNI)
    none = Predictor(_with_margins(gated, tmp_path / "none", 0.0), backend="onnx", cpu_flags=VNNI)
    raw = Predictor(unguarded, backend="onnx", cpu_flags=VNNI)
    b, _ = exact.predict_files(files)
    a, _ = every.predict_files(files, batch_size=5)
    assert every.precision == "int8" and every.rechecked == {"images": len(files), "fp32": len(files)}
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]  # fp32's answers, scores and verdicts, to the bit
    c, _ = none.predict_files(files)
    d, _ = raw.predict_files(files)
    assert none.rechecked == {"images": len(files), "fp32": 0}
    assert [x.probabilities for x in c] == [x.probabilities for x in d]  # INT8's own answers
    assert max(abs(x.probabilities[k] - y.probabilities[k]) for x, y in zip(c, b) if x.in_scope and y.in_scope
               for k in x.probabilities) > 0  # and those are not fp32's


@pytest.mark.slow
def test_recalibrating_voids_the_int8_gate_and_guard(gated, tmp_path):
    cfg = read_config(gated)
    assert cfg["onnx"]["int8"]["decision"]["temperature"] == cfg["calibration"]["temperature"]
    assert choose_precision(cfg, "auto", VNNI)[0] == "int8"
    cfg["calibration"]["temperature"] *= 2  # what 'pneumoscan calibrate' does after the export: new margins needed
    precision, why = choose_precision(cfg, "auto", VNNI)
    assert precision == "fp32" and "re-export" not in why and "no longer hold" in why
    with pytest.raises(ModelError, match="no longer hold.*pneumoscan export --int8"):
        choose_precision(cfg, "int8", VNNI)
