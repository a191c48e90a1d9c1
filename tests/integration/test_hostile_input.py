"""The standing hostile-input suite: what an attacker on loopback sends the model server.

One real server for the module (``tirelib serve`` under uvicorn on a free loopback port, serving
a small model folder, started by :mod:`tests.integration.model_server`). Each case is sent on a
fresh keep-alive connection, followed by a good request on the *same* connection; the case must
be answered with a 4xx, a ``{"error": ...}`` body of bounded size, and a connection the server
keeps (unless the case says the server must close it: a head it cannot read, a body it will not
read).

Adding cases: append a :class:`Case` to one of the lists below (they are parametrized), or in a
test of your own send requests with :class:`Connection` and pass every answer to :func:`record`
(it counts them and looks for watched credentials; :func:`watch` adds one). Everything sent is
summed up in pytest's terminal summary: inputs tried, answered 2xx/4xx/5xx, connections dropped,
credentials seen in answers.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import SlackReceiver
from tests.factories import header_bomb, png16
from tests.integration.credentials import Secrets, server_without_its_tracker
from tests.integration.hostile_bodies import hostile_bodies, route_kind
from tests.integration.model_server import running_server, save_model_folder
from tests.unit.test_serve_api import BAD_REQUESTS as UNIT_BAD_REQUESTS
from tests.unit.test_serve_binary import BAD_BINARY, binary_body, tensor
from tirelib.stack import ManagedProcess

pytestmark = pytest.mark.integration

MAX_BODY = 80 * 2**20  # room for the 64 MiB signature_name of the report
MAX_INSTANCES = 256
MAX_SIDE = 4096
HEADER_TIMEOUT_S = 2.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
MAX_ANSWER_BYTES = 4096
"""Largest error answer accepted: messages quote excerpts, never whole inputs."""

BASE = "/v1/models/tire"
PREDICT = f"{BASE}:predict"
CLASSIFY = f"{BASE}:classify"
UPLOAD = f"{BASE}:upload"
INFER = "/v2/models/tire/infer"
JSON_ROUTES = (PREDICT, f"{BASE}/versions/1:predict", CLASSIFY, INFER, f"{BASE}:feedback")
TINY = [[[0.5, 0.5, 0.5]]]
GOOD_BODY = json.dumps({"instances": [TINY]}).encode()


# --- the summary ------------------------------------------------------------------------------


@dataclass
class Summary:
    """What the suite sent and how the server answered."""

    tried: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # keep-alive lost because of bad input
    closed: list[str] = field(default_factory=list)  # closed by design (unreadable head, ...)
    credentials_seen: list[str] = field(default_factory=list)
    largest_answer: int = 0
    secrets: set[str] = field(default_factory=set)
    notes: dict[str, str] = field(default_factory=dict)  # other figures a test reports

    def render(self) -> str:
        classes = ", ".join(
            f"{kind}: {self.by_class.get(kind, 0)}" for kind in ("2xx", "4xx", "5xx")
        )
        others = {k: v for k, v in self.by_class.items() if k not in ("2xx", "4xx", "5xx")}
        lines = [
            f"inputs tried: {self.tried}",
            f"answered {classes}" + "".join(f", {k}: {v}" for k, v in sorted(others.items())),
            f"keep-alive connections dropped after bad input: {len(self.dropped)}"
            + (f" ({', '.join(self.dropped[:5])})" if self.dropped else ""),
            f"connections closed by design: {len(self.closed)}"
            + (f" ({', '.join(self.closed)})" if self.closed else ""),
            f"credentials seen in answers: {len(self.credentials_seen)}"
            + (f" ({', '.join(self.credentials_seen[:5])})" if self.credentials_seen else ""),
            f"largest answer: {self.largest_answer} bytes",
            *(f"{name}: {value}" for name, value in self.notes.items()),
        ]
        return "\n".join(lines)


SUMMARY = Summary()


def watch(secret: str) -> None:
    """Count every answer that contains ``secret`` (a password, a key) as a credential seen."""
    SUMMARY.secrets.add(secret)


def record(
    case: str, status: int, body: bytes, *, kept_connection: bool = True, closes: bool = False
) -> None:
    """Count one answer of the server to a hostile input (any test of this module may call it).

    ``status`` 0 means no answer; ``closes``: the server was meant to close the connection.
    """
    SUMMARY.tried += 1
    kind = f"{status // 100}xx" if status else "no answer"
    SUMMARY.by_class[kind] = SUMMARY.by_class.get(kind, 0) + 1
    SUMMARY.largest_answer = max(SUMMARY.largest_answer, len(body))
    if closes:
        SUMMARY.closed.append(case)
    elif not kept_connection:
        SUMMARY.dropped.append(case)
    if any(secret.encode() in body for secret in SUMMARY.secrets):
        SUMMARY.credentials_seen.append(case)


class _SummaryReport:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if SUMMARY.tried:
            terminalreporter.section("hostile input")
            terminalreporter.write_line(SUMMARY.render())


@pytest.fixture(scope="module", autouse=True)
def _summary_report(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("tirelib-hostile-input"):
        manager.register(_SummaryReport(), "tirelib-hostile-input")


# --- the server and a connection --------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """``tirelib serve`` with a small model folder, the README's limits, a 2 s head deadline."""
    root = tmp_path_factory.mktemp("hostile")
    model = save_model_folder(root / "model")
    env = {
        "TIRE_SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "TIRE_SERVE_MAX_HEADERS": str(MAX_HEADERS),
        "TIRE_SERVE_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "TIRE_SERVE_MAX_IMAGE_SIDE": str(MAX_SIDE),
    }
    args = [
        "--model-uri", str(model),
        "--max-body-bytes", str(MAX_BODY),
        "--max-instances", str(MAX_INSTANCES),
        "--max-wait-ms", "2",
    ]  # fmt: skip
    with running_server(root / "process", args, env=env) as process:
        yield process


