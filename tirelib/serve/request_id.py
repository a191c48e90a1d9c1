"""Request ids: every response carries ``X-Request-ID``, the client's own or a fresh one.

:class:`RequestIdMiddleware` (pure ASGI, so the 4xx answers of the other middleware carry the
id too) takes the client's header when it sent one, at most :data:`MAX_CHARS` printable ASCII
characters, else answers 400 naming the rule; without one (or with an empty one) it makes a
uuid4 hex. The id is kept in the request's state, where routes read it with
:data:`RequestIdDep`; the feedback route takes it back later to give a prediction its true labels.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tirelib.serve.limits import excerpt
from tirelib.serve.schemas import REQUEST_ID_CHARS as MAX_CHARS
from tirelib.serve.schemas import REQUEST_ID_PATTERN as PATTERN
from tirelib.serve.schemas import json_response

HEADER = "X-Request-ID"
RULE = f"at most {MAX_CHARS} printable ASCII characters (space to '~')"
_VALID = re.compile(PATTERN)
_KEY = HEADER.lower().encode("ascii")
_STATE_KEY = "request_id"


def new_request_id() -> str:
    return uuid.uuid4().hex


def is_valid(value: str) -> bool:
    return _VALID.fullmatch(value) is not None


def _from_headers(scope: Scope) -> tuple[str | None, str | None]:
    """The client's id (None: none sent) and the problem with it (None: it is fine)."""
    values = [value for name, value in scope["headers"] if name == _KEY]
    if not values:
        return None, None
    if len(values) > 1:
        return None, f"send one {HEADER} header, got {len(values)}"
    text = values[0].decode("latin-1")  # HTTP header bytes; anything not ASCII is refused below
    if not text:
        return None, None
    if not is_valid(text):
        return None, f"{HEADER} must be {RULE}, got {excerpt(text, 40)}"
    return text, None


class RequestIdMiddleware:
    """Sets the request id in the scope's state and adds it to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent, problem = _from_headers(scope)
        request_id = sent or new_request_id()
        if problem is not None:
            response = json_response({"error": problem}, 400)
            response.headers[HEADER] = request_id
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[_STATE_KEY] = request_id
        header = (_KEY, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(
    request: Request,
    x_request_id: Annotated[
        str | None,
        Header(
            alias=HEADER,
            description=(
                f"Your id for this request ({RULE}); the answer carries it back in {HEADER}, "
                "a fresh one when none is sent. Give it to the :feedback route with the true "
                "labels."
            ),
            max_length=MAX_CHARS,
            json_schema_extra={"pattern": PATTERN},
        ),
    ] = None,
) -> str:
    """The request's id (the middleware checked the header already)."""
    state = request.scope.get("state") or {}
    found = state.get(_STATE_KEY)
    return found if isinstance(found, str) else new_request_id()


RequestIdDep = Annotated[str, Depends(request_id)]

RESPONSE_HEADERS = {
    HEADER: {
        "description": "The request's id: the client's own, or a fresh uuid4 hex.",
        "schema": {"type": "string", "maxLength": MAX_CHARS},
    }
}
