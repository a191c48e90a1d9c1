"""What the model server refuses before it does any work, and how much of a bad value it quotes.

- A request's head (request line and headers): at most ``max_header_bytes`` bytes and
  ``max_headers`` fields (:class:`HeaderLimitMiddleware`, a 431 that keeps the connection open;
  a head that grows past the size while it arrives is cut off by :mod:`.protocol`), read within
  ``header_timeout_s`` seconds (:mod:`.protocol`).
- A JSON body: nested at most :data:`MAX_JSON_DEPTH` levels deep (:func:`check_json_depth`),
  checked on the bytes before they are parsed, so no parser recurses a thousand levels.
- An error message quotes at most :data:`EXCERPT_CHARS` characters of a value it names
  (:func:`excerpt`) and is at most :data:`MAX_ERROR_CHARS` long in all (:func:`shorten`): a
  64 MiB ``signature_name`` is not sent back.
"""

from __future__ import annotations

import msgspec
import numpy as np
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tirelib.errors import DataError

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a JSON body. An image batch is 4 deep
([N][H][W][C]) and the envelope adds at most 3, so 64 leaves room without inviting recursion."""
EXCERPT_CHARS = 80
"""Most characters of one value an error message quotes."""
MAX_ERROR_CHARS = 1000
"""Longest error message the server sends."""

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as an error message quotes it: its repr, cut to ``limit`` characters.

    ``excerpt("x" * 10**6)`` is ``'xxx…x'... (1,000,000 characters)``; a container is named by
    its type and length only, never printed.
    """
    if isinstance(value, str | bytes | bytearray):
        unit = "characters" if isinstance(value, str) else "bytes"
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} {unit})"
    if isinstance(value, bool | float) or value is None:
        return repr(value)
    if isinstance(value, int):
        return (
            repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
        )
    if isinstance(value, list | tuple | dict | set):
        return f"a {type(value).__name__} of {len(value):,} items"
    return f"a {type(value).__name__}"


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` unquoted, cut to ``limit`` characters (a path, a version) with its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shorten(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to about ``limit`` characters, saying how long it was."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message):,} characters in all)"


def check_json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a JSON text nested deeper than ``limit`` (a :class:`DataError`), before parsing.

    Linear and mostly in C: escaped backslashes and quotes are dropped, then every byte but
    brackets and quotes; numpy masks what lies inside strings and sums the brackets left.
    """
    if b"\\" in raw:  # an escaped quote or backslash must not be read as a string's end
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = raw.translate(None, _NOT_STRUCTURE)
    if kept.count(b"[") + kept.count(b"{") <= limit:
        return
    marks = np.frombuffer(kept, dtype=np.uint8)
    quotes = marks == ord('"')
    outside = (np.cumsum(quotes) % 2 == 0) & ~quotes
    steps = np.zeros(len(marks), dtype=np.int8)
    steps[outside & ((marks == ord("[")) | (marks == ord("{")))] = 1
    steps[outside & ((marks == ord("]")) | (marks == ord("}")))] = -1
    levels = np.cumsum(steps, dtype=np.int64)
    if len(levels) and int(levels.max()) > limit:
        raise DataError(
            f"the JSON body is nested more than {limit} levels deep; "
            "an image batch needs 4 ([N][H][W][C])"
        )


class HeaderLimitMiddleware:
    """Answers 431 with ``{"error": ...}`` to a request whose head has too many fields or bytes.

    The head has been read whole by then (:mod:`.protocol` bounds how large it may grow), so the
    connection stays usable for the next request.
    """

    def __init__(self, app: ASGIApp, *, max_headers: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem:
                body = msgspec.json.encode({"error": problem})
                await Response(body, 431, media_type="application/json")(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return (
                f"the request has {len(headers):,} header fields, at most {self.max_headers} "
                "are accepted"
            )
        line = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + 16
        size = line + sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.max_header_bytes:
            return (
                f"the request line and headers hold about {size:,} bytes, at most "
                f"{self.max_header_bytes:,} are accepted"
            )
        return None
