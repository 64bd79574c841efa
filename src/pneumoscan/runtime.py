"""ONNX Runtime sessions and the cores this process may use: the one session builder, torch-free.

Every ONNX Runtime session of pneumoscan (feature extraction, the served model, parity checks,
occlusion graphs, graph rewrites) is made by :func:`ort_session`, so that optimisation level,
thread counts and spinning are chosen in one place and a broken graph gives one kind of error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

LEVELS = ("disable", "basic", "extended", "all")  # ONNX Runtime graph optimisation levels


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def ort_session(model: Union[str, os.PathLike, bytes], *, threads: int | None = None, spinning: bool | None = None,
                level: str = "all", optimized_path: str | os.PathLike | None = None, quiet: bool = False):
    """An ONNX Runtime CPU session for a model file or its bytes.

    ``threads``: intra-op threads (None = ONNX Runtime's default, one per core); ``spinning``:
    whether idle threads spin (None = the default; off when other work shares the cores);
    ``optimized_path``: where ONNX Runtime saves the optimised graph; ``quiet``: errors only.
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
    src = model if isinstance(model, (bytes, bytearray)) else str(Path(model))
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
