"""Smoke tests of the benchmark suite on the tiny backbone (no timing assertions), and of the
ONNX Runtime extraction engine that the suite justified (same features as PyTorch)."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from pneumoscan.bench import count_flops, gemm_gflops
from pneumoscan.cli import main
from pneumoscan.data.index import index_dataset
from pneumoscan.errors import PneumoscanError
from pneumoscan.features.extract import extract_features

TINY = dict(pretrained=False, size=64)


def test_flops_are_counted_not_assumed():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 62 * 62, 5))
    conv = 2 * (4 * 62 * 62) * 3 * 3 * 3  # 2 FLOPs per multiply-add, per output element
    linear = 2 * 4 * 62 * 62 * 5
    assert count_flops(net, 64) == conv + linear


def test_gemm_rate_is_positive():
    assert gemm_gflops(seconds=0.05, n=128, threads=1) > 0


@pytest.fixture(scope="module")
def manifest(dataset_dir):
    return index_dataset(dataset_dir)


@pytest.mark.slow
def test_onnx_engine_gives_the_torch_features(manifest, tmp_path):
    out = {}
    for engine in ("torch", "onnx"):
        f, ok, info = extract_features(manifest.samples, "test_efficientnet", cache_dir=tmp_path / engine,
                                       engine=engine, workers=0, progress=False, **TINY)
        assert info["engine"] == engine and ok.all()
        out[engine] = f
    assert np.abs(out["torch"] - out["onnx"]).max() <= 1e-4
    exported = list((tmp_path / "onnx").rglob("backbone-*.onnx"))
    assert len(exported) == 1
    # a second (cache-cold) run reuses the exported file instead of exporting again
    mtime = exported[0].stat().st_mtime_ns
    for shard in (tmp_path / "onnx").rglob("part-*.safetensors"):
        shard.unlink()
    f, _, info = extract_features(manifest.samples, "test_efficientnet", cache_dir=tmp_path / "onnx",
                                  engine="auto", workers=1, progress=False, **TINY)
    assert info["engine"] == "onnx" and info["computed"] == len(manifest.samples)
    assert exported[0].stat().st_mtime_ns == mtime
    assert np.abs(f - out["torch"]).max() <= 1e-4


def test_unknown_engine_is_a_clear_error(manifest, tmp_path):
    with pytest.raises(PneumoscanError, match="engine 'tvm' is unknown"):
        extract_features(manifest.samples, "test_efficientnet", cache_dir=tmp_path, engine="tvm", progress=False, **TINY)


@pytest.mark.slow
def test_extract_bench_writes_json(tmp_path):
    from pneumoscan.bench.extract import run

    line, path = run(["test_efficientnet"], [64], images=8, image_px=96, pretrained=False, gemm_seconds=0.1,
                     big_px=256, out_dir=tmp_path, repeats=2, memory_counts=[4, 12])
    doc = json.loads(path.read_text())
    assert path == tmp_path / "extract.json" and "img/s" in line and "peak memory" in line
    assert [m["images"] for m in doc["memory_scan"]] == [4, 12]  # the scan may use more images than the runs
    assert all(m["peak_rss_mb"] > 0 for m in doc["memory_scan"])
    assert doc["runs"][0]["repeats"] == 2 and len(doc["runs"][0]["runs_images_per_s"]) == 2
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["torch"] == torch.__version__
    (r,) = doc["runs"]
    assert r["images"] == 8 and r["failed"] == 0 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["gflop_per_image"] > 0 and 0 < r["share_of_compute_bound"]
    assert doc["decode"]["draft_speedup"] > 0


def test_latency_bench_compares_torch_and_onnx(tmp_path):
    from pneumoscan.bench.latency import run

    line, path = run(backbone="test_efficientnet", iters=3, pretrained=False, out_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert doc["onnx_vs_torch_max_abs_diff"] <= 1e-4
    for key in ("torch_forward", "onnx_forward", "torch_end_to_end", "onnx_end_to_end"):
        assert doc[key]["n"] == 3 and doc[key]["p50_ms"] > 0
    assert "ONNX Runtime p50" in line


@pytest.mark.slow
def test_pipeline_bench_cold_then_cached(dataset_dir, tmp_path):
    from pneumoscan.bench.pipeline import run

    line, path = run(str(dataset_dir / "train"), limit=36, extra=["--no-pretrained", "--backbone", "test_efficientnet"],
                     train_args=["--epochs", "3", "--patience", "2"], out_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert doc["images"] == 36 and doc["peak_rss_mb"] > 0
    for kind in ("cold", "cached"):
        assert set(doc[kind]) >= {"index", "extract", "train", "evaluate", "total"}
    assert "cold" in line and "cached" in line


def test_cli_gpu_skips_cleanly_and_summary(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the skip path is not taken")
    (tmp_path / "latency.json").write_text(json.dumps({
        "machine": {"cpu_model": "x", "cores": 2, "load_avg_1m": 0.1}, "when": "2026-01-01T00:00:00",
        "onnx_end_to_end": {"p50_ms": 9.0, "p99_ms": 20.0}, "torch_end_to_end": {"p50_ms": 30.0}}))
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 0
    assert "gpu: skipped (no CUDA device)" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "p50 9.0 ms" in summary and "| yes |" in summary


@pytest.mark.parametrize("argv, extract_repeats, gpu_repeats", [([], 3, 2), (["--repeats", "5"], 5, 5)])
def test_cli_repeats_reach_each_benchmark(argv, extract_repeats, gpu_repeats, tmp_path, monkeypatch):
    # --repeats is honoured by every benchmark that repeats runs; without it each keeps its own default
    import pneumoscan.bench.extract as bx
    import pneumoscan.bench.gpu as bg

    seen = {}

    def fake(name, default):
        def run(*a, repeats=default, **kw):
            seen[name] = repeats
            return name, None
        return run

    monkeypatch.setattr(bx, "run", fake("extract", inspect.signature(bx.run).parameters["repeats"].default))
    monkeypatch.setattr(bg, "run", fake("gpu", inspect.signature(bg.run).parameters["repeats"].default))
    for which in ("extract", "gpu"):
        assert main(["bench", which, "--out", str(tmp_path), *argv]) == 0
    assert seen == {"extract": extract_repeats, "gpu": gpu_repeats}


def test_result_file_takes_a_file_or_a_folder_and_refuses_before_any_timing(tmp_path):
    from pneumoscan.bench import default_results_dir, result_file

    assert result_file(tmp_path / "a.json", "d.json") == tmp_path / "a.json"
    assert result_file(tmp_path, "d.json") == tmp_path / "d.json"  # an existing folder
    assert result_file(f"{tmp_path}/new/", "d.json") == tmp_path / "new" / "d.json"  # a folder to be made
    assert result_file(None, "d.json") == default_results_dir() / "d.json"
    (tmp_path / "f").write_text("x")
    with pytest.raises(PneumoscanError, match="is a file, so"):
        result_file(tmp_path / "f" / "a.json", "d.json")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "d.json").mkdir()
    with pytest.raises(PneumoscanError, match="is a folder; give a file name"):
        result_file(tmp_path / "d", "d.json")


def test_cli_bench_refuses_an_unwritable_out_before_timing(tmp_path, capsys, monkeypatch):
    import pneumoscan.bench.extract as bx

    monkeypatch.setattr(bx, "run", lambda *a, **k: pytest.fail("timed before --out was checked"))
    (tmp_path / "f").write_text("x")
    assert main(["bench", "extract", "--out", str(tmp_path / "f" / "results")]) == 2
    assert "is a file, so" in capsys.readouterr().err


def test_summary_reads_the_memory_scan_and_the_newest_explain_result(tmp_path):
    from pneumoscan.bench.summary import write_summary

    machine = {"cpu_model": "x", "cores": 2, "load_avg_1m": 0.1}
    run = {"backbone": "efficientnet_lite0", "size": 224, "images_per_s": 90.0, "engine": "onnx", "workers": 0,
           "cpu_ms_per_image": 20.0, "share_of_compute_bound": 0.6, "peak_rss_mb": 900.0, "images": 64}
    (tmp_path / "extract.json").write_text(json.dumps({
        "machine": machine, "when": "2026-01-01T00:00:00", "gemm_gflops": 120.0, "runs": [run],
        "memory_scan": [{"images": 256, "peak_rss_mb": 900.0}, {"images": 5216, "peak_rss_mb": 2500.0}]}))
    for date, seconds in (("2026-01-01T00:00:00", 9.0), ("2026-02-01T00:00:00", 4.0)):
        (tmp_path / f"explain-{date[:10]}-2cpu.json").write_text(json.dumps({
            "date": date, "machine": {"cpu": "x", "usable_cpus": 2, "loadavg_1_5_15_before": [0.1, 0, 0]},
            "results": {"occlusion_incremental": {"copies": 729, "median_wall_s": seconds},
                        "occlusion_onnx": {"copies": 729, "median_wall_s": 8.0},
                        "gradcam": {"median_wall_s": 0.1}}}))
    text = write_summary(tmp_path).read_text()
    assert "| 90.0 img/s" in text
    assert "900 -> 2500 MB | **no** |" in text  # grew with the image count: not flat
    assert "4.0 s (incremental; Captum over ONNX Runtime 8.0 s) | yes |" in text  # the newer result


def test_cli_rejects_bad_numbers(capsys):
    assert main(["bench", "extract", "--images", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_onnx_extraction_is_measured_against_the_bare_forward_of_its_graph(tmp_path):
    """The baseline of the same run: the exported graph's bare forward, beside the end-to-end rate."""
    from pneumoscan.bench import make_images
    from pneumoscan.bench.extract import run_variant

    samples = make_images(tmp_path / "img", 8, 96)
    listing = tmp_path / "s.json"
    listing.write_text(json.dumps([[s.path, s.sha1] for s in samples]))
    r = run_variant({"samples": str(listing), "backbone": "test_efficientnet", "size": 64, "engine": "onnx",
                     "workers": 0, "batch_size": 4, "pretrained": False})
    assert r["engine"] == "onnx" and r["bare_forward_images_per_s"] > 0
    assert 0 < r["vs_bare_forward"] and abs(r["vs_bare_forward"] - r["images_per_s"] / r["bare_forward_images_per_s"]) < 0.02
