"""What the routes share: the server's state, choosing the model for a request, running it.

HTTP errors are raised here and in the routes only; the library below raises
:class:`~tirelib.errors.DataError`, which the app answers with a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.convertors import CONVERTOR_TYPES, Convertor, register_url_convertor

from tirelib.errors import DataError
from tirelib.serve.batching import DynamicBatcher
from tirelib.serve.config import ServeConfig
from tirelib.serve.decoding import Admitted, DecodeGate, DecodeQueueFull, PixelLimits, admit
from tirelib.serve.inputs import Limits, Located
from tirelib.serve.limits import clip, excerpt
from tirelib.serve.metrics import ServeMetrics
from tirelib.serve.model import ModelHolder, ServedModel
from tirelib.serve.schemas import ErrorBody, parse_body

SIGNATURE = "serving_default"
BodyT = TypeVar("BodyT", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The request is malformed; the error says how."},
    404: {"model": ErrorBody, "description": "No such model version or label."},
    413: {
        "model": ErrorBody,
        "description": "The body, an image or the request's images are over their budget.",
    },
    503: {
        "model": ErrorBody,
        "description": "No model is loaded yet, or too many images wait to be decoded.",
    },
}


class SegmentConvertor(Convertor[str]):
    """A path segment without ``:``, so ``versions/3:predict`` is never read as version
    ``3:predict`` of a GET route (TF Serving's URLs put the verb after a colon)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


def register_convertors() -> None:
    """Make ``{name:segment}`` usable in route paths (before the routes are built)."""
    if "segment" not in CONVERTOR_TYPES:
        register_url_convertor("segment", SegmentConvertor())


@dataclass
class ServeState:
    """Everything a request needs, made in the app's lifespan."""

    config: ServeConfig
    holder: ModelHolder
    batcher: DynamicBatcher
    metrics: ServeMetrics
    limits: Limits
    pixels: PixelLimits
    gate: DecodeGate


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body that the route reads itself.

    The app's OpenAPI hook puts the model's schema into ``components``.
    """
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def get_state(request: Request) -> ServeState:
    state: ServeState = request.app.state.serve
    return state


StateDep = Annotated[ServeState, Depends(get_state)]


def json_response(content: Any, status_code: int = 200) -> Response:
    """JSON encoded by msgspec (fast for long float lists)."""
    return Response(msgspec.json.encode(content), status_code, media_type="application/json")


def not_ready(state: ServeState) -> HTTPException:
    failed = [s for s in state.holder.status() if s.state == "UNAVAILABLE"]
    why = state.holder.problem or (
        f"version {failed[0].version} failed to load: {failed[0].error_message}"
        if failed
        else "the first version is still loading"
    )
    return HTTPException(503, f"model '{state.config.name}' is not loaded yet: {why}")


def select_model(
    state: ServeState, *, version: str | None = None, label: str | None = None
) -> ServedModel:
    """The model for this request: read once, so a swap cannot change it mid-request."""
    model = state.holder.current
    if model is None:
        raise not_ready(state)
    name = state.config.name
    if version is not None and version != model.version:
        raise HTTPException(
            404,
            f"Servable not found for request: Specific({name}, {clip(version)}); "
            f"this server serves version {model.version}",
        )
    if label is not None and label != state.holder.source.alias:
        known = state.holder.source.alias
        raise HTTPException(
            404,
            f"Servable not found for request: Label({name}, {clip(label)}); "
            + (f"the only label is '{known}'" if known else "this server has no version labels"),
        )
    return model


def check_signature(signature_name: str | None) -> None:
    if signature_name not in (None, "", SIGNATURE):
        raise DataError(
            f"unknown signature_name {excerpt(signature_name)}; this model has only {SIGNATURE!r}"
        )


async def read_body(request: Request, model: type[BodyT]) -> BodyT:
    """The JSON body as ``model``, whatever the Content-Type says (TF Serving does the same)."""
    raw = await request.body()
    return await run_in_threadpool(parse_body, raw, model)


async def prepare_images(
    state: ServeState, model: ServedModel, find: Callable[..., list[Located]], *args: Any
) -> torch.Tensor:
    """``find(*args)`` (the images of a request) preprocessed by ``model``, off the event loop.

    The images are checked against the pixel budget from their headers first, then decoded
    when the decode gate has room (see :mod:`tirelib.serve.decoding`). Call it inside
    ``state.batcher.arriving()``, with :func:`predict_images` right after the block.
    """
    budget = state.pixels.budget(model.prep.image_size)

    def inspect() -> Admitted:
        return admit(model.prep, find(*args), budget, state.limits)

    admitted = await run_in_threadpool(inspect)
    try:
        async with state.gate.hold(admitted.pixels / budget.image):
            return await run_in_threadpool(admitted.decode)
    except DecodeQueueFull as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from error
    finally:
        admitted.close()


async def predict_images(state: ServeState, model: ServedModel, images: torch.Tensor) -> np.ndarray:
    """Class probabilities from a dynamic batch; the predictions are counted."""
    probabilities = await state.batcher.submit(model, images)
    state.metrics.observe_predictions(model.classes, probabilities)
    return probabilities
