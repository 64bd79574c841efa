"""Quantisation-aware training: the emulation is ONNX Runtime's own INT8 graph, the copy keeps its layout,
and distillation brings the emulated INT8 copy closer to its teacher."""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from pneumoscan.cli import main
from pneumoscan.errors import ModelError
from pneumoscan.nets.checkpoint import load_model, save_model
from pneumoscan.nets.modeldir import read_config
from pneumoscan.runtime import int8_ready


def _inputs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalised inputs with an image's statistics (smooth structure, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, size // 8, size // 8), generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


# the weight ranges this CPU's INT8 kernels compute exactly: reduced everywhere, full only with VNNI (elsewhere ONNX
# Runtime's sums saturate, and neither the emulation nor the export gate is meant to follow that)
EXACT_RANGES = ["reduced", *(["full"] if int8_ready() else [])]


@pytest.fixture(scope="module", params=EXACT_RANGES)
def sim_and_graph(tiny_model_dir, tmp_path_factory, request):
    """The tiny model's QuantSim calibrated on 32 inputs, and ONNX Runtime's INT8 graph calibrated on the same,
    both with the weight range of the parameter."""
    from pneumoscan.export.config import QuantizeConfig
    from pneumoscan.export.int8 import quantize_graph
    from pneumoscan.export.onnx import export_onnx
    from pneumoscan.train.qat import QuantSim

    d = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("qat-sim") / "tiny")
    export_onnx(d)
    bundle = load_model(d)
    size = int(bundle.config["preprocess"]["size"])
    cal = _inputs(32, size)
    sim = QuantSim(bundle.net, request.param)
    sim.calibrate([cal[:16], cal[16:]])
    int8 = d / "int8.onnx"
    quantize_graph(d / "model.onnx", int8, [cal[:16].numpy(), cal[16:].numpy()],
                   QuantizeConfig(weight_range=request.param))
    return bundle, sim, int8, size


def test_folded_copy_without_quantisation_is_the_model(sim_and_graph):
    bundle, sim, _, size = sim_and_graph
    x = _inputs(8, size, seed=1)
    sim.enable(False)
    with torch.no_grad():
        assert torch.allclose(sim.net(x), bundle.net(x), atol=1e-4)


def test_emulation_quantises_where_onnx_runtime_does_and_gives_its_outputs(sim_and_graph):
    import onnx
    import onnxruntime as ort

    bundle, sim, int8, size = sim_and_graph
    graph = onnx.load(str(int8))
    assert len(sim.activations) == sum(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert len(sim.weights) == sum(n.op_type in ("Conv", "Gemm") for n in graph.graph.node)
    x = _inputs(16, size, seed=2)
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        sim.enable(True)
        emulated = sim.net(x).numpy()
        sim.enable(False)
        fp32 = sim.net(x).numpy()
    int8_error = np.abs(got - fp32).mean()
    assert int8_error > 0  # quantisation changes the outputs at all
    assert np.abs(emulated - got).mean() < 0.25 * int8_error  # the emulation is far closer to INT8 than fp32 is


def test_standard_layout_keeps_the_folded_weights(sim_and_graph):
    bundle, sim, _, size = sim_and_graph
    net = copy.deepcopy(bundle.net)
    with torch.no_grad():
        for p in sim.net.parameters():
            p.add_(0.01 * torch.randn_like(p))  # as if trained: the folded weights no longer match the teacher's
    net.load_state_dict(sim.standard_state(bundle.net))
    x = _inputs(4, size, seed=3)
    sim.enable(False)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), sim.net(x), atol=1e-4)
        assert not torch.allclose(net(x), bundle.net(x), atol=1e-3)


