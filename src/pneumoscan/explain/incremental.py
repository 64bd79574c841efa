"""Occlusion sensitivity by incremental inference: the same map, a fraction of the work.

An occluded copy differs from the image in one patch only, and a convolution's output depends
on a small window of its input. So the network is cut into segments: the stem with the
stride-2 blocks, then one segment per block up to the end of the first stride-16 stage, then
the *suffix* (the rest of the network and the head).

* Every segment runs once on the whole image (the "base" activations).
* For each occluded copy, a segment runs only on a crop of its input: the changed window (the
  patch, then the outputs the previous segment changed) plus the segment's receptive field,
  aligned to the segment's stride so that the crop's grid is the map's grid. The outputs the
  change can reach are kept and become the next segment's changed window, pasted into that
  segment's base input.
* The suffix runs on the whole map, with the last changed window pasted in.

Every number is computed exactly as in a full pass (the crop's borders are either the map's
borders, padded the same way, or lie outside every kept output's receptive field), so the map
equals Captum's ``Occlusion`` on the full network to float rounding; :class:`IncrementalOcclusion`
checks that on sample positions before it is used. This is the idea of Krypton (Nakandala,
Kumar and Papakonstantinou, "Incremental and approximate inference for faster occlusion-based
deep CNN explanations", SIGMOD 2019), restricted to the layers where a 16-px patch reaches only
part of the map: for EfficientNet-Lite0 at 224 px the crops are 11-28 px wide and the copies
cost about half a full pass each (``benchmarks/results/explain-*.json``). From the stride-16
stage with 5x5 kernels on, a patch reaches the whole map, so the suffix runs in full.

All segments run in ONNX Runtime (exported once per network and cached on disk, see
:func:`graph_cache_dir`). Supported: timm EfficientNet-family backbones whose early blocks do not
pool globally (squeeze-excite blocks go to the suffix; EfficientNet-Lite0/1/2 have none), alone,
with a head, or in an ensemble with flip test-time augmentation. Anything else uses Captum on the
full network (:class:`pneumoscan.explain.occlusion.OcclusionSensitivity`).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, PneumoscanError
from ..features.cache import default_cache_dir
from ..features.engines import net_digest
from ..io import atomic_write_bytes
from ..labels import softmax
from ..nets.graph import StaticPadConv2d, export_fast, static_same_padding
from ..nets.heads import combine, views_of
from ..runtime import cpu_count, ort_session
from .config import BATCH, PATCH, STRIDE

log = logging.getLogger(__name__)

LAST_STRIDE = 16  # blocks run on crops up to the end of the first stage at this output stride
GRAPH_VERSION = "occ2"


def graph_cache_dir() -> Path:
    """Where exported segment graphs are kept: ``graphs/`` in the feature cache ($PNEUMOSCAN_CACHE)."""
    return default_cache_dir() / "graphs"


class UnsupportedNetwork(ModelError):
    """The network cannot be split for incremental occlusion (use the full-network path)."""


# ----------------------------------------------------------------------------------------------
# splitting a network


def _flat_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in order, stage after stage."""
    return [block for stage in backbone.blocks for block in stage]


class _Stem(nn.Module):
    """The stem and the first ``k`` blocks: the first segment."""

    def __init__(self, backbone: nn.Module, k: int) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = backbone.conv_stem, backbone.bn1
        self.blocks = nn.Sequential(*_flat_blocks(backbone)[:k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class _Suffix(nn.Module):
    """Blocks ``k`` on, the head convolution, pooling, classifier and the pneumoscan head."""

    def __init__(self, net: nn.Module, k: int) -> None:
        super().__init__()
        bb = net.backbone if hasattr(net, "backbone") else net
        self.blocks, self.conv_head, self.bn2 = nn.Sequential(*_flat_blocks(bb)[k:]), bb.conv_head, bb.bn2
        self.pool, self.classifier = bb.global_pool, bb.classifier
        self.head = net.head if hasattr(net, "backbone") else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x)))
        return self.head(self.classifier(self.pool(x)))


