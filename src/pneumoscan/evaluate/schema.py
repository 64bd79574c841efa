"""The shape of a ``metrics.json`` (what ``pneumoscan evaluate`` writes), as a pydantic model.

A stored evaluation must be one of this model's metrics files: :func:`check_metrics` validates a
dictionary before anything is written and turns pydantic's report into one line that names the
file, the field and the fix.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import PneumoscanError

FIX = "pass the metrics.json written by 'pneumoscan evaluate'"


class CardError(PneumoscanError, ValueError):
    """An evaluation to add is missing, not JSON, or not a pneumoscan metrics.json."""


def _rate_ok(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and (not math.isfinite(v) or 0.0 <= v <= 1.0))


class Task(BaseModel):
    """The figures of one binary task; rates in [0, 1] or undefined (null)."""

    model_config = ConfigDict(extra="allow")

    accuracy: Optional[float] = None
    sensitivity: Optional[float] = None
    specificity: Optional[float] = None
    f1: Optional[float] = None
    auc: Optional[float] = None
    ci95: dict[str, list[Optional[float]]] = {}

    @field_validator("accuracy", "sensitivity", "specificity", "f1", "auc")
    @classmethod
    def _rate(cls, v):
        if not _rate_ok(v):
            raise ValueError(f"{v!r} is not a rate in [0, 1]")
        return v

    @field_validator("ci95")
    @classmethod
    def _intervals(cls, v):
        for k, pair in v.items():
            if len(pair) != 2 or not all(map(_rate_ok, pair)):
                raise ValueError(f"interval {k!r} must be a [low, high] pair in [0, 1]")
        return v


class Metrics(BaseModel):
    """A metrics.json: counts, the confusion matrix and the four tasks."""

    model_config = ConfigDict(extra="allow")

    n: int
    labels: Optional[list[str]] = None
    confusion_matrix: list[list[int]]
    normal_vs_pneumonia: Task
    bacterial_vs_rest: Optional[Task] = None
    viral_vs_rest: Optional[Task] = None
    bacterial_vs_viral: Optional[Task] = None
    model: Optional[dict] = None

    @field_validator("n")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, bool) or v < 1:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("confusion_matrix")
    @classmethod
    def _counts(cls, v):
        if any(c < 0 for row in v for c in row):
            raise ValueError("counts must be non-negative")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        nvp = self.normal_vs_pneumonia
        missing = [k for k in ("accuracy", "sensitivity", "specificity") if getattr(nvp, k) is None
                   and k not in nvp.model_fields_set]
        if missing:
            raise ValueError(f"normal_vs_pneumonia needs {', '.join(missing)}")
        if sum(map(sum, self.confusion_matrix)) != self.n:
            raise ValueError(f"the confusion matrix counts {sum(map(sum, self.confusion_matrix))} images "
                             f"but 'n' is {self.n}")
        return self


def check_metrics(m: Any, labels: list[str], source: str, model_id: str | None = None) -> dict:
    """Check that ``m`` is a metrics.json of ``pneumoscan evaluate`` for this model; returns it."""
    if not isinstance(m, dict):
        raise CardError(f"{source}: expected a JSON object, got {type(m).__name__}; {FIX}")
    try:
        parsed = Metrics.model_validate(m, strict=False)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "metrics"
        raise CardError(f"{source}: {where}: {err['msg']}; {FIX}") from None
    k = len(labels)
    if parsed.labels is not None and list(parsed.labels) != list(labels):
        raise CardError(f"{source}: labels {parsed.labels} differ from the model's {labels}; "
                        "evaluate this model to get matching metrics")
    if len(parsed.confusion_matrix) != k or any(len(r) != k for r in parsed.confusion_matrix):
        raise CardError(f"{source}: 'confusion_matrix' must be {k} rows of {k} non-negative integers")
    mid = (parsed.model or {}).get("id")
    if model_id and mid and mid != model_id:
        raise CardError(f"{source} was computed with model {mid}, not with this model ({model_id}); "
                        "evaluate this model directory and add that metrics.json")
    return m
