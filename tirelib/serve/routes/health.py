"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from tirelib.serve.deps import ERRORS, StateDep, json_response, not_ready
from tirelib.serve.metrics import CONTENT_TYPE_LATEST
from tirelib.serve.schemas import Health

router = APIRouter(tags=["Health and metrics"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Response:
    """The process answers (it may still be loading its first model)."""
    return json_response({"status": "ok"})


@router.get("/readyz", response_model=Health, responses={503: ERRORS[503]}, summary="Readiness")
async def readyz(state: StateDep) -> Response:
    """A model is loaded: 200 with its version, else 503 saying why."""
    model = state.holder.current
    if model is None:
        raise not_ready(state)
    return json_response({"status": "ready", "model_version": model.version})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