@dataclass(frozen=True)
class Geometry:
    """Where a segment's output looks: output ``o`` reads input ``[o*stride - offset, o*stride - offset + reach)``."""

    stride: int
    reach: int  # receptive field, input pixels
    offset: int  # total left/top padding, input pixels


def _conv_geometry(m: nn.Module) -> tuple[int, int, int]:
    """(kernel extent, stride, left pad) of a square convolution along one axis."""
    conv = m.conv if isinstance(m, StaticPadConv2d) else m
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
        raise UnsupportedNetwork("non-square convolutions are not supported by incremental occlusion")
    if isinstance(m, StaticPadConv2d):
        if m.pads[0] != m.pads[2]:
            raise UnsupportedNetwork("padding that differs between the axes is not supported")
        pad = m.pads[0]
    elif isinstance(conv.padding, str):
        if conv.padding != "same" or s != 1:
            raise UnsupportedNetwork(f"padding {conv.padding!r} is not supported")
        pad = d * (k - 1) // 2
    else:
        pad = conv.padding[0]
    return d * (k - 1) + 1, s, pad


def _pooling_types() -> tuple[type, ...]:
    """Layers that pool over the whole map (an occluded patch changes every output of theirs)."""
    pooling: tuple[type, ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    try:
        from timm.layers import SEModule, SqueezeExcite
        from timm.models._efficientnet_blocks import SqueezeExcite as BlockSE
        pooling += (SEModule, SqueezeExcite, BlockSE)
    except ImportError:  # pragma: no cover - other timm layouts; the self-check still guards
        pass
    return pooling


def segment_geometry(segment: nn.Module, example: torch.Tensor) -> Geometry:
    """Stride, receptive field and offset of ``segment`` (a chain of convolutions with pointwise
    layers and identity shortcuts between them), from its convolutions in the order they run."""
    if any(isinstance(m, _pooling_types()) for m in segment.modules()):
        raise UnsupportedNetwork("the early layers pool globally (squeeze-excite): occlusion needs the full network")
    inner = {id(m.conv) for m in segment.modules() if isinstance(m, StaticPadConv2d)}
    convs = [m for m in segment.modules()
             if isinstance(m, StaticPadConv2d) or (isinstance(m, nn.Conv2d) and id(m) not in inner)]
    calls: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append(m) and None) for m in convs]
    try:
        with torch.no_grad():
            segment(example)
    finally:
        for h in hooks:
            h.remove()
    stride, reach, offset = 1, 1, 0
    for m in calls:
        k, s, pad = _conv_geometry(m)
        reach += (k - 1) * stride
        offset += pad * stride
        stride *= s
    return Geometry(stride, reach, offset)


