"""Shared fixtures: a synthetic dataset in the redistribution layout and a tiny trained model.

Everything here runs on CPU without network in a few seconds. Tests that read the real data
use ``real_data_dir`` and are skipped when ``../shared/data`` is absent.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from synthetic import make_dataset  # noqa: F401  (the fixtures below; tests import it from synthetic)

from pneumoscan.features.config import ExtractConfig

# the feature cache of every command a test runs goes to a temporary folder, never the user's ~/.cache
os.environ.setdefault("PNEUMOSCAN_CACHE", tempfile.mkdtemp(prefix="pneumoscan-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMOSCAN_SHARED_DATA", REPO.parent / "shared" / "data" / "chest_xray"))


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """48 synthetic images (8 patients x 2 images x 3 classes) in the redistribution layout."""
    return make_dataset(tmp_path_factory.mktemp("data") / "chest_xray")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, dataset_dir) -> Path:
    """A real model directory trained by the real pipeline on the tiny test backbone (random init)."""
    from pneumoscan.train.config import TrainConfig
    from pneumoscan.train.head import train

    out = tmp_path_factory.mktemp("model") / "tiny"
    cfg = TrainConfig(backbone="test_efficientnet", size=64, pretrained=False, max_epochs=30, patience=10,
                      lr=1e-2, seed=0)
    from pneumoscan.evaluate.card import write_card

    train(dataset_dir, out, cfg, extract=ExtractConfig(cache=str(tmp_path_factory.mktemp("cache")), workers=0),
          progress=False, command="pytest fixture")
    write_card(out)  # as 'pneumoscan train' does
    return out


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """../shared/data/chest_xray (the real training split); skips the test when absent."""
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails at once (no hang on a timeout), and no weights cache is visible."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        import huggingface_hub.constants as c
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    except ImportError:
        pass
