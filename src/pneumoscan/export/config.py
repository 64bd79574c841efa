"""How a model is exported to ONNX and checked (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

MAX_PROB_DIFF = 1e-4  # parity tolerance: max |p_torch - p_onnx| over the sample inputs
OPSETS = range(17, 22)  # opsets the torch.export-based exporter produces; others are refused, never altered


@dataclass(frozen=True)
class ExportConfig:
    """How the graph is exported and checked."""

    opset: int = 18  # ONNX opset; 18 is what the torch.export-based exporter targets by default
    samples: int = 8  # seeded sample inputs in the parity check (run as batches of 1 and of all)
    tolerance: float = MAX_PROB_DIFF  # max absolute probability difference accepted
    seed: int = 0  # seed of the sample inputs

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise ModelError(f"--opset {self.opset} cannot be produced by the exporter; use {OPSETS.start}-"
                             f"{OPSETS.stop - 1} (default 18)")
        if self.samples < 1 or not self.tolerance > 0:
            raise ModelError("the parity check needs at least one sample and a positive tolerance")
