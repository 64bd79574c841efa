"""Feature cache: hit on a second run, recompute of changed/added files, resume after an interruption,
undecodable files listed (not fatal)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import make_dataset

from pneumoscan.data.index import index_dataset
from pneumoscan.features.cache import FeatureCache
from pneumoscan.features.extract import extract_features
from pneumoscan.nets.backbones import create_backbone, default_preprocess

SIZE = 32


class Counting(torch.nn.Module):
    """Wraps the real tiny backbone: counts images seen, can fail after N batches (an interruption)."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.net, _ = create_backbone("test_efficientnet", pretrained=False, seed=0)
        self.images = 0
        self.batches = 0
        self.fail_after = fail_after

    def forward(self, x):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("simulated interruption")
        self.batches += 1
        self.images += len(x)
        return self.net(x)


def _extract(samples, cache, net, **kw):
    return extract_features(samples, "test_efficientnet", size=SIZE, cache_dir=cache, net=net, weights_id="random-seed0",
                            workers=0, progress=False, batch_size=kw.pop("batch_size", 8), **kw)


@pytest.fixture()
def data(tmp_path):
    return make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=24)  # 12 images


def test_second_run_is_a_cache_hit(data, tmp_path):
    m = index_dataset(data, val_fraction=0.25)
    net = Counting()
    f1, ok1, info1 = _extract(m.samples, tmp_path / "c", net)
    assert info1["computed"] == 12 and info1["cached"] == 0 and ok1.all() and net.images == 12
    assert f1.shape == (12, 256) and np.isfinite(f1).all()
    net2 = Counting()
    f2, ok2, info2 = _extract(m.samples, tmp_path / "c", net2)
    assert net2.images == 0 and info2["computed"] == 0 and info2["cached"] == 12
    np.testing.assert_array_equal(f1, f2)
    # another preprocessing is another cache
    _, _, info3 = extract_features(m.samples, "test_efficientnet", size=40, cache_dir=tmp_path / "c", net=Counting(),
                                   weights_id="random-seed0", workers=0, progress=False)
    assert info3["computed"] == 12 and info3["cache"] != info1["cache"]


def test_changed_and_added_files_are_recomputed(data, tmp_path):
    m = index_dataset(data, val_fraction=0.25)
    _extract(m.samples, tmp_path / "c", Counting())
    changed = data / "train" / "NORMAL" / "IM-0000-0001.jpeg"
    Image.fromarray(np.full((24, 24), 7, np.uint8), mode="L").save(changed)
    Image.fromarray(np.full((24, 24), 99, np.uint8), mode="L").save(data / "train" / "NORMAL" / "IM-0100-0001.jpeg")
    m2 = index_dataset(data, val_fraction=0.25)
    net = Counting()
    f, ok, info = _extract(m2.samples, tmp_path / "c", net)
    assert len(m2) == 13 and net.images == 2 and info["computed"] == 2 and info["cached"] == 11 and ok.all()


@pytest.mark.parametrize("overlap", [False, True])
def test_interrupted_run_resumes(data, tmp_path, overlap):
    # overlap: the GPU path's writer thread, run on the CPU (features handed over as tensors)
    m = index_dataset(data, val_fraction=0.25)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _extract(m.samples, tmp_path / "c", Counting(fail_after=1), batch_size=4, overlap=overlap)
    cache = FeatureCache.for_key(tmp_path / "c", "test_efficientnet", "random-seed0",
                                 default_preprocess("test_efficientnet", SIZE))
    assert len(list(cache.root.glob("part-*.safetensors"))) == 1 and len(cache.load()) == 4
    assert not list(cache.root.glob("*.tmp"))  # shards are written atomically
    net = Counting()
    f, ok, info = _extract(m.samples, tmp_path / "c", net, batch_size=4, overlap=overlap)
    assert info["cached"] == 4 and info["computed"] == 8 and net.images == 8 and ok.all()
    assert info["overlap"] is overlap and len(list(cache.root.glob("part-*.safetensors"))) == 3
    full, _, _ = _extract(m.samples, tmp_path / "fresh", Counting(), batch_size=4, overlap=False)
    np.testing.assert_allclose(f, full, rtol=1e-5, atol=1e-6)  # resumed (and overlapped) = computed in one go


def test_undecodable_file_is_listed_not_fatal(data, tmp_path):
    bad = data / "train" / "PNEUMONIA" / "person50_virus_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # JPEG signature, broken body: passes indexing
    m = index_dataset(data, val_fraction=0.25)
    assert any(s.path == str(bad) for s in m.samples)
    f, ok, info = _extract(m.samples, tmp_path / "c", Counting())
    i = [s.path for s in m.samples].index(str(bad))
    assert not ok[i] and ok.sum() == 12 and (f[i] == 0).all()
    assert [p for p, _ in info["failed"]] == [str(bad)]
    assert "person50_virus_1.jpeg" in info["failed"][0][1]


def test_duplicates_share_one_computation(data, tmp_path):
    src = data / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    (data / "train" / "NORMAL" / "IM-0001-0002.jpeg").write_bytes(src.read_bytes())
    m = index_dataset(data, val_fraction=0.25)
    net = Counting()
    f, ok, info = _extract(m.samples, tmp_path / "c", net)
    assert len(m) == 13 and net.images == 12 and ok.all()
    paths = [s.path for s in m.samples]
    np.testing.assert_array_equal(f[paths.index(str(src))], f[paths.index(str(src).replace("0001.jpeg", "0002.jpeg"))])
