"""Request and response bodies of the model server (pydantic), and how a JSON body is read.

Bodies are read whatever their ``Content-Type`` says, as TensorFlow Serving does (``curl -d``
sends ``application/x-www-form-urlencoded``). Image payloads are typed loosely for validation
(an image is checked, with a message naming it, when it is preprocessed) and described fully in
the OpenAPI schema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from fastapi import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tirelib.errors import DataError
from tirelib.serve.limits import check_json_depth, clip, shorten

# --------------------------------------------------------------------------- JSON schema pieces

_PIXEL = {"type": "number", "minimum": 0, "maximum": 1}
HWC_IMAGE_SCHEMA: dict[str, Any] = {
    "title": "HWC image",
    "description": "height x width x 3 nested lists of floats in [0, 1]; any size",
    "type": "array",
    "items": {"type": "array", "items": {"type": "array", "items": _PIXEL}},
}
B64_IMAGE_SCHEMA: dict[str, Any] = {
    "title": "Encoded image",
    "description": "JPEG/PNG/... bytes as base64 text",
    "type": "object",
    "properties": {"b64": {"type": "string", "contentEncoding": "base64"}},
    "required": ["b64"],
    "additionalProperties": False,
}
IMAGE_SCHEMA: dict[str, Any] = {"anyOf": [HWC_IMAGE_SCHEMA, B64_IMAGE_SCHEMA]}
NAMED_IMAGE_SCHEMA: dict[str, Any] = {
    "title": "Named input",
    "type": "object",
    "properties": {"images": IMAGE_SCHEMA, "image_bytes": B64_IMAGE_SCHEMA},
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every error: a status of 4xx (or 503 while no model is loaded) and this body."""

    error: str = Field(examples=["instances[0]: image values must lie in [0, 1]"])


# --------------------------------------------------------------------------- TF Serving: predict


class PredictRequest(_Body):
    """``{"instances": [...]}`` (row form) or ``{"inputs": ...}`` (columnar form)."""

    signature_name: str | None = Field(
        default=None, description="Only 'serving_default' (or empty) exists."
    )
    instances: list[Any] | None = Field(
        default=None,
        description="One image per item: HWC floats in [0, 1], {'b64': ...}, or {'images': ...}",
        json_schema_extra={
            "items": {"anyOf": [*IMAGE_SCHEMA["anyOf"], NAMED_IMAGE_SCHEMA]},
            "minItems": 1,
        },
    )
    inputs: Any = Field(
        default=None,
        description="A list of images, or {'images': [image, ...]}",
        json_schema_extra={
            "anyOf": [{"type": "array", "items": IMAGE_SCHEMA}, NAMED_IMAGE_SCHEMA],
        },
    )

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        given = {"instances", "inputs"} & self.model_fields_set
        if len(given) != 1 or (self.instances is None and self.inputs is None):
            raise ValueError(
                'give exactly one of "instances" (row form) or "inputs" (columnar form)'
            )
        return self


class PredictResponse(BaseModel):
    """Row requests get ``predictions``, columnar ones ``outputs``: one probability row per image,
    in class order. With ``?labels=true``, ``classes`` and each image's ``labels`` are added."""

    predictions: list[list[float]] | None = None
    outputs: list[list[float]] | None = None
    classes: list[str] | None = None
    labels: list[str] | None = None


# --------------------------------------------------------------------------- TF Serving: classify


class ClassifyRequest(_Body):
    """``{"examples": [{"image": <image>}, ...], "context": {...}}``."""

    signature_name: str | None = None
    context: dict[str, Any] | None = Field(
        default=None, description="Features shared by every example."
    )
    examples: list[dict[str, Any]] = Field(
        description="One image feature per example: 'image', 'images' or 'image_bytes'",
        json_schema_extra={
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {name: IMAGE_SCHEMA for name in ("image", "images", "image_bytes")},
            },
        },
    )


class ClassifyResponse(BaseModel):
    """``{"results": [[["good", 0.1], ["defective", 0.9]], ...]}``: (class, score) per class."""

    results: list[list[tuple[str, float]]]


# --------------------------------------------------------------------------- TF Serving: status


class StatusDetail(BaseModel):
    error_code: str = "OK"
    error_message: str = ""


class ModelVersionStatus(BaseModel):
    version: str
    state: Literal["LOADING", "AVAILABLE", "UNAVAILABLE"]
    status: StatusDetail


class ModelStatusResponse(BaseModel):
    model_version_status: list[ModelVersionStatus]


class ModelSpec(BaseModel):
    name: str
    signature_name: str = ""
    version: str


class MetadataResponse(BaseModel):
    """TF Serving's shape; ``metadata.tire`` adds classes, input size and normalisation."""

    model_spec: ModelSpec
    metadata: dict[str, Any]


