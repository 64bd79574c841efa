"""The options for a model that holds under shift (issue 16): LP-FT, layer-wise decay, frozen batch-norm
statistics, noise-tolerant losses, mixup/cutmix, dropping likely mislabelled images, acquisition
augmentations before the intensity step, soups and WiSE-FT. Each is checked for what it claims."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pneumoscan.cli import main
from pneumoscan.data.manifest import Manifest
from pneumoscan.errors import PneumoscanError
from pneumoscan.nets.checkpoint import load_model
from pneumoscan.train.augment import BatchAugment, gaussian_blur, random_erase
from pneumoscan.train.config import AugmentConfig, FinetuneConfig
from pneumoscan.train.finetune import finetune, param_groups
from pneumoscan.train.noisy import flag_highest_loss, out_of_fold_loss

TINY = dict(backbone="test_efficientnet", size=64, pretrained=False, batch_size=16, workers=0, accelerator="cpu")


@pytest.fixture(scope="module")
def manifest(tiny_model_dir):
    return Manifest.load(tiny_model_dir / "manifest.csv")


@pytest.fixture(scope="module")
def lpft(tiny_model_dir, manifest, tmp_path_factory):
    """Two LP-FT fine-tunes of the tiny linear-probe model (frozen BN, layer decay, GCE + mixup, cutmix)."""
    root = tmp_path_factory.mktemp("lpft")
    runs = []
    for seed, extra in ((0, dict(loss="gce", mixup=0.4)), (1, dict(cutmix=1.0))):
        cfg = FinetuneConfig(**TINY, epochs=1, init_from=str(tiny_model_dir), freeze_bn=True, layer_decay=0.7,
                             head_lr_mult=1.0, seed=seed, augment=AugmentConfig(blur=1.0, noise=0.03, erase=0.5),
                             **extra)
        runs.append(finetune(manifest, root / f"ft{seed}", cfg, progress=False, command="pytest"))
    return runs


def test_lp_ft_starts_from_the_probe_and_keeps_its_batch_norm_statistics(lpft, tiny_model_dir):
    probe = load_model(tiny_model_dir).net.state_dict()
    for ft in lpft:
        cfg = json.loads((ft / "config.json").read_text())
        assert cfg["init_from"]["model_id"] == json.loads((tiny_model_dir / "config.json").read_text())["model_id"]
        tuned = load_model(ft).net.state_dict()
        stats = [k for k in probe if k.endswith(("running_mean", "running_var"))]
        assert stats and all(torch.equal(probe[k], tuned[k]) for k in stats)  # --freeze-bn
        assert not torch.equal(probe["backbone.conv_stem.weight"], tuned["backbone.conv_stem.weight"])  # it trained


def test_init_from_must_match_the_backbone_and_preprocessing(tiny_model_dir, manifest, tmp_path):
    cfg = FinetuneConfig(**{**TINY, "size": 48}, epochs=1, init_from=str(tiny_model_dir))
    with pytest.raises(PneumoscanError, match="pass the same --size and --intensity"):
        finetune(manifest, tmp_path / "x", cfg, progress=False)


def test_layer_decay_slows_the_early_blocks():
    from pneumoscan.nets.backbones import create_backbone
    from pneumoscan.nets.heads import Head, PneumoNet

    bb, _ = create_backbone("test_efficientnet", pretrained=False)
    net = PneumoNet(bb, Head(bb.num_features, 3))
    cfg = FinetuneConfig(**TINY, lr=1e-3, layer_decay=0.5, head_lr_mult=1.0)
    groups = param_groups(net, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    stem, last = lr_of[id(bb.conv_stem.weight)], lr_of[id(bb.conv_head.weight)]
    assert last == pytest.approx(1e-3) and stem < last / 4  # several blocks below: several halvings
    assert lr_of[id(net.head.fc.weight)] == pytest.approx(1e-3)
    flat = param_groups(net, FinetuneConfig(**TINY, lr=1e-3))  # decay off: one rate for the backbone
    assert {g["lr"] for g in flat if g["params"][0] is not net.head.fc.weight} == {1e-3}
    assert all(set(map(id, g["params"])).isdisjoint({id(net.head.fc.weight)}) or g["lr"] == 1e-2 for g in flat)


def test_augmentations_do_what_they_say():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    assert torch.allclose(gaussian_blur(x, torch.zeros(4)), x, atol=1e-6)  # sigma 0: unchanged
    blurred = gaussian_blur(x, torch.full((4,), 2.0))
    assert blurred.std() < 0.6 * x.std() and torch.allclose(blurred.mean(), x.mean(), atol=0.02)
    erased = random_erase(x, 1.0)
    changed = (erased != x).float().mean((1, 2, 3))
    assert ((changed > 0.01) & (changed < 0.25)).all()  # one 2-20 % rectangle per image
    means = x.mean((1, 2, 3)).view(4, 1, 1, 1).expand_as(x)
    assert torch.allclose(erased[erased != x], means[erased != x])  # filled with the image's mean
    aug = BatchAugment(AugmentConfig(rotate=0, scale=0, translate=0, brightness=0, contrast=0, gamma=0, noise=0.05))
    noisy = aug.train()(x)
    assert 0.005 < (noisy - x).std() < 0.05 and noisy.min() >= 0 and noisy.max() <= 1  # sigma drawn in [0, 0.05]


def test_augmentation_comes_before_clahe(tiny_model_dir):
    """With augment-then-intensity the network sees CLAHE of the noisy image, as a noisy film would be seen."""
    from pneumoscan.preprocess import Preprocess, PreprocessConfig
    from pneumoscan.train.augment import BatchInput

    prep = PreprocessConfig(size=32, intensity="clahe")
    x = torch.from_numpy(np.random.default_rng(0).integers(60, 120, (2, 32, 32)).astype(np.uint8))
    inputs = BatchInput(prep, AugmentConfig(), batch_intensity=True).eval()
    clean = inputs(x, augment=False)
    pp = Preprocess(prep)
    expected = torch.from_numpy(np.stack([pp.array(a.numpy()) for a in x]))
    torch.testing.assert_close(clean.contiguous(), expected, atol=1e-5, rtol=1e-5)  # the inference path


def test_out_of_fold_losses_find_flipped_labels():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, n)
    x = np.eye(3)[y] * 3 + rng.normal(0, 1, (n, 3))
    flipped = rng.choice(n, 15, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    loss = out_of_fold_loss(x, noisy, [str(i) for i in range(n)], seed=0)
    flagged = flag_highest_loss(loss, noisy, 0.05)
    assert flagged.sum() == sum(round(0.05 * (noisy == c).sum()) for c in range(3))  # per class
    assert len(set(np.flatnonzero(flagged)) & set(flipped)) >= 10  # most of the flips are found


@pytest.mark.slow
def test_drop_noisy_records_what_it_dropped(tiny_model_dir, manifest, tmp_path):
    cfg = FinetuneConfig(**TINY, epochs=1, drop_noisy=0.2)
    out = finetune(manifest, tmp_path / "ft", cfg, progress=False)
    rec = json.loads((out / "config.json").read_text())["noisy_labels"]
    assert rec["n_flagged"] == sum(rec["flagged_by_class"].values()) > 0
    rows = (out / "dropped.csv").read_text().splitlines()
    assert rows[0] == "relpath,label,oof_loss" and len(rows) - 1 == rec["n_flagged"]
    used = json.loads((out / "config.json").read_text())["data"]["counts"]["train"]
    assert sum(used.values()) == sum(manifest.counts()["train"].values()) - rec["n_flagged"]


def test_gce_loss_is_the_generalised_cross_entropy():
    """(1 - p_y^q) / q per image, class-weighted like cross-entropy."""
    from pneumoscan.nets.backbones import create_backbone
    from pneumoscan.nets.heads import Head, PneumoNet
    from pneumoscan.preprocess import PreprocessConfig
    from pneumoscan.train.finetune import make_module

    bb, _ = create_backbone("test_efficientnet", pretrained=False)
    net = PneumoNet(bb, Head(bb.num_features, 3))
    cfg = FinetuneConfig(**TINY, loss="gce", gce_q=0.5, label_smoothing=0.0)
    module = make_module(net, cfg, PreprocessConfig(size=64), torch.tensor([1.0, 2.0, 1.0]))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    p = logits.softmax(-1)[torch.arange(2), y]
    w = torch.tensor([1.0, 2.0])
    expected = ((1 - p ** 0.5) / 0.5 * w).sum() / w.sum()
    torch.testing.assert_close(module._loss(logits, y, None), expected)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0]])  # a mixed target
    assert module._loss(logits, y, soft) > module._loss(logits, y, None)


def test_soup_is_the_weighted_mean_of_its_members(lpft, tmp_path, capsys):
    out = tmp_path / "wise"
    assert main(["-q", "soup", str(lpft[0]), str(lpft[1]), "--coefficients", "0.25,0.75", "--out", str(out)]) == 0
    a, b, s = (load_model(d).net.state_dict() for d in (lpft[0], lpft[1], out))
    k = "backbone.conv_stem.weight"
    torch.testing.assert_close(s[k], 0.25 * a[k] + 0.75 * b[k])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "single" and cfg["soup"]["coefficients"] == [0.25, 0.75]
    assert "Youden" in cfg["threshold_method"] and "soup" in (out / "MODEL_CARD.md").read_text()
    check = cfg["soup"]["check"]  # the comparison with its members is recorded
    assert check["members_compared"] == 2 and check["held"] is True
    assert check["auc"] == cfg["val_metrics"]["normal_vs_pneumonia"]["auc"]
    assert main(["-q", "soup", str(lpft[0]), "--out", str(tmp_path / "one")]) == 2  # needs two or more


def _vm(auc: float, acc: float) -> dict:
    return {"normal_vs_pneumonia": {"auc": auc}, "three_class": {"accuracy": acc}}


def test_a_soup_is_kept_only_if_it_holds_against_its_weakest_member():
    from pneumoscan.errors import ModelError
    from pneumoscan.train.config import EnsembleConfig
    from pneumoscan.train.ensemble import check_soup

    members = [{"manifest_sha256": "m", "val_metrics": _vm(0.998, 0.82)},
               {"manifest_sha256": "m", "val_metrics": _vm(0.990, 0.80)},
               {"manifest_sha256": "other", "val_metrics": _vm(0.5, 0.3)}]  # another split: not compared
    rec = check_soup(_vm(0.9875, 0.795), "m", members, EnsembleConfig())  # within 0.003 / 0.01 of the weakest
    assert rec["held"] is True and rec["members_compared"] == 2 and rec["member_auc"] == [0.998, 0.990]
    with pytest.raises(ModelError, match="does not hold"):
        check_soup(_vm(0.986, 0.80), "m", members, EnsembleConfig())  # AUC 0.004 below the weakest
    with pytest.raises(ModelError, match="does not hold"):
        check_soup(_vm(0.995, 0.78), "m", members, EnsembleConfig())  # accuracy 0.02 below
    assert check_soup(_vm(0.5, 0.3), "n", members, EnsembleConfig())["held"] is None  # nothing on that split
    loose = EnsembleConfig(max_auc_drop=0.02, max_accuracy_drop=0.05)
    assert check_soup(_vm(0.975, 0.76), "m", members, loose)["held"] is True


def test_the_soup_command_refuses_a_soup_that_falls_and_writes_nothing(lpft, tmp_path, capsys):
    out = tmp_path / "s"
    cfg = json.loads((lpft[0] / "config.json").read_text())
    if not cfg.get("val_metrics"):
        pytest.skip("the fixture members carry no validation figures")
    # a negative allowance demands a soup better than its weakest member by more than 1.0 AUC: impossible
    rc = main(["-q", "soup", str(lpft[0]), str(lpft[1]), "--out", str(out), "--max-auc-drop", "-1"])
    assert rc == 2 and "does not hold on validation" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".s.tmp*"))


def _pretrain(dataset_dir, out, epochs: int, *extra: str) -> int:
    pytest.importorskip("lightly")
    return main(["-q", "pretrain", str(dataset_dir), "--out", str(out), "--backbone", "test_efficientnet",
                 "--no-pretrained", "--size", "48", "--batch-size", "8", "--epochs", str(epochs), "--workers", "0",
                 "--accelerator", "cpu", *extra])


@pytest.mark.slow
def test_pretrain_writes_a_backbone_that_train_takes_as_weights(dataset_dir, tmp_path, capsys):
    out = tmp_path / "ssl"
    rc = _pretrain(dataset_dir, out, 2)
    assert rc == 0, capsys.readouterr().err
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] >= 2 and len(info["epoch_losses"]) == 2 and all(np.isfinite(info["epoch_losses"]))
    assert 0 < info["images"] < 48  # the training split only, never validation
    from pneumoscan.nets.backbones import create_backbone

    random_net, _ = create_backbone("test_efficientnet", pretrained=False)
    learned, wid = create_backbone("test_efficientnet", weights=out / "backbone.safetensors")
    assert wid.startswith("file-")
    assert not torch.equal(random_net.conv_stem.weight, learned.conv_stem.weight)  # the weights moved
    probe = tmp_path / "probe"
    assert main(["-q", "train", str(dataset_dir), "--out", str(probe), "--backbone", "test_efficientnet", "--size", "48",
                 "--weights", str(out / "backbone.safetensors"), "--epochs", "3", "--workers", "0",
                 "--cache", str(tmp_path / "c")]) == 0
    assert json.loads((probe / "config.json").read_text())["weights_source"] == wid


@pytest.mark.slow
def test_pretrain_stops_at_its_time_limit_and_keeps_the_weights(dataset_dir, tmp_path, capsys):
    out = tmp_path / "ssl"
    rc = _pretrain(dataset_dir, out, 20, "--max-minutes", "0.00001")  # 0.6 ms: the timer ends it after one step
    assert rc == 0, capsys.readouterr().err
    info = json.loads((out / "pretrain.json").read_text())
    assert info["stopped_by_time"] is True and info["epochs_done"] < 20 and info["steps"] >= 1
    assert (out / "backbone.safetensors").is_file()
    assert main(["-q", "pretrain", str(dataset_dir), "--out", str(tmp_path / "x"), "--max-minutes", "0"]) == 2
    assert "max minutes 0.0 must be positive" in capsys.readouterr().err and not (tmp_path / "x").exists()
