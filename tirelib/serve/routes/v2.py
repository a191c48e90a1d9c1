"""The Open Inference Protocol (KServe v2, Triton) over REST, for the same model.

Inputs: ``images`` FP32 ``[N, H, W, 3]`` in [0, 1] or UINT8 ``[N, H, W, 3]`` in [0, 255] (any
name is accepted; the datatype decides), or ``image_bytes`` BYTES ``[N]`` of encoded images.
Outputs: ``probabilities`` FP32 ``[N, classes]`` and ``label`` BYTES ``[N]``. Tensors go in the
JSON (BYTES as base64 text) or, with Triton's binary tensor data extension, as raw bytes after
it (:mod:`tirelib.serve.binary`), as ``tritonclient`` sends and asks for them by default.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

import tirelib
from tirelib.errors import DataError
from tirelib.serve import binary
from tirelib.serve.deps import (
    ERRORS,
    ServeState,
    StateDep,
    json_response,
    not_ready,
    predict_images,
    prepare_images,
    select_model,
)
from tirelib.serve.inputs import BYTES_INPUT, FLOAT_INPUT, Located
from tirelib.serve.limits import excerpt
from tirelib.serve.model import ServedModel
from tirelib.serve.request_id import RESPONSE_HEADERS, RequestIdDep
from tirelib.serve.schemas import (
    ErrorBody,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    parse_body,
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
            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
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
OUTPUTS = ("probabilities", "label")
IDENTITY = ("", "identity")


async def read_infer_body(request: Request) -> tuple[V2InferRequest, list[memoryview | None]]:
    """The body's JSON part as a :class:`V2InferRequest`, and each input's binary data (None
    for an input whose data is in the JSON), off the event loop."""
    encoding = request.headers.get("content-encoding", "")
    if encoding.strip().lower() not in IDENTITY:
        raise HTTPException(
            415, f"Content-Encoding {excerpt(encoding, 40)} is not supported; send the body as is"
        )
    raw = await request.body()
    length = request.headers.get(binary.HEADER)

    def parse() -> tuple[V2InferRequest, list[memoryview | None]]:
        split = binary.split_body(raw, length)
        try:
            body = parse_body(split.json, V2InferRequest)
        except DataError as error:
            if length is None and f'"{binary.SIZE}"'.encode() in raw:
                raise DataError(
                    f"{error}; the body names binary tensor data ({binary.SIZE}) but has no "
                    f"{binary.HEADER} header saying where its JSON part ends"
                ) from error
            raise
        return body, binary.input_chunks(body.inputs, split.binary)

    return await run_in_threadpool(parse)


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


def build_router(name: str) -> APIRouter:
    """The ``/v2`` routes for the model called ``name`` in URLs."""
    base = f"/v2/models/{name}"
    router = APIRouter(tags=["Open Inference Protocol (v2)"], responses=ERRORS)

    @router.get("/v2", response_model=V2ServerMetadata, summary="Server metadata")
    async def server_metadata() -> Response:
        return json_response({"name": "tirelib", "version": tirelib.__version__, "extensions": []})

    @router.get("/v2/health/live", response_model=V2Live, summary="Liveness")
    async def live() -> Response:
        return json_response({"live": True})

    @router.get("/v2/health/ready", response_model=V2Ready, summary="Readiness")
    async def ready(state: StateDep) -> Response:
        if state.holder.current is None:
            raise not_ready(state)
        return json_response({"ready": True})

    @router.get(base, response_model=V2ModelMetadata, summary="Model metadata")
    async def metadata(state: StateDep) -> Response:
        return json_response(model_metadata(name, select_model(state)))

    @router.get(
        f"{base}/versions/{{version:segment}}",
        response_model=V2ModelMetadata,
        summary="Model metadata",
    )
    async def version_metadata(state: StateDep, version: str) -> Response:
        return json_response(model_metadata(name, select_model(state, version=version)))

    @router.get(f"{base}/ready", response_model=V2ModelReady, summary="Model readiness")
    async def model_ready(state: StateDep) -> Response:
        return json_response({"name": name, "ready": select_model(state) is not None})

    @router.get(
        f"{base}/versions/{{version:segment}}/ready",
        response_model=V2ModelReady,
        summary="Model readiness",
    )
    async def version_ready(state: StateDep, version: str) -> Response:
        select_model(state, version=version)
        return json_response({"name": name, "ready": True})

    async def run(
        request: Request, state: ServeState, model: ServedModel, request_id: str
    ) -> Response:
        with state.batcher.arriving():
            body, chunks = await read_infer_body(request)
            wanted = binary.requested_outputs(body, OUTPUTS)
            tensor, chunk = body.inputs[0], chunks[0]

            def find() -> list[Located]:
                return binary.input_images(tensor, chunk, state.limits)

            prepared = await prepare_images(state, model, find)
        probabilities = await predict_images(state, model, prepared, request_id)
        count = len(probabilities)
        outputs = []
        for output, as_binary in wanted:
            if output == "probabilities":
                shape = [count, len(model.classes)]
                outputs.append(
                    binary.output_tensor(output, "FP32", shape, probabilities, as_binary)
                )
            else:
                labels = [model.classes[i] for i in probabilities.argmax(axis=1).tolist()]
                outputs.append(binary.output_tensor(output, "BYTES", [count], labels, as_binary))
        answer: dict[str, Any] = {"model_name": name, "model_version": model.version}
        if body.id is not None:
            answer["id"] = body.id
        content, headers, media_type = binary.encode_answer(answer, outputs)
        return Response(content, headers=headers, media_type=media_type)

    infer_doc: dict[str, Any] = {
        "response_model": V2InferResponse,
        "responses": {
            200: INFER_ANSWER,
            415: {"model": ErrorBody, "description": "The body is compressed."},
        },
        "openapi_extra": INFER_REQUEST,
    }

    @router.post(f"{base}/infer", summary="Inference", **infer_doc)
    async def infer_latest(request: Request, state: StateDep, request_id: RequestIdDep) -> Response:
        return await run(request, state, select_model(state), request_id)

    @router.post(f"{base}/versions/{{version:segment}}/infer", summary="Inference", **infer_doc)
    async def infer_version(
        request: Request, state: StateDep, request_id: RequestIdDep, version: str
    ) -> Response:
        return await run(request, state, select_model(state, version=version), request_id)

    return router
