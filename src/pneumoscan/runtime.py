"""ONNX Runtime sessions and the cores this process may use: the one session builder, torch-free.

Every ONNX Runtime session of pneumoscan (feature extraction, the served model, parity checks,
occlusion graphs, graph rewrites) is made by :func:`ort_session`, so that optimisation level,
thread counts and spinning are chosen in one place and a broken graph gives one kind of error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import ModelError

LEVELS = ("disable", "basic", "extended", "all")  # ONNX Runtime graph optimisation levels


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def ort_session(model: Union[str, os.PathLike, bytes], *, threads: int | None = None, spinning: bool | None = None,
                level: str = "all", optimized_path: str | os.PathLike | None = None, quiet: bool = False,
                varying_shapes: bool = False):
    """An ONNX Runtime CPU session for a model file or its bytes.

    ``threads``: intra-op threads (None = ONNX Runtime's default, one per core); ``spinning``:
    whether idle threads spin (None = the default; off when other work shares the cores);
    ``optimized_path``: where ONNX Runtime saves the optimised graph; ``quiet``: errors only;
    ``varying_shapes``: inputs of many batch sizes (the service's dynamic batches): no memory plan is kept
    per input shape (ONNX Runtime's memory patterns), which otherwise grow the process by one plan per size.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = int(threads)
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if quiet:
        so.log_severity_level = 3
    if varying_shapes:
        so.enable_mem_pattern = False
    src = model if isinstance(model, (bytes, bytearray)) else str(Path(model))
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def memory_available() -> int:
    """Bytes of memory the system can give a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


CPUINFO = Path("/proc/cpuinfo")  # where the CPU's instruction-set flags are read (Linux)
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # VNNI-class: u8 x s8 dot products in one instruction
SHOWN_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "amx_tile", "amx_int8", "amx_bf16")  # what benchmarks record of the instruction set


def cpu_flags(cpuinfo: str | os.PathLike | None = None) -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (the first ``flags`` line of /proc/cpuinfo);
    empty where that file does not exist (not Linux)."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def int8_ready(flags: frozenset[str] | set[str] | None = None) -> str | None:
    """The VNNI-class flag that makes INT8 inference fast here (``flags`` default: this CPU's), or None.

    Without one, ONNX Runtime's u8 x s8 kernels fall back to AVX2/AVX-512BW sequences that saturate
    intermediate sums and gain little over fp32, so fp32 is the better choice there.
    """
    have = cpu_flags() if flags is None else flags
    return next((f for f in INT8_FLAGS if f in have), None)


WEIGHT_RANGES = ("auto", "full", "reduced")  # the s8 weight range of an INT8 graph (auto: what this CPU computes exactly)
WEIGHT_LEVELS = {"full": (-127, 127), "reduced": (-64, 64)}  # symmetric s8 weights; reduced: ONNX Runtime's reduce_range


def weight_range(requested: str = "auto", flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """(range, why): the s8 weight range an INT8 graph is made (and emulated) with.

    "full" (-127..127) is exact where the CPU has a VNNI-class instruction set. Elsewhere ONNX Runtime's
    u8 x s8 kernels multiply with AVX2/AVX-512BW ``vpmaddubsw``, which adds each pair of products into a
    saturating 16-bit sum: full-range weights overflow it (255 x 127 x 2 > 32767; on the shipped model
    only 28 % of the validation verdicts stayed those of fp32, against 92 % on a VNNI CPU), "reduced"
    weights (-64..64, ONNX Runtime's ``reduce_range``) cannot (255 x 64 x 2 < 32767), so a graph made
    with them computes the same on every x86 CPU. "auto" takes full with VNNI and reduced without.
    """
    if requested not in WEIGHT_RANGES:
        raise ModelError(f"weight range {requested!r} is unknown; use one of {', '.join(WEIGHT_RANGES)}")
    vnni = int8_ready(flags)
    if requested == "full":
        return "full", "full range requested" + ("" if vnni else " (this CPU has no VNNI: its INT8 kernels saturate)")
    if requested == "reduced":
        return "reduced", "reduced range requested"
    if vnni:
        return "full", f"the CPU has {vnni}, which computes full-range weights exactly"
    return "reduced", (f"the CPU has none of {', '.join(INT8_FLAGS)}: its INT8 kernels saturate full-range weights, "
                       "so 7-bit weights, exact on any CPU")
