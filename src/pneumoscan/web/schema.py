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
    """One upload's result: a diagnosis, or (``in_scope`` false) the reasons it gets none. Both are a 200."""

    in_scope: bool = Field(description="false: not a pediatric frontal chest X-ray the model can read; no diagnosis")
    verdict: str = Field(description="the label; 'uncertain: refer' when the prediction set holds normal and a "
                                     "pneumonia class; 'not a pediatric frontal chest X-ray' when out of scope")
    label: str | None = Field(description="normal, bacterial or viral (the model's decision rule); null when out of scope")
    probabilities: dict[str, float] | None = Field(
        description="calibrated class probabilities (the model's temperature), in label order; null when out of scope")
    pneumonia: bool | None = Field(description="pneumonia_probability >= threshold; null when out of scope")
    pneumonia_probability: float | None = Field(description="P(bacterial) + P(viral); null when out of scope")
    threshold: float = Field(description="the model's operating point on pneumonia_probability")
    prediction_set: list[str] | None = Field(
        description="conformal prediction set: holds the true class for 1 - alpha of images like the validation split "
                    "(only for those); null when out of scope or the model has no conformal calibration")
    ood_score: float | None = Field(description="out-of-distribution score of the pooled features (higher: less like "
                                                "the training X-rays); null when the model has no learned gate")
    reasons: list[str] = Field(description="why the input is out of scope (empty when in scope)")
    model: str = Field(description="model id")
    warnings: list[str] = Field(description="what may make the result less reliable (e.g. a DICOM window replaced)")
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
    precision: str | None = Field(None, description="fp32 or int8: the graph that runs (null while loading)")
    precision_reason: str | None = Field(None, description="why that precision (INT8 gate, CPU instruction set)")
    int8_guard: dict[str, int] | None = Field(None, description="with INT8 and its guard: images INT8 answered since "
                                                               "the start, warm-up included (images) and of them run again in "
                                                               "fp32 (fp32) because they lay near a decision boundary")
    max_batch: int | None = Field(None, description="predictions run together in one batch at most")
    threshold: float | None = Field(description="operating point on P(pneumonia) (null while loading)")
    temperature: float | None = Field(None, description="temperature of the calibrated probabilities (1: none)")
    class_bias: list[float] | None = Field(None, description="per-class bias added after the temperature, in label "
                                                             "order (bias-corrected temperature scaling; null: none)")
    conformal_alpha: float | None = Field(None, description="error rate of the prediction sets (null: no sets)")
    ood_threshold: float | None = Field(None, description="out-of-distribution score above which an input is refused "
                                                          "(null: image checks only)")
    labels: list[str]
    formats: list[str] = Field(description="accepted image formats")
    max_upload_bytes: int
    max_pixels: int = Field(description="largest decoded image, in pixels (all frames of a DICOM)")
    explain: bool = Field(description="whether /api/explain answers now")
    explain_status: Literal["loading", "preparing", "ready", "unavailable"]
    explain_error: str | None = Field(None, description="why explanations are unavailable")
    card: str | None = Field(None, description="URL of the model card (Markdown)")