def test_training_step_distils_the_emulated_int8_copy_and_reaches_every_weight(sim_and_graph):
    """QatModule.training_step: on a quantised step its loss is the KL divergence of the emulated INT8
    copy's probabilities from the teacher's, on an fp32 step it is zero for the untrained copy, and the
    gradient passes the fake quantisation (straight through) to every weight."""
    from pneumoscan.preprocess import PreprocessConfig
    from pneumoscan.train.config import QatConfig
    from pneumoscan.train.qat import QuantSim, calibrated_log_probs, make_module

    bundle, _, _, size = sim_and_graph
    teacher = copy.deepcopy(bundle.net).eval()
    prep = PreprocessConfig.from_dict(bundle.config["preprocess"])
    x_u8 = (torch.rand((16, size, size), generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    bias = torch.tensor([0.3, -0.2, 0.1])
    losses = {}
    for share in (0.0, 0.999999):
        sim = QuantSim(teacher)
        module = make_module(sim, QatConfig(fp32_share=share), prep, x_u8, 0.5, bias)
        module.log = lambda *a, **k: None
        x = module.inputs(x_u8, False)
        with torch.no_grad():
            t = teacher(x)
        sim.calibrate([x])
        loss = module.training_step((x_u8, t), 0)
        losses[share] = float(loss)
        if share == 0.0:
            sim.enable(True)
            with torch.no_grad():
                z = sim.net(x)
            want = torch.nn.functional.kl_div(calibrated_log_probs(z, 0.5, bias), calibrated_log_probs(t, 0.5, bias),
                                              reduction="batchmean", log_target=True)
            assert float(loss) == pytest.approx(float(want), rel=1e-4)
            loss.backward()
            dead = [n for n, p in sim.net.named_parameters() if n.endswith("weight.original") and not p.grad.abs().sum() > 0]
            assert dead == []
    assert losses[0.0] > 1e-7 and abs(losses[0.999999]) < 1e-7


@pytest.mark.slow
def test_qat_command_writes_a_model_that_exports_to_int8(tiny_model_dir, tmp_path):
    teacher = shutil.copytree(tiny_model_dir, tmp_path / "teacher")
    bundle = load_model(teacher)
    with torch.no_grad():  # confident logits, so that INT8 visibly moves the tiny model's probabilities
        bundle.net.head.fc.weight.mul_(40.0)
    save_model(teacher, bundle.net, bundle.config)
    out = tmp_path / "qat"
    assert main(["-q", "qat", str(teacher), "--out", str(out), "--epochs", "4", "--lr", "1e-4", "--workers", "0",
                 "--calibration-images", "16", "--accelerator", "cpu"]) == 0
    conf = read_config(out)
    q = conf["qat"]
    assert q["teacher"]["model_id"] == read_config(teacher)["model_id"] and conf["name"].endswith("-qat")
    assert q["calibration_images"] == 16 and q["validation_images"] > 0
    assert q["config"]["weight_range"] == ("full" if int8_ready() else "reduced")  # what export --int8 makes here
    for k in ("int8_vs_teacher", "fp32_vs_teacher", "int8_vs_fp32"):
        assert 0 <= q["after"][k] <= 1
    assert q["before"]["kl_fp32"] < 1e-6 < q["before"]["kl_int8"]  # the copy starts as the teacher, INT8 differs
    assert np.isfinite(q["after"]["kl_int8"]) and np.isfinite(q["after"]["kl_fp32"])
    assert conf["threshold_method"] != "the teacher's (not yet chosen on validation)"  # retuned on validation
    assert (out / "manifest.csv").is_file()
    card = (out / "MODEL_CARD.md").read_text()
    assert f"Quantisation-aware copy of `{q['teacher']['model_id']}`" in card
    assert f"pneumoscan qat {teacher} --out NEW_DIR --epochs 4 --lr 0.0001" in card  # reproducible, settings explicit
    assert f"--weight-range {q['config']['weight_range']}" in card  # the range as resolved, not 'auto'
    assert load_model(out).net is not None
    assert main(["-q", "export", "--model", str(out)]) == 0


def test_qat_refuses_an_ensemble_before_any_work(tiny_model_dir, tmp_path):
    from pneumoscan.nets.heads import Ensemble
    from pneumoscan.train.qat import check_supported

    net = load_model(tiny_model_dir).net
    with pytest.raises(ModelError, match="ensemble"):
        check_supported(Ensemble([net, net]), "two.tiny")


def test_qat_command_refuses_a_missing_model(tmp_path, capsys):
    assert main(["qat", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibrated_log_probs_are_the_served_calibration():
    from pneumoscan.labels import softmax
    from pneumoscan.train.qat import calibrated_log_probs
    from pneumoscan.uncertainty import temperature_scale

    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(5)) * 3
    got = calibrated_log_probs(z, 0.264, torch.tensor([0.5, -0.1, 0.2])).exp().numpy()
    assert np.allclose(got, temperature_scale(softmax(z.numpy()), 0.264, [0.5, -0.1, 0.2]), atol=1e-5)


def test_gate_metric_is_the_out_of_scope_score_s_distance():
    from pneumoscan.train.qat import GateMetric
    from pneumoscan.uncertainty import OODScorer

    rng = np.random.default_rng(6)
    d, k = 12, 5
    a = rng.normal(size=(k, k))
    comps = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # (k, d) orthonormal PCA directions
    ood = OODScorer(mean=rng.normal(size=d), components=comps, class_means=rng.normal(size=(3, k)),
                    precision=a @ a.T + k * np.eye(k))
    metric = GateMetric(ood)
    f = rng.normal(size=(7, d))
    z = metric(torch.tensor(f, dtype=torch.float32)).double()
    means = torch.tensor(ood.class_means @ np.linalg.cholesky(ood.precision))  # the class means, whitened alike
    got = torch.cdist(z, means).min(dim=1).values.numpy()
    assert np.allclose(got, ood.score(f), rtol=1e-4)  # Euclidean here = the gate's Mahalanobis distance


def test_training_step_adds_the_feature_distance_in_the_gate_s_metric(sim_and_graph):
    from pneumoscan.preprocess import PreprocessConfig
    from pneumoscan.train.config import QatConfig
    from pneumoscan.train.qat import GateMetric, QuantSim, calibrated_log_probs, make_module
    from pneumoscan.uncertainty import OODScorer

    bundle, _, _, size = sim_and_graph
    teacher = copy.deepcopy(bundle.net).eval()
    prep = PreprocessConfig.from_dict(bundle.config["preprocess"])
    x_u8 = (torch.rand((8, size, size), generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    sim = QuantSim(teacher)
    with torch.no_grad():
        d = teacher.backbone(torch.zeros(1, 3, size, size)).shape[1]
    rng = np.random.default_rng(8)
    ood = OODScorer(mean=rng.normal(size=d), components=np.linalg.qr(rng.normal(size=(d, 3)))[0].T,
                    class_means=rng.normal(size=(3, 3)), precision=np.diag([1.0, 2.0, 3.0]))
    metric = GateMetric(ood)
    module = make_module(sim, QatConfig(fp32_share=0.0, feature_weight=0.5), prep, x_u8, 1.0, None, metric=metric)
    module.log = lambda *a, **k: None
    x = module.inputs(x_u8, False)
    with torch.no_grad():
        f_t = teacher.backbone(x)
        t = teacher.head(f_t)
    sim.calibrate([x])
    loss = module.training_step((x_u8, t, metric(f_t)), 0)
    sim.enable(True)
    with torch.no_grad():
        z = sim.net(x)
        f_s = sim.features
    kl = torch.nn.functional.kl_div(calibrated_log_probs(z, 1.0, None), calibrated_log_probs(t, 1.0, None),
                                    reduction="batchmean", log_target=True)
    want = kl + 0.5 * (metric(f_s) - metric(f_t)).pow(2).mean()
    assert float(want - kl) > 0 and float(loss) == pytest.approx(float(want), rel=1e-4)


def test_feature_distillation_needs_a_calibrated_teacher_and_says_so_first(tiny_model_dir, tmp_path, capsys):
    assert main(["qat", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--feature-weight", "0.1"]) == 2
    assert "no learned out-of-scope gate" in capsys.readouterr().err and not (tmp_path / "o").exists()
