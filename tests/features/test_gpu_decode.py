"""The nvJPEG extraction path (features/gpu_decode.py). Without a GPU its logic runs on the CPU: the same
``torchvision.io.decode_jpeg`` call with ``device="cpu"``. Pixels and features must equal the CPU
workers' path; files nvJPEG does not take go to the CPU decoder; broken and missing files are listed
with their name, never fatal."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import make_dataset

from pneumoscan.bench import Sample, make_images
from pneumoscan.bench.gpu import distinct_copies
from pneumoscan.data.index import index_dataset
from pneumoscan.errors import PneumoscanError
from pneumoscan.features import gpu_decode
from pneumoscan.features.config import ExtractConfig
from pneumoscan.features.extract import ImageFiles, extract_features
from pneumoscan.features.gpu_decode import GpuDecoder, read_batches
from pneumoscan.nets.backbones import create_backbone
from pneumoscan.preprocess import PreprocessConfig


def _decode_all(paths, prep, batch=5):
    dec = GpuDecoder(prep, "cpu", paths)
    idx, xs, bad = [], [], []
    for items in read_batches(paths, batch, threads=2, ahead=2):
        i, x, b = dec(items)
        idx.append(i)
        xs.append(x)
        bad += b
    return torch.cat(idx), torch.cat(xs), bad, dec


@pytest.mark.parametrize("size,intensity", [(64, "none"), (40, "clahe"), (96, "none")])
def test_pixels_equal_the_cpu_workers_path(tmp_path, size, intensity):
    # 64 px files: same size, shrink to 40 (area, as OpenCV's INTER_AREA), enlarge to 96 (bilinear)
    paths = [s.path for s in make_images(tmp_path, 12, px=64)]
    prep = PreprocessConfig(size=size, intensity=intensity)
    idx, x, bad, dec = _decode_all(paths, prep)
    assert not bad and idx.tolist() == list(range(12)) and dec.on_gpu == 12 and dec.on_cpu == 0
    ds = ImageFiles(paths, prep)
    ref = torch.stack([ds[i][1] for i in range(12)])
    diff = (x.int() - ref.int()).abs()
    assert x.shape == (12, size, size) and x.dtype == torch.uint8
    # identical when shrinking or keeping the size; bilinear enlarging rounds differently by at most 1 level
    assert int(diff.max()) <= (1 if size > 64 else 0)


def test_rotated_cmyk_and_oversized_jpegs_go_to_the_cpu_decoder(tmp_path, monkeypatch):
    a = np.zeros((40, 60), np.uint8)
    a[:, :20] = 200  # a bright left band: rotation moves it
    rotated = tmp_path / "rotated.jpeg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(a).save(rotated, exif=exif)
    cmyk = tmp_path / "cmyk.jpeg"
    Image.fromarray(a).convert("CMYK").save(cmyk)
    plain = tmp_path / "plain.jpeg"
    Image.fromarray(a).save(plain)
    paths = [str(rotated), str(cmyk), str(plain)]
    prep = PreprocessConfig(size=40)
    idx, x, bad, dec = _decode_all(paths, prep)
    assert not bad and dec.on_cpu == 2 and dec.on_gpu == 1
    ref = torch.stack([ImageFiles(paths, prep)[i][1] for i in range(3)])
    assert torch.equal(x, ref)  # the CPU path's pixels: rotation applied, CMYK converted
    assert int(x[0, :8].float().mean()) > 150 and int(x[0, -8:].float().mean()) < 50  # turned: the band is on top
    monkeypatch.setattr(gpu_decode, "DEFAULT_MAX_PIXELS", 1000)  # 40 x 60 is now "oversized" for nvJPEG
    _, x2, bad2, dec2 = _decode_all([str(plain)], prep)
    assert dec2.on_cpu == 1 and dec2.on_gpu == 0 and not bad2 and torch.equal(x2[0], ref[2])


def test_other_files_go_to_the_cpu_decoder_and_failures_are_listed(tmp_path):
    paths = [s.path for s in make_images(tmp_path, 3, px=48)]
    png = tmp_path / "film.png"
    Image.fromarray(np.full((48, 48), 120, np.uint8)).save(png)
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:200])  # a JPEG header, no scan
    missing = str(tmp_path / "gone.jpeg")
    allp = paths + [str(png), str(broken), missing]
    idx, x, bad, dec = _decode_all(allp, PreprocessConfig(size=32), batch=6)
    assert sorted(idx.tolist()) == [0, 1, 2, 3]  # the PNG decoded on the CPU
    assert dec.on_cpu >= 1 and int(x[idx.tolist().index(3)].float().mean()) == 120
    errs = dict(bad)
    assert set(errs) == {4, 5}
    assert "broken.jpeg" in errs[4] and "gone.jpeg" in errs[5] and "cannot be read" in errs[5]


def test_extraction_through_the_gpu_path_gives_the_cpu_features(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_patients=4, per_patient=1, size=32)  # the input size: no resize
    normal = next(p for p in Path(data).rglob("NORMAL") if p.is_dir())
    (normal / "zz-broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    m = index_dataset(data, val_fraction=0.25)
    net, _ = create_backbone("test_efficientnet", pretrained=False, seed=0)
    kw = dict(size=32, net=net, weights_id="random-seed0", workers=2, progress=False, batch_size=4)
    f_cpu, ok_cpu, info_cpu = extract_features(m.samples, "test_efficientnet", cache_dir=tmp_path / "c1",
                                               decode="cpu", **kw)
    monkeypatch.setattr(gpu_decode, "available", lambda device: True)  # run the nvJPEG path's logic on the CPU
    f_gpu, ok_gpu, info_gpu = extract_features(m.samples, "test_efficientnet", cache_dir=tmp_path / "c2",
                                               decode="gpu", **kw)
    assert info_gpu["decode"] == "gpu" and info_cpu["decode"] == "cpu"
    assert info_gpu["decoded_on_gpu"] == int(ok_gpu.sum()) == 12
    np.testing.assert_array_equal(ok_cpu, ok_gpu)
    assert not ok_gpu.all() and len(info_gpu["failed"]) == 1 and "zz-broken.jpeg" in info_gpu["failed"][0][0]
    np.testing.assert_allclose(f_gpu[ok_gpu], f_cpu[ok_cpu], atol=1e-5)


def test_gpu_decode_without_a_gpu_is_refused_before_any_work(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_patients=2, per_patient=1, size=24)
    m = index_dataset(data, val_fraction=0.5)
    import pneumoscan.features.extract as ex

    monkeypatch.setattr(ex, "create_backbone", lambda *a, **k: pytest.fail("the backbone was built"))
    with pytest.raises(PneumoscanError, match="decode 'gpu' needs a CUDA device"):
        extract_features(m.samples, "test_efficientnet", size=32, cache_dir=tmp_path / "c", decode="gpu",
                         device="cpu", progress=False)
    with pytest.raises(PneumoscanError, match="decode 'nvjpeg' is unknown"):
        extract_features(m.samples, "test_efficientnet", size=32, cache_dir=tmp_path / "c", decode="nvjpeg")
    with pytest.raises(PneumoscanError, match="device 'gpu0' is unknown"):
        ExtractConfig(device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PneumoscanError, match="device 'cuda:1': this machine has 0 CUDA device"):
        extract_features(m.samples, "test_efficientnet", size=32, cache_dir=tmp_path / "c", device="cuda:1")


def test_bench_copies_are_distinct_files_with_the_same_pixels(tmp_path):
    src = make_images(tmp_path / "src", 3, px=40)
    copies = distinct_copies(src, tmp_path / "copies", 7)
    assert len({c.sha1 for c in copies}) == 7
    assert all(c.sha1 == hashlib.sha1(Path(c.path).read_bytes()).hexdigest() for c in copies)
    for i, c in enumerate(copies):
        a = np.asarray(Image.open(c.path).convert("L"))
        b = np.asarray(Image.open(src[i % 3].path).convert("L"))
        np.testing.assert_array_equal(a, b)
    idx, x, bad, dec = _decode_all([c.path for c in copies], PreprocessConfig(size=40))
    assert not bad and dec.on_gpu == 7
    assert isinstance(copies[0], Sample)


def test_the_gpu_benchmark_pieces_run_on_the_cpu(tmp_path, monkeypatch):
    """What `bench gpu` runs on a lent GPU, run here on the CPU, so that a device call cannot fail on it."""
    from pneumoscan.bench.gpu import decode_agreement, time_variants

    samples = distinct_copies(make_images(tmp_path / "src", 4, px=40), tmp_path / "copies", 12)
    net, _ = create_backbone("test_efficientnet", pretrained=False, seed=0)
    prep = PreprocessConfig(size=32)
    agree = decode_agreement(samples, net.eval(), prep, device="cpu")
    assert agree["images"] == 12 and agree["decoded_on_gpu"] == 12 and agree["pixels_max_abs_diff"] == 0
    assert agree["feature_rel_diff_max"] == 0.0
    monkeypatch.setattr(gpu_decode, "available", lambda device: True)
    runs = time_variants(samples, "test_efficientnet", prep, net, "random-seed0",
                         [("cpu", 0, 4, True), ("gpu", 2, 8, False), ("jpeg2000", 0, 4, False)], 2, tmp_path,
                         device="cpu")
    assert [r["decode"] for r in runs] == ["cpu", "gpu", "jpeg2000"]
    assert all(r["images"] == 12 and r["images_per_s"] > 0 and len(r["runs"]) == 2 for r in runs[:2])
    assert runs[1]["decoded_on_gpu"] == 12 and "unknown" in runs[2]["error"]
