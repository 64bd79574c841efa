"""Dataset indexing: layouts, labels, patient keys, the patient-grouped split, skipped files, manifests."""
from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import make_dataset

from pneumoscan.data.index import index_dataset, label_from_path, patient_key, resolve_manifest
from pneumoscan.data.manifest import Manifest
from pneumoscan.errors import DataError


def _img(path: Path, value: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(path, format=fmt)


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> Path:
    """150 small images: 25 patients x 2 images x 3 classes."""
    return make_dataset(tmp_path_factory.mktemp("big") / "chest_xray", n_patients=25, per_patient=2, size=16)


@pytest.mark.parametrize("name,label,key", [
    ("person1_bacteria_1.jpeg", "bacterial", "bacteria-1"),
    ("person1_virus_6.jpeg", "viral", "virus-1"),  # person 1 viral is another child than person 1 bacterial
    ("person1000_bacteria_2931.jpeg", "bacterial", "bacteria-1000"),
    ("IM-0115-0001.jpeg", "normal", "IM-0115"),
    ("NORMAL2-IM-0381-0001.jpeg", "normal", "NORMAL2-IM-0381"),
    ("scan.png", "viral", "viral-scan"),  # no patient in the name: its own patient
])
def test_patient_key(name, label, key):
    assert patient_key(name, label) == key


@pytest.mark.parametrize("rel,label", [
    ("train/NORMAL/IM-1-1.jpeg", "normal"), ("PNEUMONIA/person2_bacteria_3.jpeg", "bacterial"),
    ("test/PNEUMONIA/person2_virus_3.jpeg", "viral"), ("viral/x.png", "viral"), ("bacterial/x.png", "bacterial"),
    ("PNEUMONIA/unknown.jpeg", None), ("other/x.png", None)])
def test_label_from_path(rel, label):
    assert label_from_path(Path(rel)) == label


def test_redistribution_layout_with_splits(tmp_path):
    root = tmp_path / "chest_xray"
    for split in ("train", "val", "test"):
        for k in range(3):
            _img(root / split / "NORMAL" / f"IM-{split}{k}-0001.jpeg", k)
            _img(root / split / "PNEUMONIA" / f"person{k}_bacteria_{split}.jpeg", k + 10)
            _img(root / split / "PNEUMONIA" / f"person{k}_virus_{split}.jpeg", k + 20)
    m = index_dataset(root, val_fraction=0.34)
    assert len(m) == 27 and not m.skipped
    test = m.subset("test")
    assert len(test) == 9 and {s.source_split for s in test} == {"test"}
    assert Counter(s.label for s in test) == {"normal": 3, "bacterial": 3, "viral": 3}
    assert {s.split for s in m.samples if s.source_split == "train"} == {"train", "val"}  # official val joins train
    assert all(s.relpath == Path(s.path).relative_to(root).as_posix() for s in m.samples)


def test_redistribution_layout_without_splits_and_plain_layout(tmp_path):
    a = tmp_path / "a"
    for k in range(6):
        _img(a / "NORMAL" / f"IM-{k:04d}-0001.jpeg", k)
        _img(a / "PNEUMONIA" / f"person{k}_bacteria_1.jpeg", k)
        _img(a / "PNEUMONIA" / f"person{k}_virus_1.jpeg", k)
    b = tmp_path / "b"
    for cls in ("normal", "bacterial", "viral"):
        for k in range(6):
            _img(b / cls / f"{cls}{k}.png", k, "PNG")
    for root in (a, b):
        m = index_dataset(root, val_fraction=0.34)
        assert len(m) == 18
        assert Counter(s.label for s in m.samples) == {"normal": 6, "bacterial": 6, "viral": 6}
        assert {s.split for s in m.samples} == {"train", "val"} and {s.source_split for s in m.samples} == {""}


def test_split_is_patient_grouped_stratified_and_deterministic(big_dir):
    m = index_dataset(big_dir)
    train = {s.patient for s in m.subset("train")}
    val = {s.patient for s in m.subset("val")}
    assert train and val and not train & val  # no patient on both sides
    share = len(m.subset("val")) / len(m)
    assert 0.15 <= share <= 0.25
    for lab in ("normal", "bacterial", "viral"):  # every class on both sides
        assert m.counts()["val"][lab] > 0 and m.counts()["train"][lab] > 0
    again = index_dataset(big_dir)
    assert [s.split for s in again.samples] == [s.split for s in m.samples]
    assert again.digest() == m.digest()
    other = index_dataset(big_dir, seed=1)
    assert other.digest() != m.digest()  # the digest covers the split
    assert "val: normal=" in repr(m)


def test_bad_files_are_listed_and_skipped(tmp_path):
    root = make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=16)
    (root / "train" / "NORMAL" / "notes.txt").write_text("hello")
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"this is not a jpeg")
    (root / "train" / "NORMAL" / "IM-9998-0001.png").write_bytes(b"")
    _img(root / "train" / "PNEUMONIA" / "person9_unknown_1.jpeg")
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    m = index_dataset(root, val_fraction=0.25)
    assert len(m) == 12
    reasons = {Path(p).name: why for p, why in m.skipped}
    assert set(reasons) == {"notes.txt", "IM-9999-0001.jpeg", "IM-9998-0001.png", "person9_unknown_1.jpeg"}
    assert "not a JPEG, PNG or DICOM file (.txt)" in reasons["notes.txt"]
    assert "not a JPEG, PNG or DICOM" in reasons["IM-9999-0001.jpeg"]
    assert reasons["IM-9998-0001.png"] == "empty file"
    assert "bacteria" in reasons["person9_unknown_1.jpeg"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_is_skipped(tmp_path):
    root = make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=16)
    p = root / "train" / "NORMAL" / "IM-0000-0001.jpeg"
    p.chmod(0)
    try:
        m = index_dataset(root, val_fraction=0.25)
    finally:
        p.chmod(0o644)
    assert any("unreadable" in why for _, why in m.skipped)


