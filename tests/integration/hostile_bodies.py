"""Hypothesis strategies for hostile JSON bodies, and the schemathesis hook that sends them.

The strategies draw raw request bodies (bytes) of the kinds a JSON parser fails on: nesting far
deeper than any image (65 to 5,000 levels of arrays or objects, in every place a body nests),
invalid UTF-8 spliced into a valid body's strings, unpaired surrogate escapes, huge strings where
a short name belongs, and pixel values that are not numbers. :mod:`test_hostile_input` sends them
directly; loaded by schemathesis (``SCHEMATHESIS_HOOKS=<this file>``), the hook below mixes them
into the bodies it generates for every JSON operation, so its "no server error" check covers them.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

TINY = [[[0.5, 0.5, 0.5]]]
GOOD_BODIES: dict[str, dict[str, Any]] = {
    ":predict": {"instances": [TINY]},
    ":classify": {"examples": [{"image": TINY}]},
    "/infer": {"inputs": [{"name": "images", "shape": [1, 1, 1, 3], "datatype": "FP32",
                           "data": [0.5] * 3}]},
    ":feedback": {"request_id": "0123456789abcdef", "labels": ["good", None, "defective"]},
}  # fmt: skip
"""A good body per kind of JSON route (by the end of its path)."""
PLACES = [
    b"@",
    b'{"instances": [@]}',
    b'{"inputs": @}',
    b'{"signature_name": @, "instances": [1]}',
    b'{"examples": [{"image": @}], "context": {"c": @}}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": @}]}',
    b'{"parameters": @, "inputs": []}',
]
"""Where a nested value goes (``@``), across the routes' bodies."""
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]


def route_kind(path: str) -> str:
    return next(kind for kind in GOOD_BODIES if path.endswith(kind))


def _nested(depth: int, kind: str) -> bytes:
    if kind == "object":
        return b'{"k":' * depth + b"0" + b"}" * depth
    return b"[" * depth + b"0" + b"]" * depth


deep_bodies = st.builds(
    lambda depth, kind, place: place.replace(b"@", _nested(depth, kind)),
    st.integers(65, 5000),
    st.sampled_from(["array", "object"]),
    st.sampled_from(PLACES),
)


@st.composite
def bad_text_bodies(draw: st.DrawFn, kind: str | None = None) -> bytes:
    """A good body with invalid UTF-8 (or an unpaired surrogate escape) inside one string."""
    body = GOOD_BODIES[kind or draw(st.sampled_from(list(GOOD_BODIES)))]
    text = json.dumps({**body, "id": "request"} if "inputs" in body else body)
    quotes = [i for i, char in enumerate(text) if char == '"']
    at = quotes[draw(st.integers(0, len(quotes) - 1))] + 1
    bad = draw(st.sampled_from([*BAD_UTF8, b"\\ud800", b"\\udfff"]))
    raw = text.encode()
    return raw[:at] + bad + raw[at:]


@st.composite
def huge_string_bodies(draw: st.DrawFn, kind: str | None = None, most: int = 2**21) -> bytes:
    """A good body with a long string where a short name belongs."""
    body = dict(GOOD_BODIES[kind or draw(st.sampled_from(list(GOOD_BODIES)))])
    body[draw(st.sampled_from(["signature_name", "an unknown field"]))] = "z" * draw(
        st.integers(10_000, most)
    )
    return json.dumps(body).encode()


not_numbers = st.one_of(st.text(max_size=8), st.booleans(), st.none(), st.just({}))


@st.composite
def non_number_pixel_bodies(draw: st.DrawFn, kind: str | None = None) -> bytes:
    """A good body whose one pixel value is a string, a boolean, null or an object."""
    body = json.loads(json.dumps(GOOD_BODIES[kind or draw(st.sampled_from(list(GOOD_BODIES)))]))
    value = draw(not_numbers)
    if "instances" in body:
        body["instances"][0][0][0][draw(st.integers(0, 2))] = value
    elif "examples" in body:
        body["examples"][0]["image"][0][0][draw(st.integers(0, 2))] = value
    elif "labels" in body:  # a label rather than a pixel
        body["labels"][draw(st.integers(0, 2))] = value
    else:
        body["inputs"][0]["data"][draw(st.integers(0, 2))] = value
    return json.dumps(body).encode()


def hostile_bodies(kind: str | None = None, most: int = 2**21) -> st.SearchStrategy[bytes]:
    """Any of the above, for a route of ``kind`` (``:predict``, ``:classify``, ``/infer``,
    ``:feedback``)."""
    return st.one_of(
        deep_bodies,
        bad_text_bodies(kind),
        huge_string_bodies(kind, most),
        non_number_pixel_bodies(kind),
    )


try:
    import schemathesis
except ImportError:  # the strategies above need only hypothesis
    schemathesis = None  # type: ignore[assignment]

if schemathesis is not None:

    @schemathesis.hook
    def before_generate_body(context: Any, strategy: st.SearchStrategy) -> st.SearchStrategy:
        """Also send hostile bodies to every JSON operation (raw bytes go out unchanged)."""
        operation = context.operation
        if operation is None or operation.method.upper() != "POST":
            return strategy
        if not operation.path.endswith(tuple(GOOD_BODIES)):
            return strategy
        return st.one_of(strategy, hostile_bodies(route_kind(operation.path), most=2**18))