@pytest.fixture(scope="module")
def server(serve_process: ManagedProcess) -> str:
    return serve_process.url


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def error(self) -> str:
        """The ``{"error": ...}`` message; fails the test if the body is anything else."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        value = json.loads(self.body)
        assert isinstance(value, dict) and set(value) == {"error"}, self.body[:300]
        assert isinstance(value["error"], str) and value["error"]
        return str(value["error"])


class Connection:
    """One HTTP/1.1 keep-alive connection (``http.client``): a test can tell whether the server
    kept it, as a later request goes out on the very same socket."""

    def __init__(self, url: str, timeout: float = 120) -> None:
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def send(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> Answer:
        self.http.request(method, path, body=body or None, headers=dict(headers or {}))
        response = self.http.getresponse()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

    @property
    def socket(self) -> socket.socket | None:
        return self.http.sock

    def still_usable(self) -> bool:
        """A good request on this connection is answered 200 on the same socket."""
        before = self.socket
        if before is None:
            return False
        answer = self.send("POST", PREDICT, GOOD_BODY)
        return answer.status == 200 and self.socket is before


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile request and what the server must answer."""

    name: str
    path: str
    body: bytes | Callable[[], bytes]  # a callable for bodies too large to build at import
    status: int  # the expected 4xx
    message: str = ""  # a part of the error message
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    closes: bool = False  # the server must close the connection (it cannot read further)

    def param(self) -> Any:
        return pytest.param(self, id=self.name)

    def payload(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else self.body()


def send_case(url: str, case: Case) -> tuple[Answer, bool]:
    """``case`` on a fresh connection, then a good request on it; recorded in the summary."""
    with Connection(url) as connection:
        answer = connection.send(case.method, case.path, case.payload(), case.headers)
        kept = connection.still_usable()
    record(case.name, answer.status, answer.body, kept_connection=kept, closes=case.closes)
    return answer, kept


def check_refused(url: str, case: Case) -> str:
    """Send ``case``; assert a 4xx with a bounded ``{"error"}`` body and the connection kept."""
    answer, kept = send_case(url, case)
    assert answer.status == case.status, answer.body[:500]
    assert len(answer.body) <= MAX_ANSWER_BYTES, f"{len(answer.body)} bytes: {answer.body[:200]!r}"
    message = answer.error()
    assert case.message in message, message
    if not case.closes:
        assert kept, "the server dropped the keep-alive connection after a bad request"
    return message


def _deep(depth: int, inner: bytes = b"0.5", open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + inner + close * depth


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _v2(data: Any, shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "images", "shape": shape or [1, 1, 1, 3], "datatype": "FP32", "data": data}
    return {"inputs": [tensor], **extra}


HWC = [[[0.1, 0.2, 0.3]] * 4] * 5  # one image, 5 x 4 pixels
DEEP = 1000
OBJ_OPEN, OBJ_CLOSE = b'{"a":', b"}"

# JSON nested about 1,000 deep (RecursionError in the parser), in every place a JSON body nests.
NESTING = [
    Case(
        "deep arrays in instances",
        PREDICT,
        b'{"instances": [' + _deep(DEEP) + b"]}",
        400,
        "nested more than",
    ),
    Case(
        "deep arrays as columnar inputs",
        PREDICT,
        b'{"inputs": ' + _deep(DEEP) + b"}",
        400,
        "nested more than",
    ),
    Case(
        "deep objects in instances",
        PREDICT,
        b'{"instances": [' + _deep(DEEP, b"1", OBJ_OPEN, OBJ_CLOSE) + b"]}",
        400,
        "nested more than",
    ),
    Case(
        "deep signature_name",
        PREDICT,
        b'{"signature_name": ' + _deep(DEEP) + b', "instances": [1]}',
        400,
        "nested more than",
    ),
    Case("deep top level", PREDICT, _deep(DEEP), 400, "nested more than"),
    Case("deep 100,000", PREDICT, _deep(100_000), 400, "nested more than"),
    Case(
        "deep in a version's predict",
        f"{BASE}/versions/1:predict",
        b'{"instances": [' + _deep(DEEP) + b"]}",
        400,
        "nested more than",
    ),
    Case(
        "deep classify example",
        CLASSIFY,
        b'{"examples": [{"image": ' + _deep(DEEP) + b"}]}",
        400,
        "nested more than",
    ),
    Case(
        "deep classify context",
        CLASSIFY,
        b'{"examples": [{"image": 1}], "context": {"x": ' + _deep(DEEP) + b"}}",
        400,
        "nested more than",
    ),
    Case(
        "deep v2 data",
        INFER,
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": '
        + _deep(DEEP)
        + b"}]}",
        400,
        "nested more than",
    ),
    Case(
        "deep v2 parameters",
        INFER,
        b'{"parameters": ' + _deep(DEEP, b"1", OBJ_OPEN, OBJ_CLOSE) + b', "inputs": []}',
        400,
        "nested more than",
    ),
    Case("65 levels", PREDICT, b'{"instances": [' + _deep(64) + b"]}", 400, "nested more than 64"),
]

# Invalid UTF-8 inside a JSON string (UnicodeDecodeError in the parser), and its relatives.
ENCODING = [
    Case("invalid UTF-8 in b64", PREDICT, b'{"instances": [{"b64": "\xff\xfe"}]}', 400, "UTF-8"),
    Case(
        "invalid UTF-8 in signature_name",
        PREDICT,
        b'{"signature_name": "\xc3\x28", "instances": [[[[0.1, 0.1, 0.1]]]]}',
        400,
        "UTF-8",
    ),
    Case("invalid UTF-8 in a key", PREDICT, b'{"\xe2\x82": []}', 400, "UTF-8"),
    Case(
        "invalid UTF-8 in classify",
        CLASSIFY,
        b'{"examples": [{"image": {"b64": "\xf0\x28\x8c\xbc"}}]}',
        400,
        "UTF-8",
    ),
    Case(
        "invalid UTF-8 in a v2 name",
        INFER,
        b'{"inputs": [{"name": "\xff", "shape": [1], "datatype": "FP32", "data": [0]}]}',
        400,
        "UTF-8",
    ),
    Case(
        "invalid UTF-8 in the v2 id", INFER, b'{"id": "\xed\xa0\x80", "inputs": []}', 400, "UTF-8"
    ),
    Case("invalid UTF-8 outside strings", PREDICT, b'{"instances": \xff}', 400, ""),
    Case(
        "unpaired surrogate in the v2 id",
        INFER,
        _j(_v2([0.5] * 3)).replace(b'"inputs"', b'"id": "\\ud800", "inputs"'),
        400,
        "surrogate",
    ),
    Case("UTF-16 body", PREDICT, json.dumps({"instances": [TINY]}).encode("utf-16"), 400, ""),
    Case("NUL bytes", PREDICT, b"\x00" * 1000, 400, ""),
]

NOT_NUMBERS = "instances[{}]: pixel values must be numbers in [0, 1]"
# Pixel values that are not numbers, and a single image where the columnar form wants a batch.
PIXELS = [
    Case(
        "string pixels",
        PREDICT,
        _j({"instances": [[[["0.1", "0.2", "0.3"]]]]}),
        400,
        NOT_NUMBERS.format(0),
    ),
    Case(
        "boolean pixels",
        PREDICT,
        _j({"instances": [[[[True, False, True]]]]}),
        400,
        NOT_NUMBERS.format(0),
    ),
    Case(
        "booleans among numbers",
        PREDICT,
        _j({"instances": [TINY, [[[0.5, True, 0.5]]]]}),
        400,
        NOT_NUMBERS.format(1),
    ),
    Case(
        "null pixels",
        PREDICT,
        _j({"instances": [[[[None, 0.2, 0.3]]]]}),
        400,
        "must be numbers in [0, 1]",
    ),
    Case(
        "string pixels, columnar",
        PREDICT,
        _j({"inputs": {"images": [[[["a", "b", "c"]]]]}}),
        400,
        "inputs.images[0]: pixel values",
    ),
    Case(
        "boolean pixels, classify",
        CLASSIFY,
        _j({"examples": [{"image": [[[True, True, True]]]}]}),
        400,
        "examples[0]: pixel values",
    ),
    Case("boolean data, v2", INFER, _j(_v2([True, False, True])), 400, "must be numbers in [0, 1]"),
    Case(
        "string data, v2", INFER, _j(_v2(["0.1", "0.2", "0.3"])), 400, "must be numbers in [0, 1]"
    ),
    Case(
        "huge integer pixel",
        PREDICT,
        b'{"instances": [[[[1' + b"0" * 400 + b", 0, 0]]]]}",
        400,
        "instances[0]",
    ),
    Case("pixel 1e999", PREDICT, b'{"instances": [[[[1e999, 0, 0]]]]}', 400, ""),
    Case(
        "columnar single image",
        PREDICT,
        _j({"inputs": {"images": HWC}}),
        400,
        "the first dimension is the batch",
    ),
    Case(
        "columnar single image, unnamed",
        PREDICT,
        _j({"inputs": HWC}),
        400,
        "the first dimension is the batch",
    ),
    Case("row form single image", PREDICT, _j({"instances": HWC}), 400, "[height, width, 3]"),
]

_SIXTY_FOUR_MIB = 64 * 2**20
# Values an error message might quote: each answer stays small.
ECHOES = [
    Case(
        "64 MiB signature_name",
        PREDICT,
        lambda: _j({"signature_name": "s" * _SIXTY_FOUR_MIB, "instances": [TINY]}),
        400,
        "(67,108,864 characters)",
    ),
    Case("1 MiB key", PREDICT, _j({"k" * 2**20: 1}), 400, ""),
    Case("1 MiB named input", PREDICT, _j({"inputs": {"n" * 2**20: []}}), 400, ""),
    Case("1 MiB instance key", PREDICT, _j({"instances": [{"n" * 2**20: 1}]}), 400, ""),
    Case("1 MiB classify feature", CLASSIFY, _j({"examples": [{"f" * 2**20: 1}]}), 400, ""),
    Case(
        "1 MiB v2 input name",
        INFER,
        _j({"inputs": [{"name": "n" * 2**20, "shape": [1], "datatype": "INT8", "data": [1]}]}),
        400,
        "",
    ),
    Case(
        "1 MiB v2 output name",
        INFER,
        _j(_v2([0.5] * 3, outputs=[{"name": "o" * 2**20}])),
        400,
        "unknown outputs",
    ),
    Case(
        "1 MiB v2 datatype",
        INFER,
        _j({"inputs": [{"name": "x", "shape": [1], "datatype": "D" * 2**20, "data": [1]}]}),
        400,
        "",
    ),
    Case(
        "v2 shape of 200,000 dimensions",
        INFER,
        _j(_v2([0.5] * 3, shape=[1] * 200_000)),
        400,
        "must have shape [N, H, W, 3]",
    ),
    Case("8 KiB version", f"{BASE}/versions/{'9' * 8000}:predict", GOOD_BODY, 404, "Specific(tire"),
    Case("8 KiB label", f"{BASE}/labels/{'l' * 8000}:predict", GOOD_BODY, 404, "Label(tire"),
    Case("8 KiB unknown path", "/" + "p" * 8000, b"", 404, "no such endpoint", method="GET"),
]

# The request head: size, count of fields (the read timeout has a test of its own).
HEADS = [
    Case(
        "too many headers",
        PREDICT,
        GOOD_BODY,
        431,
        f"at most {MAX_HEADERS}",
        headers={f"x-h{i}": "1" for i in range(MAX_HEADERS + 1)},
    ),
    Case(
        "one huge header",
        PREDICT,
        GOOD_BODY,
        431,
        "are accepted",
        headers={"x-big": "b" * (MAX_HEADER_BYTES + 1)},
    ),
    Case(
        "head of 64 KiB",
        PREDICT,
        GOOD_BODY,
        431,
        "are accepted",
        headers={"x-big": "b" * (4 * MAX_HEADER_BYTES)},
        closes=True,
    ),
]


def _wide_png() -> dict[str, str]:
    return _b64(_png(MAX_SIDE + 1, 4))


# The earlier integration cases (moved here) and the unit suite's bad requests (referenced).
EARLIER = [
    Case("malformed JSON", PREDICT, b'{"instances": [[[0.1, 0.2', 400, "malformed JSON"),
    Case("wrong shape", PREDICT, _j({"instances": [[0.1, 0.2, 0.3]]}), 400, "[height, width, 3]"),
    Case(
        "non-image bytes",
        PREDICT,
        _j({"instances": [_b64(b"%PDF-1.4 not an image")]}),
        400,
        "not an image",
    ),
    Case("NaN", PREDICT, b'{"instances": [[[[NaN, 0.5, 0.5]]]]}', 400, "NaN"),
    Case("empty batch", PREDICT, _j({"instances": []}), 400, "no images given"),
    Case("unknown version", f"{BASE}/versions/42:predict", GOOD_BODY, 404, "(tire, 42)"),
    Case(
        "too many",
        PREDICT,
        _j({"instances": [TINY] * (MAX_INSTANCES + 1)}),
        400,
        f"at most {MAX_INSTANCES}",
    ),
    Case("too large", PREDICT, lambda: _j({"instances": [_wide_png()]}), 400, "on a side"),
    Case(
        "body too large",
        PREDICT,
        b" " * 64,
        413,
        "larger than",
        headers={"content-length": str(MAX_BODY + 1)},
        closes=True,
    ),
]
# The unit suite's limits differ from this server's; these three have equivalents above.
_UNIT_LIMIT_CASES = {"too many", "too large", "too wide"}
UNIT = [
    Case(f"unit: {name}", path, body if isinstance(body, bytes) else _j(body), status, message)
    for name, path, body, status, message in UNIT_BAD_REQUESTS
    if name not in _UNIT_LIMIT_CASES
]


# Binary tensor data (Triton's extension): lengths that point past the body, sizes that do not
# add up or would allocate far more than was sent, and the unit suite's malformed bodies.
def _binary(
    name: str, request: dict[str, Any], data: bytes, status: int, message: str, **headers: str
) -> Case:
    body, header = binary_body(request, data)
    return Case(name, INFER, body, status, message, headers={**header, **headers})


_OVER_BUDGET = {"inputs": [tensor("UINT8", [1, 4096, 1100, 3], 4096 * 1100 * 3)]}
BINARY = [
    _binary(
        "binary header of 20 nines",
        {"inputs": [tensor("FP32", [1, 1, 1, 3], 12)]},
        bytes(12),
        400,
        "holds only",
        **{"Inference-Header-Content-Length": "9" * 20},
    ),
    _binary(
        "binary size of 2**62",
        {"inputs": [tensor("FP32", [1, 1, 1, 3], 2**62)]},
        bytes(12),
        400,
        "only 12 bytes",
    ),
    _binary(
        "binary 256 images of 4096 x 4096 in 48 bytes",
        {"inputs": [tensor("UINT8", [256, 4096, 4096, 3], 48)]},
        bytes(48),
        400,
        "needs 12,884,901,888 bytes",
    ),
    _binary(
        "binary BYTES element of 4 GiB",
        {"inputs": [tensor("BYTES", [1], 8, "image_bytes")]},
        b"\xff\xff\xff\xffabcd",
        400,
        "declares 4,294,967,295 bytes",
    ),
    Case(
        "binary UINT8 image over the pixel budget",
        INFER,
        lambda: binary_body(_OVER_BUDGET, bytes(4096 * 1100 * 3))[0],
        413,
        "over the budget",
        headers=binary_body(_OVER_BUDGET)[1],
    ),
    *(
        Case(f"unit: {name}", INFER, body, status, message, headers=headers)
        for name, body, headers, status, message in BAD_BINARY
        if name != "too many images"  # the unit suite's limit, not this server's
    ),
]


@pytest.mark.parametrize(
    "case",
    [c.param() for c in NESTING + ENCODING + PIXELS + ECHOES + HEADS + EARLIER + UNIT + BINARY],
)
def test_hostile_input_is_a_4xx_and_keeps_the_connection(server: str, case: Case) -> None:
    check_refused(server, case)


def test_a_quoted_value_is_an_excerpt(server: str) -> None:
    message = check_refused(server, ECHOES[0])
    assert "s" * 81 not in message
    assert len(message) < 300


def test_multipart_upload_with_hostile_names_and_parts(server: str) -> None:
    boundary = "hostile"
    parts = [
        (f'file"; filename="{"f" * 4000}.png', b"not an image"),
    ]
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
            for name, data in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    check_refused(
        server,
        Case("4,000-character file name", UPLOAD, body, 400, "not an image", headers=headers),
    )
    check_refused(
        server, Case("no files", UPLOAD, b"", 400, "", headers={"content-type": "text/plain"})
    )


# --- a slow or broken request head ----------------------------------------------------------


def _raw(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _read_until_closed(sock: socket.socket, deadline_s: float) -> bytes:
    data = b""
    sock.settimeout(deadline_s)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_head_sent_slowly_is_cut_off(server: str) -> None:
    """Slowloris: a byte of the head every half second, never finishing; the deadline holds."""
    sock = _raw(server)
    start = time.monotonic()
    gave_up_at = start + HEADER_TIMEOUT_S * 5
    try:
        sock.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() < gave_up_at:
            try:
                sock.sendall(b"X")
            except OSError:
                break
            if select.select([sock], [], [], 0.5)[0]:
                break
        cut_off = time.monotonic() < gave_up_at
        answer = _read_until_closed(sock, 10)
    finally:
        sock.close()
    record("slow head", _status(answer), answer.partition(b"\r\n\r\n")[2], closes=True)
    assert cut_off, "the server still read the head when the client gave up"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error"' in answer and b"did not arrive within" in answer


def test_a_head_growing_past_the_cap_is_cut_off(server: str) -> None:
    """A head that never ends, sent in pieces: h11 stops buffering it at the cap (431)."""
    sock = _raw(server)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        for _ in range(8):
            try:
                sock.sendall(b"x-pad: " + b"p" * (MAX_HEADER_BYTES // 2) + b"\r\n")
            except OSError:
                break
            if select.select([sock], [], [], 0.2)[0]:
                break
        answer = _read_until_closed(sock, 10)
    finally:
        sock.close()
    record("endless head", _status(answer), answer.partition(b"\r\n\r\n")[2], closes=True)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"are accepted" in answer


def _status(answer: bytes) -> int:
    head = answer[9:12]
    return int(head) if head.isdigit() else 0


def test_an_idle_connection_is_closed(server: str) -> None:
    sock = _raw(server)
    try:
        assert _read_until_closed(sock, HEADER_TIMEOUT_S * 5) == b""  # closed, nothing sent
    finally:
        sock.close()


def test_a_head_that_arrives_in_time_is_served_whatever_its_pace(server: str) -> None:
    """The deadline is on the head, not the connection: a keep-alive connection serves on."""
    with Connection(server) as connection:
        for _ in range(3):
            assert connection.send("POST", PREDICT, GOOD_BODY).status == 200
        sock = connection.socket
        time.sleep(HEADER_TIMEOUT_S / 4)  # idle within the deadline
        assert connection.send("POST", PREDICT, GOOD_BODY).status == 200
        assert connection.socket is sock


def test_a_malformed_request_line_is_answered_in_json(server: str) -> None:
    sock = _raw(server)
    try:
        sock.sendall(b"BREW /pot HTCPCP/1.0 \x00\r\n\r\n")
        answer = _read_until_closed(sock, 10)
    finally:
        sock.close()
    record("malformed request line", _status(answer), answer.partition(b"\r\n\r\n")[2], closes=True)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'{"error":' in answer


# --- property-based: generated hostile bodies on every JSON route ---------------------------


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same bodies on every run
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(route=st.sampled_from(JSON_ROUTES), data=st.data())
def test_generated_hostile_bodies_are_never_a_5xx(server: str, route: str, data: Any) -> None:
    body = data.draw(hostile_bodies(route_kind(route)), label="body")
    with Connection(server) as connection:
        answer = connection.send("POST", route, body)
        kept = connection.still_usable()
    record(f"generated for {route}", answer.status, answer.body, kept_connection=kept)
    assert 400 <= answer.status < 500, answer.body[:300]
    assert len(answer.body) <= MAX_ANSWER_BYTES
    answer.error()
    assert kept


# --- images: decompression bombs, the pixel budget, 16-bit PNGs, a mixed-size load -------------

BOMB_SIDE = 50_000
IMAGE_BUDGET = 2048 * 2048  # the per-image budget of this server's 32-pixel model (the floor)
REQUEST_BUDGET = 8 * IMAGE_BUDGET
IMAGE_ROUTES = ("predict", "classify", "upload", "v2 BYTES")
LARGE_REQUESTS = 8
SMALL_LIMIT_S = 2.0
"""Slowest answer allowed to a small request while large ones are in flight: generous."""


def _smooth(side: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (it compresses well, as photographs of tires do)."""
    y = np.arange(side, dtype=np.uint32)[:, None]
    x = np.arange(side, dtype=np.uint32)[None, :]
    channels = [(x * 255) // side + 0 * y, (y * 255) // side + 0 * x, ((x + y) * 255) // side]
    return np.stack([(c + seed) % 256 for c in channels], axis=2).astype(np.uint8)


def _encode(pixels: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    options = {"compress_level": 1} if kind == "PNG" else {}
    Image.fromarray(pixels).save(buffer, format=kind, **options)
    return buffer.getvalue()


def _bomb(kind: str) -> bytes:
    """A small valid PNG/JPEG/GIF whose header declares 50,000 x 50,000 pixels."""
    return header_bomb(_encode(_smooth(8), kind), kind, BOMB_SIDE, BOMB_SIDE)


def _image_case(name: str, route: str, images: list[bytes], status: int, message: str) -> Case:
    """``images`` sent the way ``route`` takes encoded images."""
    if route == "upload":
        boundary = "tire-images"
        parts = []
        for i, data in enumerate(images):
            head = (
                f"--{boundary}\r\nContent-Disposition: form-data; "
                f'name="file"; filename="tire{i}.img"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            parts.append(head.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        return Case(name, UPLOAD, body, status, message, headers=headers)
    if route == "classify":
        examples = [{"image_bytes": _b64(i)} for i in images]
        return Case(name, CLASSIFY, _j({"examples": examples}), status, message)
    if route == "v2 BYTES":
        text = [base64.b64encode(i).decode() for i in images]
        tensor = {"name": "image_bytes", "shape": [len(text)], "datatype": "BYTES", "data": text}
        return Case(name, INFER, _j({"inputs": [tensor]}), status, message)
    return Case(name, PREDICT, _j({"instances": [_b64(i) for i in images]}), status, message)


@functools.cache
def _over_budget_png() -> bytes:
    """2048 x 2049 pixels: 2,048 more than the budget of one image."""
    return _encode(_smooth(2049)[:, :2048], "PNG")


BOMB_MESSAGE = f"{BOMB_SIDE}x{BOMB_SIDE} pixels ({BOMB_SIDE**2:,}), over the budget of"
OVER_MESSAGE = f"2048x2049 pixels ({2048 * 2049:,}) is over the budget of"
PER_IMAGE = f"{IMAGE_BUDGET:,} pixels per image"
IMAGES = [
    *(
        _image_case(f"{kind} bomb, {route}", route, [_encode(_smooth(16), "PNG"), _bomb(kind)],
                    413, f"{BOMB_MESSAGE} {PER_IMAGE}")
        for kind in ("PNG", "JPEG", "GIF")
        for route in IMAGE_ROUTES
    ),
    *(
        _image_case(f"image over the budget, {route}", route, [_over_budget_png()], 413,
                    f"{OVER_MESSAGE} {PER_IMAGE}")
        for route in IMAGE_ROUTES
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", [c.param() for c in IMAGES])
def test_images_over_budget_are_a_4xx_before_decoding(server: str, case: Case) -> None:
    check_refused(server, case)


def test_a_request_over_the_pixel_budget_is_a_413(server: str) -> None:
    """Nine 2048 x 2048 PNGs, each within the per-image budget, together over the request's."""
    images = [_encode(_smooth(2048, seed), "PNG") for seed in range(9)]
    message = check_refused(
        server, _image_case("request over the budget", "predict", images, 413, "per request")
    )
    assert f"9 images hold {9 * IMAGE_BUDGET:,} pixels" in message
    assert f"{REQUEST_BUDGET:,} pixels per request" in message


def test_a_16_bit_png_predicts_what_its_8_bit_version_does(server: str) -> None:
    gray, colour = _smooth(48)[:, :, 0], _smooth(48, seed=7)
    pairs = {
        "16-bit grayscale PNG": (_encode(gray, "PNG"), png16(gray.astype(np.uint16) * 257)),
        "16-bit RGB PNG": (_encode(colour, "PNG"), png16(colour.astype(np.uint16) * 257)),
    }
    with Connection(server) as connection:
        for name, (eight, sixteen) in pairs.items():
            body = _j({"instances": [_b64(eight), _b64(sixteen)]})
            answer = connection.send("POST", PREDICT, body)
            record(name, answer.status, answer.body)
            assert answer.status == 200, answer.body[:300]
            low, high = json.loads(answer.body)["predictions"]
            assert np.allclose(low, high, atol=1e-5), (name, low, high)


def _memory_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field_name}")


def test_small_requests_stay_fast_while_large_ones_are_in_flight(
    serve_process: ManagedProcess,
) -> None:
    """8 concurrent requests of two large images each (4096 x 4096 PNGs: over the budget, 2048 x
    2048 PNGs: at it, 4096 x 4096 JPEGs: decoded at 1/8) while small requests keep coming: every
    small one answers 200 within a generous bound, no large one gets a 5xx, and the server's
    peak memory over the load alone (VmHWM of its own pid, reset first) goes to the summary."""
    url, pid = serve_process.url, serve_process.pid
    assert pid is not None
    large = {
        "4096 PNG": _j({"instances": [_b64(_encode(_smooth(4096, s), "PNG")) for s in (0, 1)]}),
        "2048 PNG": _j({"instances": [_b64(_encode(_smooth(2048, s), "PNG")) for s in (0, 1)]}),
        "4096 JPEG": _j({"instances": [_b64(_encode(_smooth(4096, s), "JPEG")) for s in (0, 1)]}),
    }
    kinds = list(large)
    small = _j({"instances": [_b64(_encode(_smooth(64), "PNG"))]})
    with Connection(url) as connection:  # warm: the first answer is not the measure
        assert connection.send("POST", PREDICT, small).status == 200
    before = _memory_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here

    answers: list[tuple[str, Answer]] = []

    def send_large(i: int) -> None:
        kind = kinds[i % len(kinds)]
        with Connection(url, timeout=300) as connection:
            answers.append((kind, connection.send("POST", PREDICT, large[kind])))

    threads = [threading.Thread(target=send_large, args=(i,)) for i in range(LARGE_REQUESTS)]
    for thread in threads:
        thread.start()
    latencies = []
    with Connection(url) as connection:
        while any(t.is_alive() for t in threads) and len(latencies) < 50:
            start = time.perf_counter()
            answer = connection.send("POST", PREDICT, small)
            latencies.append(time.perf_counter() - start)
            record("small request under load", answer.status, answer.body)
            assert answer.status == 200, answer.body[:300]
    for thread in threads:
        thread.join(timeout=300)
    peak = _memory_kib(pid, "VmHWM")
    SUMMARY.notes["peak server memory under the mixed-size load"] = (
        f"{peak / 1024:.0f} MiB (from {before / 1024:.0f} MiB at rest; {LARGE_REQUESTS} requests "
        f"of two large images, {len(latencies)} small ones, slowest {max(latencies):.2f} s)"
    )

    assert len(answers) == LARGE_REQUESTS
    for kind, answer in answers:
        record(f"large request: {kind}", answer.status, answer.body)
        if kind == "4096 PNG":  # 16.8 million pixels an image: refused from the header
            assert answer.status == 413 and f"{IMAGE_BUDGET:,} pixels per image" in answer.error()
        else:  # at the budget, or a JPEG decoded at 512 x 512
            assert answer.status == 200, (kind, answer.body[:300])
    assert latencies, "no small request went out while large ones were in flight"
    assert max(latencies) < SMALL_LIMIT_S, f"slowest small answers: {sorted(latencies)[-3:]} s"


# --- credentials: no answer, log line or Slack message carries one -----------------------------


@pytest.mark.parametrize("tracker", ["down", "refusing"])
def test_no_answer_log_line_or_slack_message_carries_a_credential(
    tracker: str, slack_receiver: SlackReceiver, tmp_path: Path
) -> None:
    """A credential in every setting; MLflow down (the alias cannot be looked up) or refusing
    (version 7 is named, then fails to load with MLflow quoting the tracking URI in full).
    Every endpoint is asked, and the answers, the server's log and Slack are searched."""
    secret = Secrets(f"S3cr3t{secrets.token_hex(6)}")
    for value in secret.values.values():
        watch(value)
    seen = server_without_its_tracker(tracker, secret, slack_receiver, tmp_path)

    others = 0
    for request, status, body in seen.answers:
        case = f"credentials, MLflow {tracker}: {request}"
        if 400 <= status < 500:
            record(case, status, body.encode())
        else:  # health, metrics, and the 503 that says why no model is loaded: searched too
            others += 1
            if secret.leaks(body):
                SUMMARY.credentials_seen.append(case)
    note = f"other answers searched for credentials, MLflow {tracker}"
    SUMMARY.notes[note] = f"{others} (2xx, and 503 while no model can be loaded)"

    statuses = {request: status for request, status, _ in seen.answers}
    assert statuses["GET /readyz"] == 503
    assert statuses[f"POST {PREDICT}"] == 503
    assert all(status < 500 or status == 503 for status in statuses.values()), statuses
    leaked = {request: secret.leaks(body) for request, _, body in seen.answers}
    assert {request: names for request, names in leaked.items() if names} == {}
    # Still useful: the answer names the server, without its password.
    said = {request: body for request, _, body in seen.answers}
    why = "GET /v1/models/tire" if tracker == "refusing" else "GET /readyz"
    assert "alice:***@127.0.0.1" in said[why], said[why]
    assert secret.leaks(seen.log) == []
    assert "alice:***@127.0.0.1" in seen.log
    assert all(secret.leaks(text) == [] for text in seen.slack), seen.slack
    if tracker == "refusing":
        assert seen.slack and "version 7" in seen.slack[0]
