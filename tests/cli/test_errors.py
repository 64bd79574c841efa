"""Every mistake a user can make is one line ``pneumoscan: error: ...`` and exit 2, found before the work
starts, with nothing half written: one table of bad invocations, a walk over every command with an
output it cannot write, and the cases of issue 12 (data that is gone, folders reused, the shipped model)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pneumoscan.cli import main

PACKAGE_MODEL = Path(__file__).resolve().parents[2] / "src" / "pneumoscan" / "models" / "default"


def one_error_line(capsys, argv, *needles) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("WARNING", "INFO", "usage:", " "))]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture()
def nonempty(tmp_path):
    d = tmp_path / "taken"
    d.mkdir()
    (d / "keep.txt").write_text("a user's file")
    return d


BAD = [  # (argv, text the one error line must hold); DATA, MODEL, NONEMPTY, IMG are filled in below
    (["finetune", "DATA", "--out", "OUT", "--devices", "99", "--accelerator", "cpu"], "--devices 99 but this machine"),
    (["finetune", "DATA", "--out", "OUT", "--strategy", "foo"], "strategy 'foo' is unknown"),
    (["finetune", "DATA", "--out", "OUT", "--precision", "8"], "invalid choice: '8'"),
    (["finetune", "DATA", "--out", "OUT", "--accelerator", "gpu"], "this machine has no GPU"),
    (["finetune", "DATA", "--out", "OUT", "--devices", "two"], "'two' is not an integer or 'auto'"),
    (["train", "DATA", "--out", "OUT", "--size", "0"], "image size 0 is out of range"),
    (["train", "DATA", "--out", "OUT", "--lr", "0"], "learning rate 0.0 must be above 0"),
    (["train", "DATA", "--out", "NONEMPTY"], "is not empty; choose a new folder or pass --overwrite"),
    (["ensemble", "MODEL", "--tta", "flip", "--out", "NONEMPTY"], "is not empty"),
    (["data", "index", "DATA", "--out", "NONEMPTY"], "is a folder; give a file name"),
    (["export", "--model", "MODEL", "--opset", "5"], "--opset 5 cannot be produced"),
    (["export"], "shipped inside pneumoscan and is read-only"),
    (["card"], "shipped inside pneumoscan and is read-only"),
    (["threshold", "--model", str(PACKAGE_MODEL)], "shipped inside pneumoscan and is read-only"),
    (["predict", "IMG", "--model", "MODEL", "--out", "NONEMPTY"], "is a folder; give a file name"),
    (["evaluate", "--data", "DATA", "--model", "MODEL", "--out", "IMG"], "is a file; give a folder"),
    (["train", "MISSING", "--out", "OUT"], "does not exist"),
    (["evaluate", "--data", "MISSING", "--out", "OUT"], "does not exist"),
    (["check", "--model", "MISSING"], "does not exist"),
    (["cache", "clear", "--cache", "NONEMPTY", "--backbone", "nosuch"], "no feature cache of backbone 'nosuch'"),
    (["cache", "clear", "--cache", "OUT"], "does not exist"),  # used to 'remove 0 caches' and exit 0
    (["cache", "list", "--cache", "IMG"], "is not a folder"),
    # numbers no setting means anything at, refused while the options are read (they used to fail minutes later)
    (["robustness", "--model", "MODEL", "--data", "DATA", "--out", "OUT", "--seed", "-1"], "-1 must be between 0 and"),
    (["data", "index", "DATA", "--seed", "-1"], "-1 must be between 0 and 4294967295"),
    (["data", "index", "DATA", "--val-fraction", "0.9"], "must lie in (0, 0.5]"),  # was silently 0.5
    (["train", "DATA", "--out", "OUT", "--val-fraction", "0.6"], "must lie in (0, 0.5]"),
    (["threshold", "--model", "MODEL", "--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["soup", "MODEL", "MODEL2", "--out", "OUT", "--coefficients", "inf,1"], "'inf' is not a finite number"),
    (["soup", "MODEL", "MODEL2", "--out", "OUT", "--coefficients", "1,-1"], "give non-negative numbers"),
    (["soup", "MODEL", "MODEL2", "MODEL3", "--out", "OUT", "--coefficients", "1,1"], "has 2 numbers for 3 models"),
    (["soup", "MODEL", "MODEL2", "--out", "OUT", "--max-auc-drop", "nan"], "'nan' is not a finite number"),
    (["soup", "MODEL", "MODEL2", "--out", "OUT", "--max-accuracy-drop", "2"], "2.0 must lie in [-1, 1]"),
    (["compare", "DATA", "--out", "OUT", "--step-gamma", "nan"], "'nan' is not a finite number"),
    (["evaluate", "--data", "DATA", "--out", "OUT", "--n-boot", "1000000000"], "must be between 0 and 100000"),
    (["explain", "IMG", "--out", "OUT", "--sample", "0"], "--sample 0 must be at least 1"),
    (["bench", "extract", "--out", "OUT", "--data", "MISSING"], "does not exist"),  # an IndexError 18 s later
    (["bench", "extract", "--out", "OUT", "--image-px", "0"], "--image-px 0 must lie in [32, 4096]"),
    (["finetune", "DATA", "--out", "OUT", "--rotate", "-5"], "--rotate -5.0 must lie in [0, 180]"),  # was a traceback
    # options that contradict each other: one used to be silently ignored
    (["train", "DATA", "--out", "OUT", "--weights", "IMG", "--no-pretrained"], "random weights would be used"),
    (["threshold", "--model", "MODEL", "--target-sensitivity", "0.9"], "used only by the sensitivity method"),
    (["calibrate", "--model", "MODEL", "--no-temperature", "--scaling", "bias-corrected"], "drop one of the two"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[:2]) + " " + n[:24] for a, n in BAD])
def test_bad_invocations_are_one_line_and_exit_2(argv, needle, dataset_dir, tiny_model_dir, nonempty, tmp_path,
                                                 capsys):
    img = next((dataset_dir / "train" / "NORMAL").glob("*.jpeg"))
    subst = {"DATA": str(dataset_dir), "MODEL": str(tiny_model_dir), "NONEMPTY": str(nonempty), "IMG": str(img),
             "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing")}
    for extra in ("MODEL2", "MODEL3"):  # other members: copies of the model
        if extra in argv:
            subst[extra] = shutil.copytree(tiny_model_dir, tmp_path / extra.lower())
    argv = [str(subst.get(a, a)) for a in argv]
    before = sorted(p.name for p in nonempty.iterdir())
    one_error_line(capsys, ["-q", *argv, "--no-pretrained"] if argv[0] in ("finetune", "train") else ["-q", *argv],
                   needle)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in nonempty.iterdir()) == before


# ----------------------------------------------------------------------------------------------- read-only outputs

PROBE = textwrap.dedent("""
    import sys
    from pneumoscan.cli import main
    rc = main(sys.argv[1:])
    print("LOADED", ",".join(m for m in ("torch", "timm", "lightning", "onnxruntime") if m in sys.modules))
    sys.exit(rc)