def split_indices(backbone: nn.Module, size: int, last_stride: int = LAST_STRIDE) -> list[int]:
    """Segment ends as counts of blocks (in :func:`_flat_blocks` order): the first segment is the
    stem with the stride-2 blocks, then one segment per block up to the end of the first stage
    that reaches ``last_stride``; the suffix is the rest. One block per segment keeps each crop's
    margin (the segment's receptive field) small."""
    if not all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        raise UnsupportedNetwork(f"{type(backbone).__name__} is not a timm EfficientNet-family backbone")
    strides, stage_of = [], []
    with torch.no_grad():
        x = backbone.bn1(backbone.conv_stem(torch.zeros(1, 3, size, size)))
        for i, stage in enumerate(backbone.blocks):
            for block in stage:
                x = block(x)
                strides.append(size // x.shape[-1])
                stage_of.append(i)
    first = max((k + 1 for k, st in enumerate(strides) if st <= 2), default=0)
    reach = [k for k, st in enumerate(strides) if st >= last_stride]
    if not reach:
        raise UnsupportedNetwork(f"no block reaches stride {last_stride}")
    last = max(k + 1 for k, st in enumerate(stage_of) if st == stage_of[reach[0]])
    pools = [k for k, block in enumerate(_flat_blocks(backbone))
             if any(isinstance(m, _pooling_types()) for m in block.modules())]
    if pools:  # squeeze-excite and the like belong in the suffix, which runs on the whole map
        last = min(last, pools[0])
        if last < max(first, 1):
            raise UnsupportedNetwork("the early layers pool globally (squeeze-excite): "
                                     "occlusion needs the full network")
    cuts = [c for c in range(max(first, 1), last + 1) if c < len(strides)]
    if not cuts:
        raise UnsupportedNetwork("the network is too shallow to split")
    return cuts


# ----------------------------------------------------------------------------------------------
# one network (an ensemble member or a single model) as ONNX Runtime segments


def _session(data: bytes, threads: int | None = None):
    # the segments run in turn: a session whose threads spin after its run steals the cores the
    # next session needs (measured: every segment 1.4-2.4x slower with spinning on)
    return ort_session(data, threads=threads or cpu_count(), spinning=False, quiet=True)


class SplitNet:
    """A single network as ONNX Runtime segments: convolutional ones that take any input size
    (run on crops), then the suffix on the whole map. ``geometry[i]`` and ``sizes[i]`` describe
    segment ``i``'s input side and receptive field.

    ``lanes`` independent sets of sessions let that many threads run batches side by side, each
    lane single-threaded (with one lane, the session uses every core). On two cores two lanes
    are about 11 % faster than one two-thread lane: the small crop convolutions parallelise
    poorly inside an operator, and one lane's NumPy work overlaps the other's inference.
    """

    def __init__(self, net: nn.Module, size: int, cache_dir: str | os.PathLike | None = None,
                 last_stride: int = LAST_STRIDE, lanes: int = 1) -> None:
        net = net.cpu().eval()
        cuts = split_indices(getattr(net, "backbone", net), size, last_stride)
        static = static_same_padding(net, size)
        sbb = getattr(static, "backbone", static)
        flat = _flat_blocks(sbb)
        modules: list[nn.Module] = [_Stem(sbb, cuts[0])]
        modules += [nn.Sequential(*flat[a:b]) for a, b in zip(cuts, cuts[1:])]
        suffix = _Suffix(static, cuts[-1]).eval()
        self.geometry: list[Geometry] = []
        self.sizes: list[int] = []
        x = torch.zeros(1, 3, size, size)
        examples = []
        for m in modules:
            m.eval()
            side = x.shape[-1]
            g = segment_geometry(m, x)
            examples.append(x)
            with torch.no_grad():
                y = m(x)
            if side % g.stride or y.shape[-1] * g.stride != side:
                raise UnsupportedNetwork(f"input side {side} is not tiled by the stride {g.stride}")
            self.geometry.append(g)
            self.sizes.append(side)
            x = y
        self.map_shape = tuple(x.shape[1:])
        folder = Path(cache_dir) if cache_dir else graph_cache_dir()
        key = f"{net_digest(net)[:16]}-s{size}-k{'-'.join(map(str, cuts))}-{GRAPH_VERSION}"
        graphs = [self._graph(folder / f"seg{i}-{key}.onnx", m, ex.shape[-1], True, ex)
                  for i, (m, ex) in enumerate(zip(modules, examples))]
        graphs.append(self._graph(folder / f"suffix-{key}.onnx", suffix, size, False, torch.zeros(2, *self.map_shape)))
        self.n_segments = len(modules)
        threads = None if lanes == 1 else 1
        self.lanes = [[_session(g, threads) for g in graphs] for _ in range(max(1, lanes))]

    @staticmethod
    def _graph(path: Path, module: nn.Module, size: int, dynamic_hw: bool, example: torch.Tensor) -> bytes:
        try:
            if path.is_file():
                return path.read_bytes()
        except OSError:
            pass
        example = example.expand(2, *example.shape[1:]).contiguous()
        data = export_fast(module, size, "input", "output", dynamic_hw=dynamic_hw, example=example)
        try:
            atomic_write_bytes(path, data)
        except OSError as e:  # a read-only cache only costs the export next time
            log.debug("graph cache %s not writable: %s", path, e)
        return data

    def run(self, i: int, x: np.ndarray, lane: int = 0) -> np.ndarray:
        """Segment ``i`` (``n_segments`` = the suffix) on a batch, in ``lane``'s sessions."""
        return self.lanes[lane][i].run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]

    def bases(self, x: np.ndarray) -> list[np.ndarray]:
        """Every segment's input for the unoccluded image, and the suffix's input last."""
        out = [x]
        for i in range(self.n_segments):
            out.append(self.run(i, out[-1]))
        return out


