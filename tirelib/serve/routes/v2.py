"""The Open Inference Protocol (KServe v2, Triton) over REST, for the same model.

Inputs: ``images`` FP32 ``[N, H, W, 3]`` in [0, 1] (any name is accepted; the datatype decides),
or ``image_bytes`` BYTES ``[N]`` whose elements are base64 text of encoded images (JSON cannot
carry raw bytes). Outputs: ``probabilities`` FP32 ``[N, classes]`` and ``label`` BYTES ``[N]``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

import tirelib
from tirelib.errors import DataError
from tirelib.serve.deps import (
    ERRORS,
    ServeState,
    StateDep,
    json_response,
    not_ready,
    predict_images,
    prepare_images,
    read_body,
    request_body,
    select_model,
)
from tirelib.serve.inputs import BYTES_INPUT, FLOAT_INPUT, Located, from_v2_tensor
from tirelib.serve.limits import excerpt
from tirelib.serve.model import ServedModel
from tirelib.serve.request_id import RESPONSE_HEADERS, RequestIdDep
from tirelib.serve.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)

OUTPUTS = ("probabilities", "label")


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
            body = await read_body(request, V2InferRequest)
            wanted = [o.name for o in body.outputs] if body.outputs else list(OUTPUTS)
            unknown = sorted(set(wanted) - set(OUTPUTS))
            if unknown:
                named = ", ".join(excerpt(name, 40) for name in unknown[:5])
                raise DataError(f"unknown outputs [{named}]; this model gives {list(OUTPUTS)}")
            tensor = body.inputs[0]

            def find() -> list[Located]:
                return from_v2_tensor(
                    name=tensor.name,
                    datatype=tensor.datatype,
                    shape=tensor.shape,
                    data=tensor.data,
                    limits=state.limits,
                )

            prepared = await prepare_images(state, model, find)
        probabilities = await predict_images(state, model, prepared, request_id)
        count = len(probabilities)
        outputs = []
        for output in wanted:
            if output == "probabilities":
                outputs.append(
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": [count, len(model.classes)],
                        "data": probabilities.ravel().tolist(),
                    }
                )
            else:
                labels = [model.classes[i] for i in probabilities.argmax(axis=1).tolist()]
                outputs.append(
                    {"name": "label", "datatype": "BYTES", "shape": [count], "data": labels}
                )
        answer: dict[str, Any] = {"model_name": name, "model_version": model.version}
        if body.id is not None:
            answer["id"] = body.id
        answer["outputs"] = outputs
        return json_response(answer)

    infer_doc: dict[str, Any] = {
        "response_model": V2InferResponse,
        "responses": {200: {"headers": RESPONSE_HEADERS}},
        "openapi_extra": request_body(V2InferRequest),
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
