"""Quantisation-aware training by distillation: a copy of a model that keeps its answers in INT8.

Post-training INT8 (``pneumoscan export --int8``) keeps the shipped model's AUC but flips too many
bacterial-vs-viral verdicts to pass the export gate: the quantisation error grows layer by layer
(README, INT8). :func:`qat` fine-tunes a copy of a single-network model so that the INT8 graph
ONNX Runtime will make of it gives the answers the original gives:

1. batch norm is folded into each convolution (as the ONNX export folds it), then fake quantisation
   is put exactly where ONNX Runtime's static QDQ quantiser puts its QuantizeLinear nodes: the input,
   every convolution's output after its activation, every residual sum, the pooled features and the
   logits (u8, asymmetric, one min-max range per tensor over the calibration images), and every
   convolution's and the dense layer's weights (s8, symmetric, one scale per output channel; full
   or reduced range as the export will make them on this CPU, ``weight_range``).
   ``tests/train/test_qat.py`` checks the count and the outputs against ONNX Runtime's own graph;
2. the ranges are calibrated on a seeded sample of the training split, as the export's are, and
   re-calibrated at each epoch's start, so the last epoch trains under the ranges export will find;
3. the copy is distilled from the original (the teacher, fp32, frozen) on the training images: the
   loss is the KL divergence between the teacher's and the copy's *calibrated* distributions (the
   teacher's temperature and class biases, the probabilities verdicts are taken from). A share of the
   steps (``fp32_share``) runs the copy without fake quantisation, so its fp32 graph, the one a CPU
   without VNNI serves and the one the export gate compares INT8 with, follows the teacher too;
4. the result is an ordinary model directory: batch norm is restored as an identity scale carrying
   the folded bias, so predict, export, calibrate and ``export --int8`` use it unchanged. Its
   ``config.json["qat"]`` records the teacher and the emulated agreement on validation.

Training runs on PyTorch Lightning's ``Trainer`` like fine-tuning (one CPU, a GPU, DDP).
Supported: single networks of convolutions with batch norm, ReLU, ReLU6, SiLU or no activation, and
timm's squeeze-and-excitation (EfficientNet-Lite, EfficientNet-B0 and the test backbone); anything
else is refused before any image is read.
"""
from __future__ import annotations

import copy
import logging
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data.manifest import Manifest
from ..data.splits import calibration_sample, load_manifest
from ..errors import ModelError, PneumoscanError
from ..labels import DEFAULT_THRESHOLD, LABELS, softmax
from ..nets.checkpoint import ModelBundle, load_model, save_model
from ..nets.heads import PneumoNet
from ..nets.modeldir import verify_file
from ..preprocess import PreprocessConfig
from ..runtime import WEIGHT_LEVELS, weight_range
from ..uncertainty import OODScorer, calibrated_decision, model_calibration
from .augment import BatchInput
from .callbacks import fit_interruptible, progress_bar
from .config import AugmentConfig, QatConfig
from .finetune import load_images, warmup_then

log = logging.getLogger(__name__)

ACT_LEVELS = (0, 255)  # u8 activations (ONNX Runtime's QUInt8)
SUPPORTED_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Identity)
KEEP = ("backbone", "timm_name", "weights_source", "preprocess", "labels", "head", "train_prior",
        "manifest_sha256", "data", "train_config", "finetuned")  # teacher fields that hold for the copy


