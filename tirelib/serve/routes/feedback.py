"""``POST /v1/models/{model_name}:feedback``: the true labels of an answered request.

A prediction is remembered by its ``X-Request-ID`` (:mod:`tirelib.serve.feedback`); its feedback
is counted once, by the model version that answered (``tire_feedback_labels_total``,
``tire_feedback_correct_total``), and written to ``feedback/`` in S3 by the sink.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from tirelib.serve.deps import (
    ERRORS,
    StateDep,
    json_response,
    read_body,
    request_body,
    served_name,
)
from tirelib.serve.feedback import judge
from tirelib.serve.limits import excerpt
from tirelib.serve.schemas import ErrorBody, FeedbackRequest, FeedbackResponse
from tirelib.serve.sink import feedback_records

RESPONSES: dict[int | str, dict[str, Any]] = {
    400: ERRORS[400],
    404: {
        "model": ErrorBody,
        "description": "No such model, or no prediction with this request id is remembered "
        "(unknown or expired).",
    },
    409: {"model": ErrorBody, "description": "Feedback for this request id was given already."},
    413: ERRORS[413],
    "4XX": ERRORS["4XX"],
}


router = APIRouter(tags=["Feedback"])


@router.post(
    "/v1/models/{model_name:segment}:feedback",
    response_model=FeedbackResponse,
    responses=RESPONSES,
    summary="True labels of a prediction",
    openapi_extra=request_body(FeedbackRequest),
    dependencies=[Depends(served_name)],
)
async def feedback(request: Request, state: StateDep) -> Response:
    """Give the true label of each instance of an answered request (by its X-Request-ID).

    Counted once per request id, by the model version that answered; null leaves an
    instance unlabelled.
    """
    body = await read_body(request, FeedbackRequest)
    prediction = state.feedback.get(body.request_id)
    if prediction is None:
        config = state.config
        raise HTTPException(
            404,
            f"no prediction with request id {excerpt(body.request_id, 40)} is remembered: "
            f"unknown, or not among the last {config.feedback_window_requests:,} requests "
            f"of the last {config.feedback_ttl_seconds:g} s",
        )
    if prediction.answered:
        raise HTTPException(
            409,
            f"feedback for request id {excerpt(body.request_id, 40)} was given already; "
            "it is counted once",
        )
    judged = judge(prediction, body.labels)  # a DataError (400) leaves it unanswered
    prediction.answered = True
    state.metrics.observe_feedback(
        prediction.version, [(true, predicted) for _, true, predicted in judged.labelled]
    )
    if state.sink is not None:
        state.sink.feedback(
            feedback_records(
                body.request_id,
                version=prediction.version,
                labelled=judged.labelled,
                capture_keys=prediction.capture_keys,
                moment=datetime.now(UTC),
            )
        )
    return json_response(
        {
            "request_id": body.request_id,
            "labelled": len(judged.labelled),
            "correct": judged.correct,
            "model_version": prediction.version,
        }
    )