# ----------------------------------------------------------------------------------------------
# crop planning


@dataclass(frozen=True)
class Plan:
    """One segment, one axis: for each patch position, the changed window of the segment's input,
    the crop it runs on, and the outputs kept from it (which become the next changed window)."""

    window: np.ndarray  # (n, 2) changed input range [a, b)
    crop: int  # crop length, input px (a multiple of the stride)
    starts: np.ndarray  # (n,) crop start, input px
    keep: np.ndarray  # (n, 2) kept output range [a, b), crop-output coordinates
    stride: int

    def next_window(self) -> np.ndarray:
        return self.keep + (self.starts // self.stride)[:, None]


def plan_axis(size: int, window: np.ndarray, g: Geometry) -> Plan:
    """Crops along one axis: each holds every output whose receptive field meets the changed
    ``window``, with those outputs' whole receptive fields inside the crop or beyond the edge."""
    first = np.arange(size // g.stride) * g.stride - g.offset  # field [first, first + reach) per output
    lo = np.array([np.nonzero((first < b) & (first + g.reach > a))[0][0] for a, b in window])
    hi = np.array([np.nonzero((first < b) & (first + g.reach > a))[0][-1] + 1 for a, b in window])
    c = np.maximum(0, (lo * g.stride - g.offset) // g.stride * g.stride)  # o_lo's field start, on the grid
    e = np.minimum(size, -(-((hi - 1) * g.stride - g.offset + g.reach) // g.stride) * g.stride)
    length = int((e - c).max())
    c = np.minimum(c, size - length)  # one crop length for all, shifted back inside the image
    keep = np.stack([lo - c // g.stride, hi - c // g.stride], 1)
    return Plan(np.asarray(window, int), length, c.astype(int), keep.astype(int), g.stride)


def plan_chain(split: SplitNet, window: np.ndarray) -> list[Plan]:
    """The plans of every segment for the patch ``window`` ((n, 2) [start, end) along one axis)."""
    plans = []
    for g, side in zip(split.geometry, split.sizes):
        plans.append(plan_axis(side, window, g))
        window = plans[-1].next_window()
    return plans


def patch_windows(size: int, patch: int, stride: int) -> np.ndarray:
    """Patch ranges [start, end) along one axis, as Captum's ``Occlusion`` places them: starts
    0, stride, ... up to ceil((size - patch) / stride) strides, the last one clipped at the edge."""
    n = -(-(size - patch) // stride) + 1
    starts = np.arange(n) * stride
    return np.stack([starts, np.minimum(starts + patch, size)], 1)


# ----------------------------------------------------------------------------------------------
# the explainer


class IncrementalOcclusion:
    """Occlusion sensitivity of a PneumoNet or an :class:`~pneumoscan.nets.heads.Ensemble` of them.

    Same conventions as :class:`pneumoscan.explain.occlusion.OcclusionSensitivity` (patch filled with the
    image mean per channel, the drop of the target class's probability averaged over the patch
    positions covering each pixel) and the same result, in a fraction of the time.

    ``batch_size`` occluded copies are in flight at once, split over ``lanes`` threads (default:
    one per core, see :class:`SplitNet`).
    """

    def __init__(self, net: nn.Module, size: int, patch: int = PATCH, stride: int = STRIDE, batch_size: int = BATCH,
                 cache_dir: str | os.PathLike | None = None, check: bool = True,
                 last_stride: int = LAST_STRIDE, lanes: int | None = None) -> None:
        t0 = time.perf_counter()
        self.size, self.patch, self.stride, self.batch_size = int(size), int(patch), int(stride), int(batch_size)
        self.n_lanes = max(1, min(int(lanes or cpu_count()), self.batch_size))
        for name, v in (("patch", self.patch), ("stride", self.stride), ("batch size", self.batch_size)):
            if v < 1:
                raise PneumoscanError(f"occlusion {name} {v!r} must be a positive integer (e.g. 16)")
        if self.patch > self.size:
            raise PneumoscanError(f"occlusion patch {patch} px is larger than the model input ({size} px)")
        self.net = net
        self.views: list[tuple[SplitNet, int, np.ndarray | None, bool]] = []  # (net, member, affine, flipped)
        splits: dict[int, SplitNet] = {}
        for v in views_of(net):  # the ensemble's own list of views: members, mirrored ones with flip TTA
            if v.size is not None:
                raise UnsupportedNetwork("a member at another resolution (resized inside the graph) cannot be "
                                         "occluded incrementally")
            if v.index not in splits:
                splits[v.index] = SplitNet(v.net, self.size, cache_dir, last_stride, self.n_lanes)
            affine = None if v.affine is None else np.stack([t.detach().cpu().numpy().reshape(3) for t in v.affine])
            self.views.append((splits[v.index], v.index, affine, v.flipped))
        self.windows = patch_windows(self.size, self.patch, self.stride)
        first = self.views[0][0]
        self.rows = plan_chain(first, self.windows)  # rows and columns share the windows
        self.cols_flipped = plan_chain(first, self.size - self.windows[:, ::-1])  # seen in the mirrored image
        self.setup_seconds = time.perf_counter() - t0
        if check:
            self.self_check(net)

    def __repr__(self) -> str:
        crops = "/".join(f"{p.crop}" for p in self.rows)
        return (f"IncrementalOcclusion(patch={self.patch}, stride={self.stride}, views={len(self.views)}, "
                f"segments={len(self.rows)}, crops={crops} px)")

    def n_copies(self) -> int:
        return len(self.windows) ** 2

    # -- probabilities of occluded copies -------------------------------------------------------

    @staticmethod
    def _view_input(x: np.ndarray, affine, flipped: bool) -> np.ndarray:
        v = x * affine[0].reshape(1, 3, 1, 1) + affine[1].reshape(1, 3, 1, 1) if affine is not None else x
        return np.ascontiguousarray(v[..., ::-1] if flipped else v, np.float32)

    def _view_probabilities(self, split: SplitNet, bases: list[np.ndarray], vfill: np.ndarray, cells: np.ndarray,
                            flipped: bool, lane: int = 0) -> np.ndarray:
        cols = self.cols_flipped if flipped else self.rows  # rows and columns share the windows
        last_rows, last_cols = self.rows[-1].next_window(), cols[-1].next_window()
        step = max(1, self.batch_size // self.n_lanes)
        out = []
        for b0 in range(0, len(cells), step):
            ri, ci = cells[b0:b0 + step, 0], cells[b0:b0 + step, 1]
            n = len(ri)
            changed = [vfill[0]] * n  # level 0: the patch holds the fill value (broadcast)
            for level, (rp, cp) in enumerate(zip(self.rows, cols)):
                base, L = bases[level][0], rp.crop
                crops = np.empty((n, base.shape[0], L, L), np.float32)
                for j in range(n):
                    cy, cx = rp.starts[ri[j]], cp.starts[ci[j]]
                    (ya, yb), (xa, xb) = rp.window[ri[j]], cp.window[ci[j]]
                    crops[j] = base[:, cy:cy + L, cx:cx + L]
                    crops[j, :, ya - cy:yb - cy, xa - cx:xb - cx] = changed[j]
                mids = split.run(level, crops, lane)
                changed = [mids[j, :, rp.keep[ri[j], 0]:rp.keep[ri[j], 1], cp.keep[ci[j], 0]:cp.keep[ci[j], 1]]
                           for j in range(n)]
            feats = np.repeat(bases[-1], n, axis=0)
            for j in range(n):
                (ya, yb), (xa, xb) = last_rows[ri[j]], last_cols[ci[j]]
                feats[j, :, ya:yb, xa:xb] = changed[j]
            out.append(softmax(split.run(split.n_segments, feats, lane)))
        return np.concatenate(out)

    def _combine(self, per_view: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """The ensemble's own combination of its views (:meth:`pneumoscan.nets.heads.Ensemble.combine`)."""
        return combine(self.net, [p for _, p in per_view])

    def _prepare(self, x: np.ndarray) -> list[tuple]:
        """Per view: (split net, member, flipped, the unoccluded image's segment inputs, fill value)."""
        fill = x.mean(axis=(2, 3), keepdims=True)
        return [(split, member, flipped, split.bases(self._view_input(x, affine, flipped)),
                 self._view_input(fill, affine, False)) for split, member, affine, flipped in self.views]

    def probabilities(self, x: np.ndarray, cells: np.ndarray, prepared: list[tuple] | None = None) -> np.ndarray:
        """Probabilities (n, C) of the copies of ``x`` (1, 3, S, S) occluded at ``cells`` ((n, 2)
        row and column indices into :attr:`windows`)."""
        cells = np.asarray(cells, int).reshape(-1, 2)
        parts = [p for p in np.array_split(cells, self.n_lanes) if len(p)]

        def view(split, flipped, bases, vfill):
            if len(parts) == 1:
                return self._view_probabilities(split, bases, vfill, cells, flipped)
            with ThreadPoolExecutor(len(parts)) as pool:  # ONNX Runtime releases the GIL while it runs
                futures = [pool.submit(self._view_probabilities, split, bases, vfill, part, flipped, lane)
                           for lane, part in enumerate(parts)]
                return np.concatenate([f.result() for f in futures])

        return self._combine([(member, view(split, flipped, bases, vfill))
                              for split, member, flipped, bases, vfill in prepared or self._prepare(x)])

    def full_probabilities(self, x: np.ndarray, prepared: list[tuple] | None = None) -> np.ndarray:
        """Probabilities of ``x`` itself (1, C), through the same segments."""
        return self._combine([(member, softmax(split.run(split.n_segments, bases[-1])))
                              for split, member, _, bases, _ in prepared or self._prepare(x)])

    # -- the map --------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor | np.ndarray, target: int) -> np.ndarray:
        x = x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.shape != (1, 3, self.size, self.size):
            raise PneumoscanError(f"expected one normalised image of shape (3, {self.size}, {self.size}), "
                                  f"got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise PneumoscanError("the input tensor holds NaN or infinite values")
        n = len(self.windows)
        cells = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
        prepared = self._prepare(x)  # the unoccluded image through every segment, once per view
        p0 = self.full_probabilities(x, prepared)[0, target]
        drop = p0 - self.probabilities(x, cells, prepared)[:, target]
        total = np.zeros((self.size, self.size), np.float64)
        count = np.zeros((self.size, self.size), np.float64)
        for (i, k), d in zip(cells, drop):
            (ya, yb), (xa, xb) = self.windows[i], self.windows[k]
            total[ya:yb, xa:xb] += d
            count[ya:yb, xa:xb] += 1
        return np.divide(total, count, out=np.zeros_like(total), where=count > 0).astype(np.float32)

    def self_check(self, net: nn.Module, tol: float = 1e-4) -> None:
        """Compare with the full network on a few occluded copies; raises :class:`UnsupportedNetwork`."""
        rng = np.random.default_rng(0)
        x = rng.normal(0, 1, (1, 3, self.size, self.size)).astype(np.float32)
        n = len(self.windows)
        cells = np.array(sorted({(0, 0), (n - 1, n - 1), (0, n - 1), (n // 2, n // 3)}))
        got = self.probabilities(x, cells)
        fill = x.mean(axis=(2, 3))[0]
        occluded = np.repeat(x, len(cells), axis=0)
        for j, (i, k) in enumerate(cells):
            (ya, yb), (xa, xb) = self.windows[i], self.windows[k]
            occluded[j, :, ya:yb, xa:xb] = fill[:, None, None]
        with torch.inference_mode():
            want = net(torch.from_numpy(occluded)).float().softmax(-1).numpy()
        err = float(np.abs(got - want).max())
        if not err <= tol:
            raise UnsupportedNetwork(f"incremental occlusion differs from the full network by {err:.1e}")
        log.debug("incremental occlusion self-check: max difference %.1e", err)
