"""TensorFlow Serving's REST API (``/v1/models/{model_name}…``), plus a file upload.

Status, metadata, predict (row and columnar forms) and classify answer in TF Serving's shapes, so
its REST clients work unchanged; ``/versions/{version}`` and ``/labels/{label}`` select a version
as TF Serving does, and a model name other than the served one is a 404 in TF Serving's words
(:mod:`tirelib.serve.deps` resolves the path). ``:upload`` takes multipart image files, for a
person with curl.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, Response, UploadFile

from tirelib.serve.bodies import SIGNATURE, Images, read_classify, read_predict
from tirelib.serve.deps import (
    ERRORS,
    Inference,
    InferenceDep,
    LatestModel,
    ModelLabel,
    ModelVersion,
    ServedName,
    ServeState,
    StateDep,
    Version,
    json_response,
    request_body,
)
from tirelib.serve.inputs import BYTES_INPUT, FLOAT_INPUT, Located, check_count
from tirelib.serve.limits import clip, excerpt
from tirelib.serve.model import ServedModel, VersionState
from tirelib.serve.request_id import RESPONSE_HEADERS
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
                "backend": model.backend,
                "backend_reason": model.backend_reason,
                "quantization": model.quantization,
            },
        },
    }


router = APIRouter(prefix="/v1/models", tags=["TensorFlow Serving REST API"], responses=ERRORS)
MODEL = "/{model_name:segment}"
VERSION = f"{MODEL}/versions/{{version:segment}}"
LABEL = f"{MODEL}/labels/{{label:segment}}"
ANSWER: dict[int | str, dict[str, Any]] = {200: {"headers": RESPONSE_HEADERS}}
PREDICT: dict[str, Any] = {
    "summary": "Predict",
    "response_model": PredictResponse,
    "responses": ANSWER,
    "openapi_extra": request_body(PredictRequest),
}
CLASSIFY: dict[str, Any] = {
    "summary": "Classify",
    "response_model": ClassifyResponse,
    "responses": ANSWER,
    "openapi_extra": request_body(ClassifyRequest),
}


# --------------------------------------------------------------------------- status, metadata


def status_of(state: ServeState, name: str, version: str | None) -> Response:
    states = state.holder.status()
    if version is not None:
        states = [s for s in states if s.version == version]
        if not states:
            raise HTTPException(
                404, f"Servable not found for request: Specific({name}, {clip(version)})"
            )
    elif not states:
        raise HTTPException(
            404,
            f"Could not find any versions of model {name}"
            + (f": {state.holder.problem}" if state.holder.problem else ""),
        )
    return json_response(_status(states))


@router.get(MODEL, response_model=ModelStatusResponse, summary="Version status")
async def model_status(state: StateDep, name: ServedName) -> Response:
    return status_of(state, name, None)


@router.get(VERSION, response_model=ModelStatusResponse, summary="Version status")
async def version_status(state: StateDep, name: ServedName, version: Version) -> Response:
    return status_of(state, name, version)


@router.get(f"{MODEL}/metadata", response_model=MetadataResponse, summary="Signature, classes")
async def model_metadata(model: LatestModel, name: ServedName) -> Response:
    return json_response(metadata(name, model))


@router.get(f"{VERSION}/metadata", response_model=MetadataResponse, summary="Signature, classes")
async def version_metadata(model: ModelVersion, name: ServedName) -> Response:
    return json_response(metadata(name, model))


# --------------------------------------------------------------------------- predict, classify


async def predict(model: ServedModel, inference: Inference, labels: bool) -> Response:
    """Answer a predict body (row or columnar form) in TF Serving's shape."""
    body, probabilities = await inference.run(
        model, functools.partial(read_predict, limits=inference.limits)
    )
    answer: dict[str, Any] = {("predictions" if body.row else "outputs"): probabilities.tolist()}
    if labels:
        answer["classes"] = list(model.classes)
        answer["labels"] = [model.classes[i] for i in probabilities.argmax(axis=1).tolist()]
    return json_response(answer)


async def classify(model: ServedModel, inference: Inference) -> Response:
    """Answer a classify body: (class, score) pairs per example."""
    _, probabilities = await inference.run(
        model, functools.partial(read_classify, limits=inference.limits)
    )
    classes = model.classes
    results = [
        [[label, score] for label, score in zip(classes, row, strict=True)]
        for row in probabilities.tolist()
    ]
    return json_response({"results": results})


@router.post(f"{MODEL}:predict", **PREDICT)
async def predict_latest(
    model: LatestModel, inference: InferenceDep, labels: Labels = False
) -> Response:
    return await predict(model, inference, labels)


@router.post(f"{VERSION}:predict", **PREDICT)
async def predict_version(
    model: ModelVersion, inference: InferenceDep, labels: Labels = False
) -> Response:
    return await predict(model, inference, labels)


@router.post(f"{LABEL}:predict", **PREDICT)
async def predict_label(
    model: ModelLabel, inference: InferenceDep, labels: Labels = False
) -> Response:
    return await predict(model, inference, labels)


@router.post(f"{MODEL}:classify", **CLASSIFY)
async def classify_latest(model: LatestModel, inference: InferenceDep) -> Response:
    return await classify(model, inference)


@router.post(f"{VERSION}:classify", **CLASSIFY)
async def classify_version(model: ModelVersion, inference: InferenceDep) -> Response:
    return await classify(model, inference)


# --------------------------------------------------------------------------- upload


@router.post(
    f"{MODEL}:upload",
    response_model=UploadResponse,
    responses=ANSWER,
    summary="Classify image files",
)
async def upload(
    model: LatestModel,
    inference: InferenceDep,
    file: Annotated[list[UploadFile], File(description="One or more image files (JPEG, PNG, …)")],
) -> Response:
    """``curl -F file=@tire.jpg http://127.0.0.1:8501/v1/models/tire:upload``"""
    check_count(len(file), inference.limits, "file")
    found: list[Located] = [
        (f"file {excerpt(item.filename or f'file[{i}]')}", await item.read())
        for i, item in enumerate(file)
    ]
    # FastAPI has read the multipart body into the files already.
    _, probabilities = await inference.run(model, lambda _: Images(found), body=b"")
    results = [
        {
            "filename": item.filename or "",
            "label": model.classes[int(row.argmax())],
            "probabilities": dict(zip(model.classes, row.tolist(), strict=True)),
        }
        for item, row in zip(file, probabilities, strict=True)
    ]
    return json_response({"model_version": model.version, "results": results})
