"""The Open Inference Protocol (KServe v2, Triton) over REST, for the same model.

Inputs: ``images`` FP32 ``[N, H, W, 3]`` in [0, 1] or UINT8 ``[N, H, W, 3]`` in [0, 255] (any
name is accepted; the datatype decides), or ``image_bytes`` BYTES ``[N]`` of encoded images.
Outputs: ``probabilities`` FP32 ``[N, classes]`` and ``label`` BYTES ``[N]``. Tensors go in the
JSON (BYTES as base64 text) or, with Triton's binary tensor data extension, as raw bytes after
it (:mod:`tirelib.serve.binary`), as ``tritonclient`` sends and asks for them by default.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Response

import tirelib
from tirelib.serve import binary
from tirelib.serve.bodies import read_infer
from tirelib.serve.deps import (
    ERRORS,
    Inference,
    InferenceDep,
    LatestModel,
    ModelVersion,
    ServedName,
    StateDep,
    inline_schema,
    json_response,
    not_ready,
)
from tirelib.serve.inputs import BYTES_INPUT, FLOAT_INPUT
from tirelib.serve.limits import excerpt
from tirelib.serve.model import ServedModel
from tirelib.serve.request_id import RESPONSE_HEADERS
from tirelib.serve.schemas import (
    ErrorBody,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)

_BINARY_SCHEMA = {"type": "string", "format": "binary"}
INFER_REQUEST: dict[str, Any] = {
    "parameters": [
        {
            "name": binary.HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "The length of the body's JSON part in bytes; the binary data of "
            "the inputs with parameters.binary_data_size follows it.",
        }
    ],
    "requestBody": {
        "required": True,
        "description": "JSON, or JSON followed by binary tensor data (with the "
        f"{binary.HEADER} header).",
        "content": {
            "application/json": {"schema": inline_schema(V2InferRequest)},
            binary.BINARY_MEDIA_TYPE: {"schema": _BINARY_SCHEMA},
        },
    },
}
"""The infer routes' request in OpenAPI (the routes read the body themselves)."""
INFER_ANSWER: dict[str, Any] = {
    "headers": {
        **RESPONSE_HEADERS,
        binary.HEADER: {
            "description": "With binary outputs: the length of the body's JSON part in bytes.",
            "schema": {"type": "integer"},
        },
    },
    "content": {binary.BINARY_MEDIA_TYPE: {"schema": _BINARY_SCHEMA}},
}
"""The infer routes' answer beyond the JSON one: JSON followed by the binary outputs."""
IDENTITY = ("", "identity")


def model_metadata(name: str, model: ServedModel) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [model.version],
        "platform": "pytorch_torchvision",
        "inputs": [
            {"name": FLOAT_INPUT, "datatype": "FP32", "shape": [-1, -1, -1, 3]},
            {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.classes)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"], responses=ERRORS)
MODEL = "/models/{model_name:segment}"
VERSION = f"{MODEL}/versions/{{version:segment}}"
INFER: dict[str, Any] = {
    "summary": "Inference",
    "response_model": V2InferResponse,
    "responses": {
        200: INFER_ANSWER,
        415: {"model": ErrorBody, "description": "The body is compressed."},
    },
    "openapi_extra": INFER_REQUEST,
}
ContentEncoding = Annotated[str, Header(include_in_schema=False)]
# Read as text and checked by tirelib.serve.binary, whose errors say what the length must be;
# documented in INFER_REQUEST as the integer it is.
HeaderLength = Annotated[str | None, Header(alias=binary.HEADER, include_in_schema=False)]


@router.get("", response_model=V2ServerMetadata, summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "tirelib", "version": tirelib.__version__, "extensions": []})


@router.get("/health/live", response_model=V2Live, summary="Liveness")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", response_model=V2Ready, summary="Readiness")
async def ready(state: StateDep) -> Response:
    if state.holder.current is None:
        raise not_ready(state)
    return json_response({"ready": True})


@router.get(MODEL, response_model=V2ModelMetadata, summary="Model metadata")
async def metadata(model: LatestModel, name: ServedName) -> Response:
    return json_response(model_metadata(name, model))


@router.get(VERSION, response_model=V2ModelMetadata, summary="Model metadata")
async def version_metadata(model: ModelVersion, name: ServedName) -> Response:
    return json_response(model_metadata(name, model))


@router.get(f"{MODEL}/ready", response_model=V2ModelReady, summary="Model readiness")
async def model_ready(model: LatestModel, name: ServedName) -> Response:
    return json_response({"name": name, "ready": True})


@router.get(f"{VERSION}/ready", response_model=V2ModelReady, summary="Model readiness")
async def version_ready(model: ModelVersion, name: ServedName) -> Response:
    return json_response({"name": name, "ready": True})


async def infer(
    model: ServedModel, inference: Inference, name: str, encoding: str, length: str | None
) -> Response:
    """Answer an infer body (JSON, or JSON then binary tensor data) with the outputs asked."""
    if encoding.strip().lower() not in IDENTITY:
        raise HTTPException(
            415, f"Content-Encoding {excerpt(encoding, 40)} is not supported; send the body as is"
        )
    body, probabilities = await inference.run(
        model, lambda raw: read_infer(raw, length, inference.limits)
    )
    count = len(probabilities)
    outputs = []
    for output, as_binary in body.outputs:
        if output == "probabilities":
            shape = [count, len(model.classes)]
            outputs.append(binary.output_tensor(output, "FP32", shape, probabilities, as_binary))
        else:
            labels = [model.classes[i] for i in probabilities.argmax(axis=1).tolist()]
            outputs.append(binary.output_tensor(output, "BYTES", [count], labels, as_binary))
    answer: dict[str, Any] = {"model_name": name, "model_version": model.version}
    if body.request.id is not None:
        answer["id"] = body.request.id
    content, headers, media_type = binary.encode_answer(answer, outputs)
    return Response(content, headers=headers, media_type=media_type)


@router.post(f"{MODEL}/infer", **INFER)
async def infer_latest(
    model: LatestModel,
    inference: InferenceDep,
    name: ServedName,
    content_encoding: ContentEncoding = "",
    length: HeaderLength = None,
) -> Response:
    return await infer(model, inference, name, content_encoding, length)


@router.post(f"{VERSION}/infer", **INFER)
async def infer_version(
    model: ModelVersion,
    inference: InferenceDep,
    name: ServedName,
    content_encoding: ContentEncoding = "",
    length: HeaderLength = None,
) -> Response:
    return await infer(model, inference, name, content_encoding, length)