class FakeQuant(nn.Module):
    """u8 fake quantisation of a tensor with one min-max range (ONNX Runtime's MinMax calibrator: the
    range over every calibration image, widened to hold 0); a straight-through gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.observing = False
        self.enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.lo = torch.minimum(self.lo, x.detach().min())
            self.hi = torch.maximum(self.hi, x.detach().max())
        if not self.enabled:
            return x
        scale = max(float(self.hi - self.lo) / (ACT_LEVELS[1] - ACT_LEVELS[0]), 1e-12)
        zero = int(round(-float(self.lo) / scale)) + ACT_LEVELS[0]
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, *ACT_LEVELS)


class WeightFakeQuant(nn.Module):
    """s8 symmetric fake quantisation, one scale per output channel (a parametrisation of ``weight``), over
    ``levels`` (:data:`pneumoscan.runtime.WEIGHT_LEVELS`: full or ONNX Runtime's reduced range)."""

    def __init__(self, levels: tuple[int, int]) -> None:
        super().__init__()
        self.enabled = False
        self.levels = levels

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.levels[1]).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, *self.levels)


class QuantAct(nn.Module):
    """The activation after a convolution (its batch norm folded), quantised as ONNX Runtime quantises it:
    ReLU and ReLU6 fused into the convolution (one range, after the activation); SiLU as ONNX has it,
    ``x * sigmoid(x)``, with the convolution's output, the sigmoid and the product each quantised."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        if not isinstance(act, SUPPORTED_ACTS):
            raise ModelError(f"activation {type(act).__name__} is not emulated (supported: ReLU, ReLU6, SiLU)")
        self.act = act
        self.out = FakeQuant()
        self.silu = nn.ModuleList([FakeQuant(), FakeQuant()]) if isinstance(act, nn.SiLU) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu is not None:
            x = self.silu[0](x)
            return self.out(x * self.silu[1](torch.sigmoid(x)))
        return self.out(self.act(x))


class QuantSE(nn.Module):
    """timm's squeeze-and-excitation, quantised as ONNX Runtime quantises its graph: the pooled mean, the
    reducing convolution's activation (:class:`QuantAct`), the expanding convolution's output, the
    sigmoid gate and the gated product."""

    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        if not isinstance(se.gate, nn.Sigmoid):
            raise ModelError(f"squeeze-and-excitation gate {type(se.gate).__name__} is not emulated (supported: sigmoid)")
        self.conv_reduce, self.conv_expand = se.conv_reduce, se.conv_expand
        self.act1 = QuantAct(se.act1)
        self.pooled, self.expanded, self.gate, self.out = FakeQuant(), FakeQuant(), FakeQuant(), FakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act1(self.conv_reduce(self.pooled(x.mean((2, 3), keepdim=True))))
        return self.out(x * self.gate(torch.sigmoid(self.expanded(self.conv_expand(s)))))


def _se_type():
    from timm.models._efficientnet_blocks import SqueezeExcite
    return SqueezeExcite


def _bn_act_type():
    from timm.layers import BatchNormAct2d
    return BatchNormAct2d


def _conv_bn_pairs(net: nn.Module) -> list[tuple[str, str]]:
    """(convolution, batch norm) qualified names: each Conv2d directly followed by a BatchNormAct2d."""
    bn_type = _bn_act_type()
    pairs = []
    for pname, parent in net.named_modules():
        kids = list(parent.named_children())
        for (n1, c), (n2, bn) in zip(kids, kids[1:]):
            if isinstance(c, nn.Conv2d) and isinstance(bn, bn_type):
                pre = f"{pname}." if pname else ""
                pairs.append((pre + n1, pre + n2))
    return pairs


def check_supported(net: nn.Module, source: str) -> None:
    """Refuse a network this emulation does not describe exactly (before any image is read)."""
    if not isinstance(net, PneumoNet):
        raise ModelError(f"{source} is an ensemble; quantisation-aware training needs one network: make one with "
                         "'pneumoscan soup' first")
    bn_type, se_type = _bn_act_type(), _se_type()
    paired = {bn for _, bn in _conv_bn_pairs(net)}
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in paired:
            raise ModelError(f"{source}: batch norm {name} does not follow a convolution; its network cannot be "
                             "folded for quantisation-aware training")
        acts = [m.act] if isinstance(m, bn_type) else [m.act1, m.gate] if isinstance(m, se_type) else []
        for a in acts:
            if not isinstance(a, (*SUPPORTED_ACTS, nn.Sigmoid)):
                raise ModelError(f"{source}: activation {type(a).__name__} at {name} is not emulated (supported: "
                                 "ReLU, ReLU6, SiLU)")
        if type(m).__name__.lower().startswith(("squeeze", "semodule", "effective")) and not isinstance(m, se_type):
            raise ModelError(f"{source}: squeeze-and-excitation {type(m).__name__} at {name} is not emulated")


class QuantSim:
    """A copy of ``net`` with batch norm folded and fake quantisation at ONNX Runtime's QDQ points."""

    def __init__(self, net: PneumoNet, weights: str = "full") -> None:
        self.net = copy.deepcopy(net).eval()  # weights: "full" or "reduced" (:func:`pneumoscan.runtime.weight_range`)
        self.pairs = _conv_bn_pairs(self.net)
        self.eps: dict[str, float] = {}
        mods = dict(self.net.named_modules())
        for conv_name, bn_name in self.pairs:
            conv, bn = mods[conv_name], mods[bn_name]
            s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            with torch.no_grad():
                conv.weight.mul_(s.view(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter((bn.bias.detach() - bn.running_mean * s).clone())
            self.eps[bn_name] = float(bn.eps)
            parent, _, child = bn_name.rpartition(".")
            setattr(mods[parent] if parent else self.net, child, QuantAct(bn.act))  # bn.drop: identity in eval
        se_type = _se_type()
        for name, m in list(self.net.named_modules()):
            if isinstance(m, se_type):
                parent, _, child = name.rpartition(".")
                setattr(dict(self.net.named_modules())[parent] if parent else self.net, child, QuantSE(m))
        self.weights = []
        for m in list(self.net.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                wq = WeightFakeQuant(WEIGHT_LEVELS[weights])
                parametrize.register_parametrization(m, "weight", wq)
                self.weights.append(wq)
        self.extra = {k: FakeQuant() for k in ("input", "features", "logits")}
        self.features: torch.Tensor | None = None  # the pooled features of the last forward pass (as quantised)
        self.net.register_forward_pre_hook(lambda _m, a: (self.extra["input"](a[0]),))
        self.net.backbone.register_forward_hook(self._features)
        self.net.register_forward_hook(lambda _m, _a, out: self.extra["logits"](out))
        self.sums = []
        for m in self.net.backbone.modules():
            if getattr(m, "has_skip", False):  # a residual block: ONNX Runtime quantises its Add's output
                q = FakeQuant()
                m.register_forward_hook(lambda _m, _a, out, q=q: q(out))
                self.sums.append(q)
        self.net.add_module("quant_points", nn.ModuleList([*self.extra.values(), *self.sums]))

    def _features(self, _m, _a, out: torch.Tensor) -> torch.Tensor:
        self.features = self.extra["features"](out)
        return self.features

    @property
    def activations(self) -> list[FakeQuant]:
        return [m for m in self.net.modules() if isinstance(m, FakeQuant)]

    def enable(self, on: bool) -> None:
        for q in [*self.activations, *self.weights]:
            q.enabled = on

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Min-max ranges of every quantised tensor over ``batches`` (normalised inputs), in fp32."""
        was = self.net.training
        self.net.eval()
        self.enable(False)
        for q in self.activations:
            q.lo.zero_()
            q.hi.zero_()
            q.observing = True
        try:
            for x in batches:
                self.net(x)
        finally:
            for q in self.activations:
                q.observing = False
            self.net.train(was)

    def standard_state(self, template: PneumoNet) -> dict[str, torch.Tensor]:
        """The weights in the original layout: each batch norm an identity scale carrying the folded bias
        (its running variance 1 - eps), so an export folds it back to exactly these convolutions."""
        state = {k: v.detach().clone() for k, v in template.state_dict().items()}
        mods = dict(self.net.named_modules())
        for m_name, m in mods.items():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                state[f"{m_name}.weight"] = m.parametrizations.weight.original.detach().clone()
                if m.bias is not None and f"{m_name}.bias" in state:
                    state[f"{m_name}.bias"] = m.bias.detach().clone()
        for conv_name, bn_name in self.pairs:
            b = mods[conv_name].bias.detach().clone()
            state[f"{bn_name}.weight"] = torch.ones_like(b)
            state[f"{bn_name}.bias"] = b
            state[f"{bn_name}.running_mean"] = torch.zeros_like(b)
            state[f"{bn_name}.running_var"] = torch.full_like(b, 1.0 - self.eps[bn_name])
        return state


def calibrated_log_probs(logits: torch.Tensor, temperature: float, bias: torch.Tensor | None) -> torch.Tensor:
    """log of :func:`pneumoscan.uncertainty.temperature_scale` of ``softmax(logits)``, in torch."""
    z = torch.log_softmax(logits.float(), -1) / temperature
    if bias is not None:
        z = z + bias
    return torch.log_softmax(z, -1)


def torch_calibration(conf: dict) -> tuple[float, torch.Tensor | None]:
    """The model's temperature and class bias (:func:`pneumoscan.uncertainty.model_calibration`), the bias a tensor."""
    temperature, bias = model_calibration(conf)
    return temperature, None if bias is None else torch.tensor(bias, dtype=torch.float32)


def _batches(inputs: BatchInput, images: torch.Tensor, device: torch.device | None = None,
             batch: int = 64) -> Iterator[torch.Tensor]:
    """uint8 ``images`` as normalised network inputs, ``batch`` at a time."""
    for i in range(0, len(images), batch):
        yield inputs(images[i:i + batch].to(device), False)


class GateMetric(nn.Module):
    """The coordinates in which the out-of-scope gate measures pooled features: the scorer's PCA, whitened by its
    precision (:class:`pneumoscan.uncertainty.OODScorer`), so that the squared distance between two feature
    vectors here is their squared Mahalanobis distance under the gate."""

    def __init__(self, ood: OODScorer) -> None:
        super().__init__()
        chol = np.linalg.cholesky(ood.precision)  # precision = L L^T, so |d|^2_P = |d L|^2
        self.register_buffer("mean", torch.tensor(ood.mean, dtype=torch.float32))
        self.register_buffer("proj", torch.tensor(ood.components.T @ chol, dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return (f.float() - self.mean) @ self.proj


def make_module(sim: QuantSim, cfg: QatConfig, prep: PreprocessConfig, calibration: torch.Tensor,
                temperature: float, bias: torch.Tensor | None, metric: GateMetric | None = None):
    """The Lightning module; batches are (uint8 images, teacher logits) or, with ``metric`` (the out-of-scope
    gate's, and ``cfg.feature_weight`` > 0), (images, teacher logits, teacher features in that metric)."""
    import lightning.pytorch as pl

    class QatModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = sim.net
            self.inputs = BatchInput(prep, AugmentConfig(), batch_intensity=False)
            self.register_buffer("bias", bias if bias is not None else torch.zeros(len(LABELS)), persistent=False)
            self.metric = metric

        def on_train_epoch_start(self) -> None:
            sim.calibrate(_batches(self.inputs, calibration, self.device))
            self.net.eval()  # no batch norm is left; dropout stays off, as for the teacher's outputs

        def training_step(self, batch, _):
            x, teacher, *feats = batch
            quantised = random.Random(cfg.seed * 1_000_003 + self.global_step).random() >= cfg.fp32_share
            sim.enable(quantised)  # the same draw on every DDP rank
            log_p = calibrated_log_probs(self.net(self.inputs(x, False)), temperature, self.bias)
            target = calibrated_log_probs(teacher, temperature, self.bias)
            loss = nn.functional.kl_div(log_p, target, reduction="batchmean", log_target=True)
            if self.metric is not None and feats:  # the gate's squared distance from the teacher's features, per dim
                loss = loss + cfg.feature_weight * (self.metric(sim.features) - feats[0]).pow(2).mean()
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(total, max(1, total // 10)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return QatModule()


@torch.inference_mode()
def _logits(net: nn.Module, inputs: BatchInput, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x).float().cpu() for x in _batches(inputs, images, next(net.parameters()).device, batch)])


@torch.inference_mode()
def _teacher_outputs(net: PneumoNet, inputs: BatchInput, images: torch.Tensor, metric: GateMetric | None,
                     batch: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits and (with ``metric``) its pooled features in the gate's metric, in one pass."""
    net.eval()
    logits, feats = [], []
    for x in _batches(inputs, images, next(net.parameters()).device, batch):
        f = net.backbone(x)
        logits.append(net.head(f).float().cpu())
        if metric is not None:
            feats.append(metric(f).cpu())
    return torch.cat(logits), torch.cat(feats) if metric is not None else None


def _agreement(sim: QuantSim, inputs: BatchInput, images: torch.Tensor, teacher: torch.Tensor, conf: dict) -> dict:
    """On ``images``: the share of verdicts the emulated INT8 copy and its fp32 graph keep of the teacher's
    (``teacher``: its logits), their mutual agreement, and the mean KL divergence of each from the teacher."""
    temperature, bias = torch_calibration(conf)
    target = calibrated_log_probs(teacher, temperature, bias)
    out, v = {}, {}
    for name, on in (("int8", True), ("fp32", False)):
        sim.enable(on)
        z = _logits(sim.net, inputs, images)
        v[name] = calibrated_decision(softmax(z.numpy()), conf)
        lp = calibrated_log_probs(z, temperature, bias)
        out[f"kl_{name}"] = float(nn.functional.kl_div(lp, target, reduction="batchmean", log_target=True))
    ref = calibrated_decision(softmax(teacher.numpy()), conf)
    out.update({"int8_vs_teacher": float((v["int8"] == ref).mean()), "fp32_vs_teacher": float((v["fp32"] == ref).mean()),
                "int8_vs_fp32": float((v["int8"] == v["fp32"]).mean())})
    return out


def _gate_metric(model_dir: str | os.PathLike, conf: dict) -> GateMetric:
    """The teacher's out-of-scope metric (:class:`GateMetric`); :class:`ModelError` when it has no learned gate."""
    if not conf.get("ood"):
        raise ModelError(f"{model_dir} has no learned out-of-scope gate to distil the features for; run "
                         "'pneumoscan calibrate' on it first, or pass --feature-weight 0")
    return GateMetric(OODScorer.load(verify_file(Path(model_dir), conf["ood"]["file"], conf)))


def plan(model_dir: str | os.PathLike, data: str | os.PathLike | Manifest | None) -> tuple[ModelBundle, Manifest]:
    """The teacher and its manifest, checked before any image is decoded."""
    teacher = load_model(model_dir)
    check_supported(teacher.net, str(model_dir))
    m = data if isinstance(data, Manifest) else load_manifest(data, teacher.config, model_dir)
    if not m.subset("train") or not m.subset("val"):
        raise PneumoscanError(f"{model_dir}: its manifest has no train or no val split; pass --data with the "
                              "training folder or the model's manifest.csv")
    m.check_files()
    return teacher, m


def qat(model_dir: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike | Manifest | None = None,
        cfg: QatConfig = QatConfig(), *, progress: bool = True, command: str | None = None) -> Path | None:
    """Distil ``model_dir`` into a quantisation-aware copy written to ``out`` (rank 0; ``None`` elsewhere)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    t0 = time.time()
    cfg.check_machine()
    teacher, manifest = plan(model_dir, data)
    metric = _gate_metric(model_dir, teacher.config) if cfg.feature_weight > 0 else None  # checked before any decoding
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    conf = teacher.config
    prep = PreprocessConfig.from_dict(conf["preprocess"])
    train_s, val_s = manifest.subset("train"), manifest.subset("val")
    images, ok, failed = load_images([*train_s, *val_s], prep, cfg.workers, progress, intensity=True)
    if failed:
        log.warning("%d images could not be decoded and are left out (first: %s)", len(failed), failed[0][0])
    n = len(train_s)
    tr, va = np.flatnonzero(ok[:n]), n + np.flatnonzero(ok[n:])
    cal_idx = tr[calibration_sample(len(tr), cfg.calibration_images, cfg.seed)]
    inputs = BatchInput(prep, AugmentConfig(), batch_intensity=False)
    t_train, f_train = _teacher_outputs(teacher.net, inputs, images[tr], metric)  # the teacher once, in fp32
    t_val = _logits(teacher.net, inputs, images[va])

    weights, why = weight_range(cfg.weight_range)
    log.info("emulating %s-range INT8 weights (%s)", weights, why)
    sim = QuantSim(teacher.net, weights)
    cal_images = images[cal_idx]
    sim.calibrate(_batches(inputs, cal_images))
    before = _agreement(sim, inputs, images[va], t_val, conf)
    log.info("before: emulated INT8 keeps %.1f %% of the validation verdicts", 100 * before["int8_vs_teacher"])

    module = make_module(sim, cfg, prep, cal_images, *torch_calibration(conf), metric=metric)
    g = torch.Generator().manual_seed(cfg.seed)
    dataset = TensorDataset(images[tr], t_train, *([f_train] if f_train is not None else []))
    dl = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=g,
                    drop_last=len(tr) > cfg.batch_size, num_workers=0)
    trainer = pl.Trainer(max_epochs=cfg.epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
                         devices=cfg.devices, strategy=cfg.strategy, callbacks=[progress_bar()] if progress else [],
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=progress, log_every_n_steps=10, use_distributed_sampler=True)
    module.train()  # Lightning expects it; each epoch's start puts the network back in eval mode (no dropout)
    fit_interruptible(trainer, module, dl)
    if not trainer.is_global_zero:
        return None
    sim.net.cpu()
    sim.calibrate(_batches(inputs, cal_images))  # as export will
    after = _agreement(sim, inputs, images[va], t_val, conf)
    log.info("after: emulated INT8 keeps %.1f %% of the validation verdicts, fp32 %.1f %%; INT8 agrees with fp32 on %.1f %%",
             100 * after["int8_vs_teacher"], 100 * after["fp32_vs_teacher"], 100 * after["int8_vs_fp32"])

    net = copy.deepcopy(teacher.net)
    net.load_state_dict(sim.standard_state(teacher.net))
    record = {k: conf[k] for k in KEEP if k in conf}
    record.update({
        "name": f"{conf.get('name', conf.get('backbone', 'model'))}-qat",
        "kind": "single",
        "threshold": float(conf.get("threshold", DEFAULT_THRESHOLD)),
        "threshold_method": "the teacher's (not yet chosen on validation)",
        "qat": {"teacher": {"dir": str(model_dir), "model_id": teacher.model_id},
                "config": {**asdict(cfg), "weight_range": weights}, "weights_why": why,  # the range as resolved here
                "quantised_tensors": len(sim.activations), "quantised_weights": len(sim.weights),
                "validation_images": int(len(va)), "calibration_images": int(len(cal_idx)),
                "before": before, "after": after, "train_seconds": round(time.time() - t0, 1),
                "note": "on validation, against the teacher: the share of identical verdicts and the mean KL divergence "
                        "of the calibrated probabilities, ONNX Runtime's INT8 emulated"},
        "command": command,
    })
    out = Path(out)
    save_model(out, net, record)
    manifest.save(out / "manifest.csv")
    log.info("quantisation-aware copy written to %s", out)
    return out
