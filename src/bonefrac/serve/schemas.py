"""What every endpoint answers, as pydantic models: FastAPI validates each answer against them and /openapi.json
(and so /docs) shows them.

The answers themselves are built as dicts where the facts live (Service.result in app.py, model_card in card.py);
these models only describe them. A field added there and not here is dropped from the answer, which the tests see.
The error answers are one shape, {"detail": reason}, with an example per status (ERROR_RESPONSES).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bonefrac import DISCLAIMER


class Described(BaseModel):
    # Nested figures copied from metrics.json may carry more keys than are named here (n, resamples): keep them.
    model_config = ConfigDict(extra="allow")


# --- one image ----------------------------------------------------------------------------------------------------


class ImageInfo(BaseModel):
    format: str = Field(description="the format read from the bytes (PNG, JPEG, DICOM, ...)", examples=["PNG"])
    width: int
    height: int
    truncated: bool | None = Field(description="a truncated file loaded anyway (allow_truncated)")


class HeatmapLayers(BaseModel):
    method: str = Field(examples=["gradcam"])
    target: str = Field(description="the class explained: the decision")
    flat: bool = Field(description="true when the map points nowhere in particular")
    heatmap_png: str = Field(description="base64 RGBA PNG of the map, transparent where it is low, to lay over "
                                         "the image")
    overlay_png: str = Field(description="base64 RGB PNG of the map drawn on the image")


class PredictiveValues(BaseModel):
    prevalence: float
    operating_point: str
    sensitivity: float = Field(description="on validation, at this operating point")
    specificity: float = Field(description="on validation, at this operating point")
    ppv: float | None = Field(description="the chance that an image called fractured is one, at this prevalence")
    npv: float | None = Field(description="the chance that an image called not fractured is not, at this prevalence")


class Box(BaseModel):
    """A localiser's box in the uploaded image's pixels (image.width x image.height), with its score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = Field(description="heat probability of the box's centre cell")
    level: Literal["fracture", "doubt", "below"] | None = Field(
        None, description="at or above the run's val-chosen fracture or doubt box threshold, or below both; null when "
                          "the run has no box thresholds (the page then draws the best three)")


class Prediction(BaseModel):
    """One image's answer (POST /v1/predict, and each readable file of POST /v1/predict/batch)."""

    file: str = Field(description="the file name the client gave")
    status: Literal["ok"]
    accepted: bool = Field(description="false when the image does not look like a radiograph (not assessed)")
    ood_score: float | None = Field(description=">= 1 means rejected")
    ood_reason: str = Field(description="why it was rejected; empty when accepted")
    probabilities: dict[str, float] = Field(description="calibrated probability per class")
    positive_label: str | None
    probability: float | None = Field(description="p(positive label); null for N > 2 classes")
    prediction: str
    decision: str = Field(description="the decision in words")
    threshold: float | None
    operating_point: str
    threshold_meaning: str
    level: Literal["fracture", "doubt", "no fracture"] | None = Field(
        description="the three-level answer from two val-chosen thresholds; null without the rule")
    level_words: str | None
    predictive_values: PredictiveValues | None = Field(description="PPV and NPV when a prevalence was asked for")
    image: ImageInfo
    backend: str = Field(examples=["torch", "onnx"])
    disclaimer: str = Field(examples=[DISCLAIMER])
    image_png: str | None = Field(None, description="base64 8-bit gray PNG of the image (image=true or "
                                                    "heatmap=true); absent otherwise")
    heatmap: HeatmapLayers | None = Field(None, description="the Grad-CAM layers (heatmap=true); absent otherwise")
    boxes: list[Box] | None = Field(None, description="a localiser's boxes, best first; absent for a classifier")


class FileError(BaseModel):
    """A file of a batch that could not be read, in its place among the results."""

    file: str
    status: Literal["error"]
    http_status: int = Field(description="what /v1/predict would have answered for it: 415 or 422",
                             examples=[415])
    error: str = Field(examples=["not an image (text file)"])


class Batch(BaseModel):
    results: list[Prediction | FileError] = Field(description="one entry per file, in the order sent")
    n_files: int
    n_errors: int
    disclaimer: str = Field(examples=[DISCLAIMER])


# --- the model card -----------------------------------------------------------------------------------------------


class Interval(Described):
    point: float | None
    low: float | None
    high: float | None


class Metric(Interval):
    name: str = Field(examples=["ROC AUC"])


class Evaluation(BaseModel):
    n_files: int
    n_groups: int
    ci: str | None = Field(description="how the 95 % intervals were made")
    leaky: bool
    synthetic_data: bool
    metrics: dict[str, Metric]


