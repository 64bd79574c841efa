"""Response models of the API: what every 200 holds (errors: :class:`pneumoscan.web.problems.Problem`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Health(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """The model is loaded and warmed."""

    status: Literal["ready"] = "ready"
    model: str = Field(description="model id")


class ImageFacts(BaseModel):
    """What was decoded."""

    format: str = Field(description="jpeg, png or dicom (from the content, not the name)")
    mode: str = Field(description="source mode: Pillow mode, or the DICOM photometric interpretation")
    width: int = Field(description="original width in pixels")
    height: int = Field(description="original height in pixels")


class Prediction(BaseModel):
    """One X-ray's result."""

    label: str = Field(description="most likely class: normal, bacterial or viral")
    probabilities: dict[str, float] = Field(description="class probabilities, in label order; they sum to 1")
    pneumonia: bool = Field(description="pneumonia_probability >= threshold (the model's decision rule)")
    pneumonia_probability: float = Field(description="P(bacterial) + P(viral)")
    threshold: float = Field(description="the model's operating point on pneumonia_probability")
    model: str = Field(description="model id")
    warnings: list[str] = Field(description="why the result may be unreliable (out of scope, truncated file, ...)")
    image: ImageFacts
    preview: str | None = Field(None, description="with ?preview=true: the decoded image as a JPEG data URL")
    compute_ms: float = Field(description="decode + inference time on the worker, in ms")
    elapsed_ms: float = Field(description="time in the server (queue wait included), in ms")


class Info(BaseModel):
    """The service: model, decision threshold, labels, limits, explanations."""

    intended_use: str
    ready: bool = Field(description="model loaded and warmed")
    model: str | None = Field(description="model id (null while loading)")
    backend: str = Field(description="onnx or torch")
    threshold: float | None = Field(description="operating point on P(pneumonia) (null while loading)")
    labels: list[str]
    formats: list[str] = Field(description="accepted image formats")
    max_upload_bytes: int
    max_pixels: int = Field(description="largest decoded image, in pixels (all frames of a DICOM)")
    explain: bool = Field(description="whether /api/explain answers now")
    explain_status: Literal["loading", "preparing", "ready", "unavailable"]
    explain_error: str | None = Field(None, description="why explanations are unavailable")
    card: str | None = Field(None, description="URL of the model card (Markdown)")