""")


def _as_other_user() -> list[str]:
    """Run as 'nobody' when we are root: root writes into read-only folders, a user cannot."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv cannot see a read-only folder")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, dataset_dir, tiny_model_dir):
    """Inputs that another user can read, a read-only folder, a read-only model and scratch space."""
    root = Path(tempfile.mkdtemp(prefix="pneumoscan-ro-"))
    os.chmod(root, 0o755)
    data = shutil.copytree(dataset_dir, root / "data")
    model = shutil.copytree(tiny_model_dir, root / "model")
    ro_model = shutil.copytree(tiny_model_dir, root / "ro-model")
    scratch = root / "scratch"
    scratch.mkdir(mode=0o777)
    os.chmod(scratch, 0o777)
    ro = root / "ro"
    ro.mkdir()
    for p in [*root.rglob("*"), root]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(scratch, 0o777)
    for p in [*ro_model.rglob("*"), ro_model, ro]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    yield {"data": data, "model": model, "ro_model": ro_model, "ro": ro, "scratch": scratch,
           "img": next((data / "train" / "NORMAL").glob("*.jpeg"))}
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o755)
    shutil.rmtree(root, ignore_errors=True)


def _walk(w) -> list[list[str]]:
    ro, d, m, img = str(w["ro"]), str(w["data"]), str(w["model"]), str(w["img"])
    tiny = ["--backbone", "test_efficientnet", "--no-pretrained", "--size", "64"]
    return [
        ["data", "index", d, "--out", f"{ro}/manifest.csv"],
        ["data", "download", "--dest", f"{ro}/dl", "--url", "http://127.0.0.1:9/x.zip"],
        ["extract", d, *tiny, "--cache", f"{ro}/cache"],
        ["train", d, "--out", f"{ro}/m", *tiny],
        ["finetune", d, "--out", f"{ro}/m", *tiny, "--accelerator", "cpu"],
        ["compare", d, "--out", f"{ro}/c", "--backbones", "test_efficientnet", "--no-pretrained", "--sizes", "64"],
        ["run", d, "--out", f"{ro}/r", *tiny],
        ["ensemble", m, "--tta", "flip", "--out", f"{ro}/e"],
        ["soup", m, str(w["ro_model"]), "--out", f"{ro}/s"],
        ["evaluate", "--data", d, "--model", m, "--out", f"{ro}/ev"],
        ["robustness", "--data", d, "--model", m, "--out", f"{ro}/rob"],
        ["explain", img, "--model", m, "--out", f"{ro}/ex"],
        ["visualize", "filters", "--model", m, "--out", f"{ro}/f.png"],
        ["visualize", "activations", img, "--model", m, "--out", f"{ro}/a.png"],
        ["predict", img, "--model", m, "--csv", "--out", f"{ro}/p.csv"],
        ["export", "--model", str(w["ro_model"])],
        ["threshold", "--model", str(w["ro_model"])],
        ["card", "--model", str(w["ro_model"])],
    ]