class OperatingPoint(BaseModel):
    name: str = Field(examples=["sensitivity>=0.95"])
    threshold: float
    in_use: bool = Field(description="the run's own operating point (the default of every request)")
    val: dict[str, float | None] = Field(description="sensitivity and specificity on validation")
    test: dict[str, Interval] | None = Field(description="sensitivity and specificity on test with 95 % CIs, "
                                                         "null when test was not evaluated at this threshold")


class LevelBound(BaseModel):
    operating_point: str
    threshold: float


class Levels(Described):
    low: LevelBound
    high: LevelBound
    doubt_band: bool


class DataSummary(BaseModel):
    root: str
    counts: dict[str, dict[str, int]] = Field(description="files per split and class")
    synthetic: bool
    leaky: bool


class Member(BaseModel):
    """One model of an ensemble (run.py's ensemble.json)."""

    name: str
    model: str
    image_size: int
    temperature: float


class BoxLevel(BaseModel):
    threshold: float = Field(description="a box at or above this score has the level")
    fp_per_image: float = Field(description="false-positive boxes per image at this threshold, on validation")
    sensitivity: float = Field(description="share of the radiologists' boxes found at this threshold, on validation")
    max_fp_per_image: float = Field(description="the budget the threshold was chosen for")


class ModelCard(BaseModel):
    """GET /v1/model: what the run is, how well it did, on what data, what its thresholds mean."""

    name: str
    model: str = Field(description='the registry model, or "ensemble" (then `members` lists its models)')
    members: list[Member] = Field(description="an ensemble's models, each fed its own input size; [] otherwise")
    image_size: int
    labels: list[str]
    positive_label: str | None
    backend: str
    calibrated: bool
    temperature: float | None
    threshold: float | None
    operating_point: str
    threshold_meaning: str
    operating_points: list[OperatingPoint]
    levels: Levels | None
    levels_meaning: str | None
    metrics: dict[str, Evaluation] = Field(description="per evaluated split")
    data: DataSummary
    csv_columns: list[str] = Field(description="the columns of `bonefrac predict --out FILE.csv`, in order; the "
                                               "page's CSV download writes them")
    box_fields: list[str] | None = Field(description="a localiser's box keys, in the order of the CSV's boxes cell; "
                                                     "null for a classifier")
    box_levels: dict[str, BoxLevel] | None = Field(description="a localiser's fracture and doubt box thresholds, "
                                                               "chosen on validation; null when it has none")
    box_levels_meaning: str | None
    intended_use: str
    bonefrac_version: str
    disclaimer: str


# --- health -------------------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Limits(BaseModel):
    max_upload_mb: float
    max_files: int
    max_body_mb: float
    max_fields: int
    max_field_kb: float
    max_request_mpx: float
    max_requests: int
    request_timeout_s: float


class Ready(BaseModel):
    status: Literal["ready"]
    model: str = Field(description="the run's name")
    backend: str
    limits: Limits


# --- errors -------------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """Every refusal: the reason, in one line a person can read."""

    detail: str


def _error(description: str, *examples: str) -> dict:
    named = {f"example {i + 1}": {"value": {"detail": text}} for i, text in enumerate(examples)}
    return {"model": ErrorDetail, "description": description,
            "content": {"application/json": {"examples": named}}}


ERROR_RESPONSES = {
    400: _error("a malformed multipart body", "malformed multipart body: it ends before its closing boundary"),
    401: _error("no token or a wrong one, when the server has a token (Authorization: Bearer; WWW-Authenticate)",
                "this server needs a token: send Authorization: Bearer <token>", "the token is not valid"),
    413: _error("a file, the body, a form field or the images' pixels over their limit, or more files or form "
                "fields than allowed",
                "file 'big.png' is over the upload limit of 50 MB", "more than 16 files in one request",
                "request body is over the limit of 200 MB (all parts together)",
                "the images in this request have 400.0 megapixels together, over the limit of 200 a request; "
                "send fewer or smaller images"),
    415: _error("a body that is not multipart/form-data, or a file that is no image format",
                "send the image as multipart/form-data (a part named file), not application/json",
                "not an image (text file)"),
    422: _error("an image that cannot be read, no file, or a decision parameter the run cannot use",
                "no file in the request: send multipart/form-data with the image in a part named file",
                "operating point 'spec99': this run's calibration.json has default, youden, sensitivity>=0.9, "
                "sensitivity>=0.95, specificity>=0.95",
                "threshold 1.5: a probability, in [0, 1]"),
    503: _error("the request took longer than the server's time limit (with Retry-After)",
                "request took longer than 60 s; try again later"),
}


class NotReady(BaseModel):
    status: Literal["loading"]
    detail: str = Field(examples=["the model is warming up"])


NOT_READY = {503: {"model": NotReady, "description": "the model is still loading or warming up"}}