def test_empty_missing_and_unrecognised_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        index_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no labelled images"):
        index_dataset(tmp_path / "empty")
    _img(tmp_path / "other" / "cats" / "a.png", fmt="PNG")
    with pytest.raises(DataError, match="NORMAL/ and PNEUMONIA/"):
        index_dataset(tmp_path / "other")
    (tmp_path / "file.jpeg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        index_dataset(tmp_path / "file.jpeg")
    with pytest.raises(DataError, match="too few"):
        index_dataset(make_dataset(tmp_path / "tiny", n_patients=1, per_patient=1, size=8))


def test_manifest_round_trip(big_dir, tmp_path):
    m = index_dataset(big_dir)
    path = m.save(tmp_path / "sub" / "manifest.csv")
    back = Manifest.load(path)
    assert back.samples == m.samples and back.digest() == m.digest()
    assert resolve_manifest(path).digest() == m.digest()  # a CSV is read, not re-indexed
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(DataError, match="does not exist"):
        Manifest.load(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a pneumoscan manifest"):
        Manifest.load(tmp_path / "bad.csv")
    text = path.read_text().replace(",normal,", ",cat,", 1)
    (tmp_path / "badlabel.csv").write_text(text)
    with pytest.raises(DataError, match="unknown label 'cat'"):
        Manifest.load(tmp_path / "badlabel.csv")


@pytest.mark.slow
@pytest.mark.realdata
def test_real_data(real_data_dir, tmp_path):
    """Reads ../shared/data: class counts of the whole train folder (cheap header scan), the 24 duplicate
    groups within one patient each, and a patient-grouped split of a 600-image subset (indexing all 5,216
    images would take most of the suite's time budget)."""
    from pneumoscan.data.index import scan

    found, skipped = scan(real_data_dir)
    assert not skipped
    assert Counter(lab for _, lab, _ in found) == {"normal": 1341, "bacterial": 2530, "viral": 1345}
    by_size = defaultdict(list)
    for p, lab, _ in found:
        by_size[p.stat().st_size].append((p, lab))
    groups = defaultdict(list)
    for same in (v for v in by_size.values() if len(v) > 1):  # only equal sizes can be byte-identical
        for p, lab in same:
            groups[hashlib.sha1(p.read_bytes()).hexdigest()].append(patient_key(p.name, lab))
    dups = [keys for keys in groups.values() if len(keys) > 1]
    assert len(dups) == 24 and all(len(set(keys)) == 1 for keys in dups)

    sub = tmp_path / "chest_xray"
    for p, _lab, _ in found[::9]:  # every 9th file, all classes
        rel = p.relative_to(real_data_dir)
        (sub / rel).parent.mkdir(parents=True, exist_ok=True)
        (sub / rel).symlink_to(p)
    m = index_dataset(sub)
    assert len(m) == len(found[::9]) and not m.skipped
    assert not {s.patient for s in m.subset("train")} & {s.patient for s in m.subset("val")}
    assert 0.15 <= len(m.subset("val")) / len(m) <= 0.25
    assert index_dataset(sub).digest() == m.digest()


def test_a_model_s_own_split_is_found_in_a_moved_data_folder(tmp_path):
    """--data FOLDER for a model whose manifest was made with another seed than its training seed (or on
    another machine): the model's own split, its paths moved to FOLDER; a folder with other content is indexed."""
    import shutil

    from pneumoscan.data.splits import load_manifest, validation_set

    data = make_dataset(tmp_path / "a", n_patients=10)
    own = index_dataset(data, 0.3, seed=7)  # the split the model was trained on
    model = tmp_path / "model"
    model.mkdir()
    own.save(model / "manifest.csv")
    config = {"manifest_sha256": own.digest(), "train_config": {"val_fraction": 0.3, "seed": 1}}  # seed 1 != 7
    assert index_dataset(data, 0.3, seed=1).digest() != own.digest()  # re-indexing would guess another split
    moved = shutil.copytree(data, tmp_path / "elsewhere")
    shutil.rmtree(data)  # the manifest's absolute paths are gone
    got = load_manifest(moved, config, model)
    assert got.digest() == own.digest() and all(Path(s.path).is_relative_to(moved) for s in got.samples)
    ev = validation_set(moved, config, model)
    assert ev.matches_model and len(ev.paths) == len(own.subset("val"))
    victim = next(p for p in sorted(moved.rglob("*.jpeg")))
    victim.write_bytes(victim.read_bytes() + b"\0")  # other content: not the model's data any more
    assert load_manifest(moved, config, model).digest() != own.digest()


def test_a_command_s_output_folder_inside_its_inputs_is_not_read_back(tmp_path):
    """explain and evaluate write PNGs; an --out inside the data must not be read as X-rays on the next run."""
    from pneumoscan.data.index import iter_image_files, scan

    root = tmp_path / "site"
    for k in (1, 2):
        _img(root / "NORMAL" / f"IM-000{k}-0001.jpeg", 10 + k, "JPEG")
        _img(root / "PNEUMONIA" / f"person{k}_bacteria_{k}.jpeg", 20 + k, "JPEG")
    _img(root / "NORMAL" / "report" / "roc.png", 30)  # an earlier run's figure, inside a class folder
    _img(root / "maps" / "a.gradcam.png", 40)
    assert len(scan(root)[0]) == 5  # without the exclusion the figure counts as a normal film
    found = scan(root, exclude=root / "NORMAL" / "report")[0]
    assert "roc.png" not in {p.name for p, _, _ in found} and len(found) == 4
    assert len(index_dataset(root, val_fraction=0.5, exclude=root / "NORMAL" / "report")) == 4
    files = iter_image_files([root], exclude=tmp_path / "site" / "maps" / ".." / "maps")[0]  # spelt another way
    assert "a.gradcam.png" not in {f.name for f in files} and "roc.png" in {f.name for f in files}
    assert {f.name for f in iter_image_files([root / "maps"], exclude=root / "maps")[0]} == {"a.gradcam.png"}


def test_a_validation_share_the_split_cannot_make_is_said_not_silently_replaced(big_dir, caplog):
    """Shares come from one of k patient-grouped folds: 0.4 is the nearest k (3), and a share the folder's
    patients cannot meet is a warning with both figures."""
    import logging

    with caplog.at_level(logging.WARNING, logger="pneumoscan.data.index"):
        m = index_dataset(big_dir, val_fraction=0.4)
    share = len(m.subset("val")) / len(m)
    assert abs(share - 1 / 3) < 0.05  # three folds, not two (which gave 50 %)
    assert "not the 40% asked for" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pneumoscan.data.index"):
        index_dataset(big_dir, val_fraction=0.2)
    assert "asked for" not in caplog.text
    with pytest.raises(DataError, match=r"must lie in \(0, 0.5\]"):
        index_dataset(big_dir, val_fraction=0.6)


def test_links_to_nothing_and_pipes_named_as_images_are_reported_and_files_count_once(tmp_path):
    from pneumoscan.data.index import iter_image_files

    _img(tmp_path / "d" / "a.png", 10)
    (tmp_path / "d" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(tmp_path / "d" / "pipe.jpg")  # never opened: reading it would block
    (tmp_path / "d" / "notes").symlink_to(tmp_path / "nowhere")  # not named as an image: passed over
    files, problems = iter_image_files([tmp_path / "d", tmp_path / "d" / "a.png", tmp_path / "d"])
    assert files == [tmp_path / "d" / "a.png"]  # named three times, counted once
    assert {Path(p).name: why.split(";")[0] for p, why in problems} == {
        "gone.jpg": "a symbolic link to nothing", "pipe.jpg": "not a regular file"}


def test_a_class_the_data_lacks_is_not_blamed_on_the_split():
    """'index with another --val-fraction' cannot mend a folder without viral images: say so instead."""
    from pneumoscan.data.manifest import check_usable

    with pytest.raises(DataError, match=r"add bacterial and viral images \(the data holds none\)"):
        check_usable([0, 0, 0], [0, 0], 0, 5)
    with pytest.raises(DataError, match="index with another --val-fraction"):
        check_usable([0, 0, 1, 1, 2, 2], [0, 0, 1, 2], 0, 10)  # viral and bacterial are there, one short in val


def test_a_hand_edited_manifest_with_a_duplicate_row_or_an_unknown_split_is_refused_by_line(big_dir, tmp_path):
    m = index_dataset(big_dir)
    m.save(tmp_path / "m.csv")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    (tmp_path / "dup.csv").write_text("\n".join([*lines, lines[3]]) + "\n")
    with pytest.raises(DataError, match=rf"line {len(lines) + 1}: .* is listed again \(first on line 4\)"):
        Manifest.load(tmp_path / "dup.csv")
    bad = lines[:2] + [lines[2].replace(",train,", ",training,").replace(",val,", ",training,")] + lines[3:]
    (tmp_path / "split.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataError, match=r"line 3: split 'training' is not one of train, val, test"):
        Manifest.load(tmp_path / "split.csv")
    header = lines[0].split(",")
    drop = header.index("sha1")
    (tmp_path / "nosha.csv").write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop)
                                                   for line in lines) + "\n")
    with pytest.raises(DataError, match="no column sha1"):
        Manifest.load(tmp_path / "nosha.csv")


def test_the_same_image_under_two_labels_is_named(tmp_path, caplog):
    import logging
    import shutil

    root = make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=16)
    normal = next((root / "train" / "NORMAL").glob("*.jpeg"))
    shutil.copy(normal, root / "train" / "PNEUMONIA" / "person99_bacteria_1.jpeg")
    with caplog.at_level(logging.WARNING, logger="pneumoscan.data.index"):
        index_dataset(root, val_fraction=0.5)
    assert f"NORMAL/{normal.name} (normal" in caplog.text and "person99_bacteria_1.jpeg (bacterial" in caplog.text
    assert "same image under two labels" in caplog.text


def test_an_image_changed_since_indexing_is_refused_not_trained_on_with_stale_features(tmp_path):
    """The feature cache is keyed by the manifest's content hash: a replaced file kept its old features."""
    root = make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=16)
    m = index_dataset(root, val_fraction=0.5)
    m.check_files()
    victim = Path(m.samples[0].path)
    other = next(p for p in root.rglob("*.jpeg") if p != victim and p.read_bytes() != victim.read_bytes())
    victim.write_bytes(other.read_bytes())
    with pytest.raises(DataError, match=r"1 of the \d+ images of the manifest changed since it was written"):
        m.check_files()