@pytest.mark.slow
def test_every_command_refuses_an_output_it_cannot_write_before_any_work(world):
    env = {**os.environ, "PNEUMOSCAN_PROGRESS": "0", "PNEUMOSCAN_CACHE": str(world["scratch"] / "cache"),
           "MPLCONFIGDIR": str(world["scratch"] / "mpl"), "HOME": str(world["scratch"])}
    ro_model_before = {p.name: p.read_bytes() for p in world["ro_model"].iterdir() if p.is_file()}
    failures = []
    for argv in _walk(world):
        r = subprocess.run([*_as_other_user(), sys.executable, "-c", PROBE, "-q", *argv], capture_output=True,
                           text=True, timeout=120, env=env, cwd=world["scratch"])
        lines = r.stderr.strip().splitlines()
        loaded = r.stdout.split("LOADED")[-1].strip()
        problems = []
        if r.returncode != 2:
            problems.append(f"exit {r.returncode}")
        if len(lines) != 1 or not lines[0].startswith("pneumoscan: error: ") or "Traceback" in r.stderr:
            problems.append(f"stderr {r.stderr.strip()[-300:]!r}")
        if any(m in loaded for m in ("torch", "lightning")):
            problems.append(f"work started before the check (loaded {loaded})")
        if problems:
            failures.append(f"{' '.join(argv[:2])}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert list(world["ro"].iterdir()) == []
    assert {p.name: p.read_bytes() for p in world["ro_model"].iterdir() if p.is_file()} == ro_model_before


def test_the_check_sees_an_unwritable_folder_as_another_user(world):
    """The walk above is only meaningful if the folder really is read-only for the user it runs as."""
    r = subprocess.run([*_as_other_user(), sys.executable, "-c",
                        f"import os; print(os.access({str(world['ro'])!r}, os.W_OK))"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------- issue 12 cases


def _index(src: Path, dst: Path, n_patients: int = 5) -> Path:
    from synthetic import make_dataset

    make_dataset(dst, n_patients=n_patients, per_patient=2, seed=3, size=48)
    return dst


@pytest.mark.slow
def test_train_refuses_images_that_are_gone_or_too_few(tmp_path, capsys):
    data = _index(tmp_path, tmp_path / "d")
    assert main(["-q", "data", "index", str(data)]) == 0
    manifest = data / "manifest.csv"
    rows = manifest.read_text().splitlines()
    victims = [line.split(",")[0] for line in rows[1:]][:24]
    for v in victims:
        Path(v).unlink()
    args = ["-q", "train", str(manifest), "--backbone", "test_efficientnet", "--no-pretrained", "--size", "32",
            "--cache", str(tmp_path / "c"), "--workers", "0"]
    one_error_line(capsys, [*args, "--out", str(tmp_path / "m")], "24 of the 30 images", "are gone",
                   "pneumoscan data index")
    assert not (tmp_path / "m").exists()
    # two validation images of one class gone from a fresh copy: too few to measure specificity
    data2 = _index(tmp_path, tmp_path / "d2")
    assert main(["-q", "data", "index", str(data2)]) == 0
    m2 = data2 / "manifest.csv"
    val_normal = [line for line in m2.read_text().splitlines()[1:] if line.split(",")[4] == "val"
                  and line.split(",")[2] == "normal"]
    kept = [line for line in m2.read_text().splitlines() if line not in val_normal[1:]]
    m2.write_text("\n".join(kept) + "\n")
    one_error_line(capsys, [*args[:2], str(m2), *args[3:], "--out", str(tmp_path / "m2")],
                   "each class needs at least 2")


@pytest.mark.slow
def test_a_moved_data_folder_is_found_beside_its_manifest_and_counts_are_what_was_used(tmp_path, capsys):
    data = _index(tmp_path, tmp_path / "d")
    assert main(["-q", "data", "index", str(data)]) == 0
    moved = tmp_path / "elsewhere"
    data.rename(moved)
    out = tmp_path / "m"
    assert main(["-q", "train", str(moved), "--out", str(out), "--backbone", "test_efficientnet", "--no-pretrained",
                 "--size", "32", "--cache", str(tmp_path / "c"), "--workers", "0", "--epochs", "3"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    used = cfg["data"]["counts"]
    assert sum(sum(c.values()) for c in used.values()) == 30 == sum(sum(c.values())
                                                                    for c in cfg["data"]["manifest_counts"].values())


def test_retraining_needs_overwrite_and_replaces_the_whole_folder(tiny_model_dir, dataset_dir, tmp_path, capsys):
    out = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (out / "evaluations").mkdir(exist_ok=True)
    (out / "evaluations" / "old.json").write_text("{}")
    (out / "model.onnx").write_bytes(b"stale")
    argv = ["-q", "ensemble", str(tiny_model_dir), "--tta", "flip", "--out", str(out)]
    one_error_line(capsys, argv, "is not empty")
    assert (out / "model.onnx").read_bytes() == b"stale"  # untouched
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "model.onnx").exists() and not (out / "evaluations").exists()
    assert json.loads((out / "config.json").read_text())["kind"] == "ensemble"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_data_index_writes_atomically_and_concurrently(dataset_dir, tmp_path):
    import threading

    out = tmp_path / "same.csv"
    rcs = []
    threads = [threading.Thread(target=lambda: rcs.append(main(["-q", "data", "index", str(dataset_dir), "--out",
                                                                 str(out)]))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rcs == [0, 0, 0] and out.read_text().startswith("path,relpath,label")
    assert [p.name for p in tmp_path.iterdir()] == ["same.csv"]  # no temporary left behind


def test_train_uses_the_manifest_beside_the_data(tmp_path, capsys):
    from pneumoscan.data.index import resolve_manifest
    from pneumoscan.data.manifest import Manifest

    data = _index(tmp_path, tmp_path / "d")
    assert main(["-q", "data", "index", str(data), "--val-fraction", "0.4", "--seed", "4"]) == 0
    beside = Manifest.load(data / "manifest.csv")
    assert resolve_manifest(data).digest() == beside.digest()  # not a fresh 0.2 / seed 0 split
    assert resolve_manifest(data).digest() != resolve_manifest(data / "train").digest()


def test_dicom_files_without_an_extension_count_in_folders(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from synthetic import make_dataset

    from pneumoscan.data.index import index_dataset, iter_image_files

    data = make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=32)
    dcm = _dicom_bytes()
    (data / "train" / "NORMAL" / "IM-0900-0001").write_bytes(dcm)  # a PACS export: no extension
    (data / "train" / "NORMAL" / "notes").write_text("not an image")
    files, _ = iter_image_files([data / "train" / "NORMAL"])
    assert any(f.name == "IM-0900-0001" for f in files) and not any(f.name == "notes" for f in files)
    m = index_dataset(data)
    assert any(s.relpath.endswith("IM-0900-0001") for s in m.samples)
    assert any(p.endswith("notes") for p, _ in m.skipped)


def _dicom_bytes() -> bytes:
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.slow
def test_evaluate_on_training_images_says_so_everywhere(tiny_model_dir, dataset_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["-q", "evaluate", "--data", str(dataset_dir), "--model", str(tiny_model_dir), "--out", str(out),
                 "--n-boot", "0"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["training_overlap"]["n"] > 0 and m["training_overlap"]["checked"]
    assert "WARNING" in printed and "training split" in printed
    assert "not an independent test" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "Not an independent test" in html and "data:image/png;base64," in html and "<table>" in html
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    assert main(["-q", "card", "--model", str(copy), "--add-eval", str(out / "metrics.json"), "--name", "self"]) == 0
    card = (copy / "MODEL_CARD.md").read_text()
    assert "are in this model's training split: the figures below are optimistic" in card


@pytest.mark.slow
def test_nothing_under_src_changes_when_commands_run_without_model(dataset_dir, tmp_path, capsys):
    def snapshot():
        return {p: p.stat().st_mtime_ns for p in PACKAGE_MODEL.parent.parent.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}

    before = snapshot()
    img = str(next((dataset_dir / "train" / "NORMAL").glob("*.jpeg")))
    assert main(["-q", "predict", img]) in (0, 3)  # 3: the shipped gate stops a synthetic image
    assert main(["-q", "check", "--no-parity"]) == 0
    assert main(["-q", "explain", img, "--method", "gradcam", "--out", str(tmp_path / "ex")]) in (0, 3)  # as predict
    for argv in (["export"], ["card"]):
        assert main(["-q", *argv]) == 2
    capsys.readouterr()
    assert snapshot() == before


def test_interrupted_training_exits_130_and_writes_nothing(dataset_dir, tmp_path, capsys, monkeypatch):
    import pneumoscan.train.head as head

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(head, "fit_head", interrupt)
    rc = main(["-q", "train", str(dataset_dir), "--out", str(tmp_path / "m"), "--backbone", "test_efficientnet",
               "--no-pretrained", "--size", "32", "--cache", str(tmp_path / "c"), "--workers", "0"])
    assert rc == 130 and "pneumoscan: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def test_ctrl_c_inside_lightning_is_an_interruption_not_exit_1(tmp_path):
    """Lightning catches Ctrl-C in fit, ignores SIGINT from then on and calls sys.exit(1): every training command
    exited 1 without a word. fit_interruptible makes it a KeyboardInterrupt again (the CLI: 'interrupted', 130)."""
    import signal

    import lightning.pytorch as pl
    import torch

    from pneumoscan.train.callbacks import fit_interruptible

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class CtrlC(pl.Callback):
        def on_train_batch_start(self, *a):
            raise KeyboardInterrupt

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, callbacks=[CtrlC()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fit_interruptible(trainer, Tiny(), data)
    assert trainer.interrupted and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_no_progress_bars_in_a_log_and_quiet_after_the_command(dataset_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pneumoscan", "finetune", str(dataset_dir), "--out", str(tmp_path / "m"),
                        "--backbone", "test_efficientnet", "--no-pretrained", "--size", "32", "--epochs", "1",
                        "--workers", "0", "--accelerator", "cpu", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stdout and "it/s" not in r.stdout and "Epoch" not in r.stdout
    assert r.stdout.splitlines()[0].startswith("model: ")  # the results, nothing else
    assert "\r" not in r.stderr  # -q after the command: no bars on stderr either


def test_hub_backbones_fail_at_once_when_offline(no_network, tmp_path, capsys):
    import time

    t = time.perf_counter()
    one_error_line(capsys, ["-q", "extract", str(tmp_path), "--backbone", "resnet50", "--cache", str(tmp_path / "c")],
                   "cannot be reached")
    assert time.perf_counter() - t < 20  # no minute of hub retries


def test_a_model_whose_card_fails_is_kept_beside_the_output_not_thrown_away(tiny_model_dir, tmp_path, monkeypatch):
    """Training minutes are not lost to a late failure: the built folder is kept as OUT.no-card, OUT is untouched."""
    import pneumoscan.evaluate.card as card
    from pneumoscan.cli.common import new_model_dir
    from pneumoscan.errors import PneumoscanError

    def broken(*a, **k):
        raise RuntimeError("template changed under the run")

    monkeypatch.setattr(card, "write_card", broken)
    out = tmp_path / "model"
    with pytest.raises(PneumoscanError, match=r"card could not be written \(RuntimeError: template changed.*"
                                              r"kept, without a card, in .*model\.no-card.*pneumoscan card --model"):
        with new_model_dir(out) as tmp:
            for f in ("config.json", "model.safetensors"):
                shutil.copy2(tiny_model_dir / f, tmp / f)
    assert not out.exists()
    kept = tmp_path / "model.no-card"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    monkeypatch.undo()
    assert main(["-q", "card", "--model", str(kept)]) == 0 and (kept / "MODEL_CARD.md").is_file()


def test_serve_on_a_busy_port_or_a_foreign_address_is_one_line_before_anything_starts(tiny_model_dir, capsys,
                                                                                        monkeypatch):
    import socket

    import pneumoscan.web.server as server

    def never(*a, **k):
        raise AssertionError("the service started")

    monkeypatch.setattr(server, "serve", never)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        one_error_line(capsys, ["serve", "--model", str(tiny_model_dir), "--port", port],
                       f"cannot listen on 127.0.0.1:{port}", "in use by another program", "another --port")
    one_error_line(capsys, ["serve", "--model", str(tiny_model_dir), "--host", "192.0.2.1"],  # TEST-NET-1
                   "192.0.2.1 is not an address of this machine", "--host 127.0.0.1")
    one_error_line(capsys, ["serve", "--model", str(tiny_model_dir), "--host", "no-such-host.invalid"],
                   "is not an address or a name this machine resolves")
    with server.bind(server.ServeConfig(host="127.0.0.1", port=int(port))) as sock:  # free again: bound and kept
        assert sock.getsockname() == ("127.0.0.1", int(port))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_where_files_cannot_be_created_is_refused_before_the_work(tiny_model_dir, dataset_dir, capsys,
                                                                           monkeypatch):
    import pneumoscan.predict as predict

    def never(*a, **k):
        raise AssertionError("the work started")

    monkeypatch.setattr(predict.Predictor, "predict_files", never)
    img = str(next((dataset_dir / "train" / "NORMAL").glob("*.jpeg")))
    # /proc accepts access(W_OK) for root but no new file: only trying it shows that
    one_error_line(capsys, ["predict", img, "--model", str(tiny_model_dir), "--out", "/proc/p.csv"], "/proc/p.csv")


def test_a_file_system_error_during_the_work_is_one_line_and_exit_1(capsys, monkeypatch):
    import errno

    import pneumoscan.cli.predict as cli_predict

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/p.csv")

    monkeypatch.setattr(cli_predict, "run", full)
    rc = main(["-q", "predict", "x.jpeg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("pneumoscan: error: /data/out/p.csv: No space left on device")


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_replaced_as_a_whole_never_is_nor_holds_an_input(tiny_model_dir, dataset_dir, tmp_path, capsys):
    """ensemble a b --out b --overwrite used to put the ensemble in place and delete the member b; train DATA --out
    DATA --overwrite the data; --out of the folder holding the inputs, or of the shipped model, the same."""
    a, b = (Path(shutil.copytree(tiny_model_dir, tmp_path / n)) for n in ("a", "b"))
    data = Path(shutil.copytree(dataset_dir, tmp_path / "data"))
    before = {p: _listing(p) for p in (a, b, data)}
    one_error_line(capsys, ["ensemble", str(a), str(b), "--out", str(b), "--overwrite"], f"--out {b} is the input {b}")
    one_error_line(capsys, ["soup", str(a), str(b), "--out", str(tmp_path), "--overwrite"], "holds the input")
    one_error_line(capsys, ["train", str(data), "--out", str(data), "--overwrite"], "replacing it would destroy it")
    one_error_line(capsys, ["train", str(data), "--out", str(data / "train" / "NORMAL"), "--overwrite"],
                   f"lies inside the input {data}")
    one_error_line(capsys, ["ensemble", str(a), str(b), "--out", str(PACKAGE_MODEL), "--overwrite"],
                   "the model shipped inside pneumoscan")
    assert {p: _listing(p) for p in (a, b, data)} == before


def test_an_output_file_is_never_an_input_a_link_or_a_device(dataset_dir, tmp_path, capsys):
    """predict X.jpg --out X.jpg turned the X-ray into a table; --out of a link, a FIFO or a device replaced it with
    a plain file (as root: /dev/stdout, /dev/full); --out '' printed to the terminal as if no --out was given."""
    img = Path(shutil.copy(next((dataset_dir / "train" / "NORMAL").glob("*.jpeg")), tmp_path / "x.jpeg"))
    data = img.read_bytes()
    (tmp_path / "target.csv").write_text("keep")
    (tmp_path / "link.csv").symlink_to(tmp_path / "target.csv")
    os.mkfifo(tmp_path / "fifo.csv")
    for cmd in ("predict", "adapt"):
        one_error_line(capsys, ["-q", cmd, str(img), "--out", str(img)], f"is the input {img}")
    one_error_line(capsys, ["-q", "predict", str(img), "--out", str(tmp_path / "link.csv")], "is a symbolic link")
    one_error_line(capsys, ["-q", "predict", str(img), "--out", str(tmp_path / "fifo.csv")], "a device, pipe or socket")
    one_error_line(capsys, ["-q", "predict", str(img), "--out", ""], "--out is empty")
    assert img.read_bytes() == data and (tmp_path / "link.csv").is_symlink()
    assert stat.S_ISFIFO((tmp_path / "fifo.csv").stat().st_mode) and (tmp_path / "target.csv").read_text() == "keep"


@pytest.mark.parametrize("argv", [["train", "x", "--batch-size", "0"], ["predict"], ["nosuchcommand"],
                                  ["data", "index", "x", "--seed", "-1"]])
def test_option_refusals_are_exactly_one_line(argv, capsys):
    """argparse printed its usage block (several lines) above the error."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error:" in err and "--help" in err, err