class UploadResult(BaseModel):
    filename: str
    label: str
    probabilities: dict[str, float]


class UploadResponse(BaseModel):
    model_version: str
    results: list[UploadResult]


class Health(BaseModel):
    status: str
    model_version: str | None = None


# --------------------------------------------------------------------------- feedback

REQUEST_ID_CHARS = 128
REQUEST_ID_PATTERN = rf"^[ -~]{{1,{REQUEST_ID_CHARS}}}$"
MAX_FEEDBACK_LABELS = 100_000


class FeedbackRequest(_Body):
    """The true labels of an answered request, one per instance in the order sent."""

    request_id: str = Field(
        description="The X-Request-ID the prediction was answered with.",
        max_length=REQUEST_ID_CHARS,
        json_schema_extra={"pattern": REQUEST_ID_PATTERN},
        examples=["3f2a9c0d5e6b4a1f8c7d2e1b0a9f8e7d"],
    )
    labels: list[str | None] = Field(
        min_length=1,
        max_length=MAX_FEEDBACK_LABELS,
        description="One class name per instance of that request, in order; null for none.",
        examples=[["good", "defective", None]],
    )

    @field_validator("request_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value or not all(" " <= char <= "~" for char in value):
            raise ValueError(
                f"a request id is 1 to {REQUEST_ID_CHARS} printable ASCII characters "
                "(space to '~'), as the X-Request-ID header of the answer"
            )
        return value


class FeedbackResponse(BaseModel):
    """How many instances got a label, how many of those the model got right, and which
    version answered the request."""

    request_id: str
    labelled: int
    correct: int
    model_version: str


# ------------------------------------------------------------------- Open Inference Protocol


class V2Tensor(_Body):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["FP32", "FP16", "FP64", "BYTES", "UINT8"] = Field(
        description="FP32 for [N, H, W, 3] images in [0, 1], UINT8 for [N, H, W, 3] pixels in "
        "[0, 255], BYTES for encoded images (base64 text in JSON, raw bytes as binary data)"
    )
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="binary_data_size: the length of the tensor's bytes after the JSON part "
        "(binary tensor data extension), instead of data",
    )
    data: list[Any] | None = Field(
        default=None, description="Row-major values, flat or nested; absent for binary data"
    )


class V2RequestedOutput(_Body):
    name: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data: true answers the output as binary data"
    )


class V2InferRequest(_Body):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_output: true answers every output as binary data"
    )
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size: the length of the output's binary data"
    )
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


# --------------------------------------------------------------------------- JSON in and out


def json_response(content: Any, status_code: int = 200) -> Response:
    """JSON encoded by msgspec (fast for long float lists)."""
    return Response(msgspec.json.encode(content), status_code, media_type="application/json")


BodyT = TypeVar("BodyT", bound=BaseModel)
_decoder = msgspec.json.Decoder()


def decode_json(raw: bytes) -> Any:
    """Parse JSON fast (msgspec); fall back to the standard parser, which also reads ``NaN``,
    so that a NaN pixel is reported as such rather than as malformed JSON.

    Every failure is a :class:`DataError` naming the problem: nesting deeper than
    :data:`~tirelib.serve.limits.MAX_JSON_DEPTH` (refused before parsing), bytes that are not
    UTF-8, unpaired surrogate escapes, malformed JSON.
    """
    if not raw.strip():
        raise DataError("the body is empty; send a JSON object")
    check_json_depth(raw)
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    try:
        text = raw.decode("utf-8")  # JSON text is UTF-8 (RFC 8259), whatever json.loads guesses
    except UnicodeDecodeError as error:
        raise DataError(
            f"the body is not valid UTF-8: byte 0x{raw[error.start]:02x} at position "
            f"{error.start:,} ({error.reason}); send JSON as UTF-8 text"
        ) from error
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise DataError(f"malformed JSON: {shorten(str(error), 200)}") from error
    try:  # the standard parser keeps an unpaired "\\ud800" that no answer could carry
        msgspec.json.encode(value)
    except UnicodeEncodeError as error:
        raise DataError(
            f"a string holds an unpaired UTF-16 surrogate escape "
            f"({error.object[error.start]!r}); JSON strings must be valid Unicode"
        ) from error
    return value


def parse_body(raw: bytes, model: type[BodyT]) -> BodyT:
    """``raw`` as ``model``; a :class:`DataError` saying what is wrong otherwise."""
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise DataError(f"the body must be a JSON object, got {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False, include_input=False):
            message = shorten(str(item["msg"]).removeprefix("Value error, "), 300)
            where = ".".join(clip(str(part), 40) for part in item["loc"])
            problems.append(f"{where}: {message}" if where else message)
        raise DataError("; ".join(problems[:5])) from error
