"""TensorFlow Serving's REST API for one model (``/v1/models/<name>…``), plus a file upload.

Status, metadata, predict (row and columnar forms) and classify answer in TF Serving's shapes, so
its REST clients work unchanged; ``/versions/<v>`` and ``/labels/<alias>`` select a version as
TF Serving does. ``:upload`` takes multipart image files, for a person with curl.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, Request, Response, UploadFile

from tirelib.serve.deps import (
    ERRORS,
    SIGNATURE,
    ServeState,
    StateDep,
    check_signature,
    json_response,
    predict_images,
    prepare_images,
    read_body,
    read_predict_body,
    request_body,
    select_model,
)
from tirelib.serve.inputs import (
    BYTES_INPUT,
    FLOAT_INPUT,
    Located,
    check_count,
    from_examples,
)
from tirelib.serve.limits import excerpt
from tirelib.serve.model import ServedModel, VersionState
from tirelib.serve.request_id import RESPONSE_HEADERS, RequestIdDep
from tirelib.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    MetadataResponse,
    ModelStatusResponse,
    PredictRequest,
    PredictResponse,
    UploadResponse,
)

Labels = Annotated[bool, Query(description="Add the class names and each image's predicted class.")]


def _status(states: list[VersionState]) -> dict[str, Any]:
    return {
        "model_version_status": [
            {
                "version": s.version,
                "state": s.state,
                "status": {"error_code": s.error_code, "error_message": s.error_message},
            }
            for s in states
        ]
    }


def _tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "tensor_shape": {
            "dim": [{"size": str(d), "name": ""} for d in dims],
            "unknown_rank": False,
        },
        "name": f"{name}:0",
    }


def metadata(name: str, model: ServedModel) -> dict[str, Any]:
    """TF Serving's ``GetModelMetadata`` answer, with the model's own facts under ``tire``."""
    signature = {
        "inputs": {
            FLOAT_INPUT: _tensor(FLOAT_INPUT, "DT_FLOAT", [-1, -1, -1, 3]),
            BYTES_INPUT: _tensor(BYTES_INPUT, "DT_STRING", [-1]),
        },
        "outputs": {
            "probabilities": _tensor("probabilities", "DT_FLOAT", [-1, len(model.classes)])
        },
        "method_name": "tensorflow/serving/predict",
    }
    size = model.prep.image_size
    return {
        "model_spec": {"name": name, "signature_name": "", "version": model.version},
        "metadata": {
            "signature_def": {"signature_def": {SIGNATURE: signature}},
            "tire": {
                "classes": list(model.classes),
                "input_size": [size, size],
                "image_size": size,
                "mean": list(model.prep.mean),
                "std": list(model.prep.std),
                "model_type": model.model_type,
                "model_uri": model.uri,
            },
        },
    }


def build_router(name: str) -> APIRouter:
    """The ``/v1`` routes for the model called ``name`` in URLs."""
    base = f"/v1/models/{name}"
    router = APIRouter(tags=["TensorFlow Serving REST API"], responses=ERRORS)

    def status_of(state: ServeState, version: str | None) -> Response:
        states = state.holder.status()
        if version is not None:
            states = [s for s in states if s.version == version]
            if not states:
                raise HTTPException(
                    404, f"Servable not found for request: Specific({name}, {version})"
                )
        elif not states:
            raise HTTPException(
                404,
                f"Could not find any versions of model {name}"
                + (f": {state.holder.problem}" if state.holder.problem else ""),
            )
        return json_response(_status(states))

    @router.get(base, response_model=ModelStatusResponse, summary="Version status")
    async def model_status(state: StateDep) -> Response:
        return status_of(state, None)

    @router.get(
        f"{base}/versions/{{version:segment}}",
        response_model=ModelStatusResponse,
        summary="Version status",
    )
    async def version_status(state: StateDep, version: str) -> Response:
        return status_of(state, version)

    @router.get(f"{base}/metadata", response_model=MetadataResponse, summary="Signature, classes")
    async def model_metadata(state: StateDep) -> Response:
        return json_response(metadata(name, select_model(state)))

    @router.get(
        f"{base}/versions/{{version:segment}}/metadata",
        response_model=MetadataResponse,
        summary="Signature, classes",
    )
    async def version_metadata(state: StateDep, version: str) -> Response:
        return json_response(metadata(name, select_model(state, version=version)))

    async def predict(
        request: Request, state: ServeState, model: ServedModel, labels: bool, request_id: str
    ) -> Response:
        with state.batcher.arriving():
            body = await read_predict_body(request, state.limits)
            prepared = await prepare_images(state, model, lambda: body.images)
        probabilities = await predict_images(state, model, prepared, request_id)
        key = "predictions" if body.row else "outputs"
        answer: dict[str, Any] = {key: probabilities.tolist()}
        if labels:
            answer["classes"] = list(model.classes)
            answer["labels"] = [model.classes[i] for i in probabilities.argmax(axis=1).tolist()]
        return json_response(answer)

    predict_doc: dict[str, Any] = {
        "response_model": PredictResponse,
        "responses": {200: {"headers": RESPONSE_HEADERS}},
        "openapi_extra": request_body(PredictRequest),
    }

    @router.post(f"{base}:predict", summary="Predict", **predict_doc)
    async def predict_latest(
        request: Request, state: StateDep, request_id: RequestIdDep, labels: Labels = False
    ) -> Response:
        return await predict(request, state, select_model(state), labels, request_id)

    @router.post(f"{base}/versions/{{version:segment}}:predict", summary="Predict", **predict_doc)
    async def predict_version(
        request: Request,
        state: StateDep,
        request_id: RequestIdDep,
        version: str,
        labels: Labels = False,
    ) -> Response:
        model = select_model(state, version=version)
        return await predict(request, state, model, labels, request_id)

    @router.post(f"{base}/labels/{{label:segment}}:predict", summary="Predict", **predict_doc)
    async def predict_label(
        request: Request,
        state: StateDep,
        request_id: RequestIdDep,
        label: str,
        labels: Labels = False,
    ) -> Response:
        model = select_model(state, label=label)
        return await predict(request, state, model, labels, request_id)

    async def classify(
        request: Request, state: ServeState, model: ServedModel, request_id: str
    ) -> Response:
        with state.batcher.arriving():
            body = await read_body(request, ClassifyRequest)
            check_signature(body.signature_name)
            prepared = await prepare_images(
                state, model, from_examples, body.examples, body.context, state.limits
            )
        probabilities = await predict_images(state, model, prepared, request_id)
        results = [
            [[label, score] for label, score in zip(model.classes, row, strict=True)]
            for row in probabilities.tolist()
        ]
        return json_response({"results": results})

    classify_doc: dict[str, Any] = {
        "response_model": ClassifyResponse,
        "responses": {200: {"headers": RESPONSE_HEADERS}},
        "openapi_extra": request_body(ClassifyRequest),
    }

    @router.post(f"{base}:classify", summary="Classify", **classify_doc)
    async def classify_latest(
        request: Request, state: StateDep, request_id: RequestIdDep
    ) -> Response:
        return await classify(request, state, select_model(state), request_id)

    @router.post(
        f"{base}/versions/{{version:segment}}:classify", summary="Classify", **classify_doc
    )
    async def classify_version(
        request: Request, state: StateDep, request_id: RequestIdDep, version: str
    ) -> Response:
        return await classify(request, state, select_model(state, version=version), request_id)

    @router.post(
        f"{base}:upload",
        response_model=UploadResponse,
        responses={200: {"headers": RESPONSE_HEADERS}},
        summary="Classify image files",
    )
    async def upload(
        state: StateDep,
        request_id: RequestIdDep,
        file: Annotated[
            list[UploadFile], File(description="One or more image files (JPEG, PNG, …)")
        ],
    ) -> Response:
        """``curl -F file=@tire.jpg http://127.0.0.1:8501/v1/models/tire:upload``"""
        model = select_model(state)
        check_count(len(file), state.limits, "file")
        with state.batcher.arriving():
            found: list[Located] = []
            for i, item in enumerate(file):
                label = item.filename or f"file[{i}]"
                found.append((f"file {excerpt(label)}", await item.read()))
            prepared = await prepare_images(state, model, lambda: found)
        probabilities = await predict_images(state, model, prepared, request_id)
        results = [
            {
                "filename": item.filename or "",
                "label": model.classes[int(row.argmax())],
                "probabilities": dict(zip(model.classes, row.tolist(), strict=True)),
            }
            for item, row in zip(file, probabilities, strict=True)
        ]
        return json_response({"model_version": model.version, "results": results})

    return router
