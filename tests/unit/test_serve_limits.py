"""What the server refuses before any work: nesting depth, quoted excerpts, header caps."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tirelib.cli import app as cli
from tirelib.errors import DataError
from tirelib.serve.limits import (
    EXCERPT_CHARS,
    MAX_JSON_DEPTH,
    HeaderLimitMiddleware,
    check_json_depth,
    excerpt,
    shorten,
)

pytestmark = pytest.mark.unit


def test_an_excerpt_quotes_a_short_value_whole_and_cuts_a_long_one() -> None:
    assert excerpt("serving") == "'serving'"
    long = excerpt("s" * 64 * 2**20)
    assert long == repr("s" * EXCERPT_CHARS) + "... (67,108,864 characters)"
    assert excerpt(b"\xff" * 100).endswith("... (100 bytes)")
    assert excerpt([[0.5]] * 10**6) == "a list of 1,000,000 items"
    assert excerpt(10**400) == "an integer of 1329 bits"
    assert excerpt(None) == "None" and excerpt(True) == "True"


def test_a_message_is_shortened_saying_how_long_it_was() -> None:
    assert shorten("short") == "short"
    cut = shorten("m" * 5000, 100)
    assert cut.startswith("m" * 100) and cut.endswith("(5,000 characters in all)")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"instances": [[[[0.1, 0.2, 0.3]]]]}',
        json.dumps({"a": "[" * 1000}).encode(),  # brackets in a string are not nesting
        json.dumps({"a": '\\"[' * 200}).encode(),  # nor after escaped quotes
        b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH,
        b"[]" * 10_000,
    ],
)
def test_nesting_within_the_limit_passes(raw: bytes) -> None:
    check_json_depth(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
        b"[" * 100_000,  # not even closed
        json.dumps({"s": "]" * 100}).encode()[:-1] + b', "x": ' + b"[" * 65 + b"}",
    ],
)
def test_nesting_over_the_limit_is_refused_before_parsing(raw: bytes) -> None:
    with pytest.raises(DataError, match=f"nested more than {MAX_JSON_DEPTH} levels deep"):
        check_json_depth(raw)


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(HeaderLimitMiddleware, max_headers=20, max_header_bytes=2048)
    return app


def test_too_many_or_too_large_headers_are_a_json_431() -> None:
    with TestClient(_app()) as client:
        assert client.get("/").status_code == 200
        many = client.get("/", headers={f"x-{i}": "1" for i in range(30)})
        assert many.status_code == 431
        assert "at most 20 are accepted" in many.json()["error"]
        large = client.get("/", headers={"x-big": "b" * 3000})
        assert large.status_code == 431
        assert "at most 2,048 are accepted" in large.json()["error"]
        assert client.get("/").status_code == 200


def test_the_serve_command_takes_the_head_limits() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--header-timeout", "--max-header-bytes", "--max-headers"):
        assert option in result.output
