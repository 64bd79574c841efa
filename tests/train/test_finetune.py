"""Fine-tuning: the Lightning path on one CPU and with DDP over gloo on two CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pneumoscan.errors import PneumoscanError
from pneumoscan.nets.backbones import create_backbone
from pneumoscan.nets.checkpoint import load_model
from pneumoscan.train.augment import BatchAugment
from pneumoscan.train.config import AugmentConfig, FinetuneConfig
from pneumoscan.train.finetune import finetune, set_trainable

ARGS = ["--backbone", "test_efficientnet", "--no-pretrained", "--size", "64", "--workers", "0",
        "--batch-size", "16", "--epochs", "2"]


@pytest.fixture(scope="module")
def ft_dir(tmp_path_factory, dataset_dir):
    cfg = FinetuneConfig(backbone="test_efficientnet", size=64, pretrained=False, epochs=2, batch_size=16,
                         workers=0, accelerator="cpu")
    return finetune(dataset_dir, tmp_path_factory.mktemp("ft") / "m", cfg, progress=False, command="test")


def test_finetune_writes_standard_model_dir(ft_dir, tiny_model_dir):
    cfg = json.loads((ft_dir / "config.json").read_text())
    ref = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["finetuned"] is True and ref["finetuned"] is False
    assert set(ref) - set(cfg) <= set(), f"keys missing: {set(ref) - set(cfg)}"
    files = {p.name for p in ft_dir.iterdir()}
    assert {"model.safetensors", "config.json", "history.csv", "history.png", "manifest.csv"} <= files
    assert not any(f.endswith((".pt", ".pth", ".ckpt", ".pkl")) for f in files)
    bundle = load_model(ft_dir)
    x = torch.zeros(2, 3, 64, 64)
    assert bundle.net(x).shape == (2, 3)
    assert cfg["train_config"]["augment"]["rotate"] == 10.0
    assert len([line for line in (ft_dir / "history.csv").read_text().splitlines() if line]) == 3  # header + 2 epochs


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, dataset_dir, ft_dir):
    """Two processes, DDP over gloo, two optimizer steps: same model directory format as one process."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PNEUMOSCAN_PROGRESS": "0", "PL_DISABLE_FORK": "1"}
    cmd = [sys.executable, "-m", "pneumoscan", "-q", "finetune", str(dataset_dir), "--out", str(out), *ARGS,
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--max-steps", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hardware"]["devices"] == 2 and cfg["hardware"]["strategy"] == "ddp"
    ref = json.loads((ft_dir / "config.json").read_text())
    assert set(cfg) == set(ref)
    assert {p.name for p in out.iterdir()} == {p.name for p in ft_dir.iterdir()} | {"MODEL_CARD.md"}  # the CLI adds the card
    load_model(out)


def test_augment_identity_in_eval_and_bounded_in_train():
    torch.manual_seed(0)
    aug = BatchAugment(AugmentConfig(flip=True))
    x = torch.rand(4, 1, 32, 32)
    assert torch.equal(aug.eval()(x), x)
    y = aug.train()(x)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(y, x)


def test_unfreeze_from_a_stage():
    net, _ = create_backbone("test_efficientnet", pretrained=False)
    trained = set_trainable(net, "blocks")
    assert "blocks" in trained and "conv_stem" not in trained
    assert not net.conv_stem.weight.requires_grad
    with pytest.raises(PneumoscanError, match="not a child"):
        set_trainable(net, "nope")


def test_bad_config_is_clear():
    with pytest.raises(PneumoscanError, match="schedule"):
        FinetuneConfig(schedule="linear")
    with pytest.raises(PneumoscanError, match="EMA"):
        FinetuneConfig(ema_decay=1.5)
