"""The JSON bodies of the classifier's endpoints (/predict, /health and their errors), as the OpenAPI schema at /docs
shows them; the review API's are in serve.review_api."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    path: str = Field(description="the uploaded file's name, echoed back (never used as a path)")
    label: str
    probabilities: dict[str, float] = Field(description="calibrated probability per class")
    confidence: float
    review: bool = Field(description="confidence below the model's review threshold")
    ood: bool | None = Field(
        description="the image looks unlike the cells the model was trained on (OOD score above the model's threshold) "
        "and is not counted; null when the model has no OOD score"
    )
    ood_score: float | None = Field(
        description="the OOD score (higher: less like the training cells); null without an OOD score"
    )


class CellPrediction(Prediction):
    input: str | None = Field(None, description="'cell': the image was read as one cell crop")
    input_reason: str | None = Field(None, description="why it was read as a cell (auto decides per image)")


class FieldCell(BaseModel):
    kind: str = Field(description="rbc, wbc or platelet")
    box: list[float] = Field(description="x0, y0, x1, y1 in the photograph's pixels")
    score: float = Field(description="the detector's score for this box")
    path: str | None = Field(None, description="white cells: '<photograph>#wbc<k>'")
    label: str | None = Field(None, description="white cells: the classifier's class")
    probabilities: dict[str, float] | None = None
    confidence: float | None = None
    review: bool | None = None
    ood: bool | None = None
    ood_score: float | None = None
    crop_side: float | None = Field(None, description="side in pixels of the square the classifier saw")


class FieldProblem(BaseModel):
    code: str = Field(description="dark, overexposed, panorama, magnification, few_red_cells or no_cells")
    message: str = Field(description="one sentence: what was seen, with the measured number, and what to do")
    severe: bool = Field(description="the counts mean nothing and are withheld")
    value: float = Field(
        description="the number measured (median brightness, share of white, aspect, red-cell side...)"
    )


class FieldResult(BaseModel):
    path: str
    input: str = Field(description="'field': read as a smear photograph")
    input_reason: str
    size: list[int] = Field(description="width, height in pixels")
    cells: list[FieldCell]
    counts: dict[str, int] | None = Field(description="cells found per kind: rbc, wbc, platelet; null when withheld")
    wbc_classes: dict[str, int] | None = Field(
        description="white cells per class (OOD ones left out); null when withheld"
    )
    scale: str = Field(description="what set the crop size: the red cells' median size, or the white cells'")
    note: str = Field(
        description="'no cells found[: why]', or the severe problem that withheld the counts; '' otherwise"
    )
    problems: list[FieldProblem] = Field(default_factory=list, description="what the checks found (docs/fields.md)")
    withheld: bool = Field(False, description="the counts were withheld: a severe problem makes them meaningless")


class FieldSummary(BaseModel):
    photos: int = Field(description="photographs counted (those withheld left out)")
    withheld: int = Field(0, description="photographs whose counts were withheld")
    totals: dict[str, int]
    per_photo: dict[str, float]
    wbc_counted: int
    wbc_ood: int
    wbc_review: int
    differential: dict[str, int]
    differential_percent: dict[str, float]
    flags: list[str]


class UnreadableUpload(BaseModel):
    path: str
    reason: str


class PredictResult(BaseModel):
    """The result object of Predictor.predict_images (docs/inference.md)."""

    predictions: list[CellPrediction]
    counted: int = Field(description="images the counts rest on: all classified images minus those flagged OOD")
    ood_count: int = Field(description="images flagged OOD and therefore not counted")
    ood_check: bool = Field(description="whether the model has an OOD score")
    counts: dict[str, int] = Field(description="cells per class, OOD images left out")
    percent: dict[str, float]
    wbc_percent: dict[str, float]
    flags: list[str]
    verdict: dict | None = Field(
        None,
        description="when most images look unlike every lab the model was trained on: "
        "kind, images, ood_count, ood_fraction, counted, advice, message (also the first "
        "flag); null otherwise",
    )
    unreadable: list[UnreadableUpload]
    fields: list[FieldResult] = Field(
        default_factory=list, description="smear photographs: every cell found, with its box"
    )
    field_summary: FieldSummary | None = Field(None, description="totals and WBC differential over all photographs")


class Health(BaseModel):
    status: str
    model: str
    backend: str
    classes: list[str]
    input_size: int
    temperature: float
    review_threshold: float
    ood_check: bool = Field(
        description="whether the model has an OOD score: images unlike its training cells are flagged and not counted"
    )
    ood_threshold: float | None = Field(
        description="OOD score above which an image is flagged; null without an OOD score"
    )
    explain: bool
    max_upload_bytes: int
    max_files: int
    max_pixels: int
    max_request_pixels: int
    version: str
    review: bool = Field(False, description="the review workstation is on: samples kept under /api (serve.review_api)")


class ErrorMessage(BaseModel):
    detail: str = Field(description="one line saying what is wrong, naming the file where there is one")
