"""The registry without a server: thresholds, the gate's decisions, history, locks, the CLI."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tirelib import registry
from tirelib.cli import app, translate_legacy
from tirelib.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    RegistryError,
    RegistryUnavailableError,
    is_retryable,
)
from tirelib.registry import (
    Thresholds,
    applied_flags,
    best_version,
    decide,
    judge,
    libpq_url,
    model_lock,
)
from tirelib.registry.gate import check
from tirelib.registry.locks import lock_key
from tirelib.settings import load_settings
from tirelib.stack import free_port

pytestmark = pytest.mark.unit


def _metrics(**values: float) -> dict[str, float]:
    return {f"test_{name}": value for name, value in values.items()}


GOOD = _metrics(loss=0.30, accuracy=0.90, precision=0.88, recall=0.92, f1=0.90, roc_auc=0.95)


# --- thresholds ----------------------------------------------------------------------------


def test_default_thresholds_are_the_documented_ones() -> None:
    thresholds = Thresholds()
    assert thresholds.limits() == {"accuracy": 0.80, "f1": 0.75}
    assert thresholds.margin == 0.0
    assert thresholds.describe() == "accuracy >= 0.8, f1 >= 0.75"
    assert Thresholds.off().limits() == {}


def test_threshold_keys_accept_the_earlier_names() -> None:
    thresholds = Thresholds.parse({"Accuracy": 0.9, "F1": 0.8, "Loss": 0.5, "Margin": 0.01})
    assert thresholds.limits() == {"loss": 0.5, "accuracy": 0.9, "f1": 0.8}
    assert thresholds.margin == 0.01
    assert thresholds.describe() == "loss <= 0.5, accuracy >= 0.9, f1 >= 0.8"
    # Options left as None keep the defaults; a mapping value of None turns a check off.
    assert Thresholds.parse({"f1": None}, accuracy=None).limits() == {"accuracy": 0.80}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"accuracy": 1.5}, "accuracy=1.5: Input should be less than or equal to 1"),
        ({"f1": -0.1}, "f1=-0.1"),
        ({"loss": 0}, "loss=0: Input should be greater than 0"),
        ({"margin": -0.01}, "margin=-0.01"),
        ({"auc": 0.9}, "auc=0.9: Extra inputs are not permitted"),
    ],
)
def test_bad_thresholds_are_named_with_what_is_allowed(
    values: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigurationError, match="invalid thresholds") as error:
        Thresholds.parse(values)
    assert message in str(error.value)
    assert "allowed keys: loss, accuracy, precision, recall, f1, roc_auc, margin" in str(
        error.value
    )


# --- the gate ------------------------------------------------------------------------------


def test_floors_pass_and_fail_on_given_numbers() -> None:
    thresholds = Thresholds.parse({"accuracy": 0.85, "f1": 0.9, "loss": 0.4})
    assert check(thresholds, GOOD) == []
    reasons = check(thresholds, {**GOOD, "test_accuracy": 0.84, "test_loss": 0.41})
    assert len(reasons) == 2
    assert "test_loss value threshold check failed" in reasons[0]
    assert "test_accuracy value threshold check failed" in reasons[1]
    assert "was missing" in check(thresholds, {"test_accuracy": 0.9, "test_loss": 0.1})[0]


def test_the_first_model_needs_only_the_floors() -> None:
    decision = decide(GOOD, None, metric="f1", thresholds=Thresholds())
    assert decision.passed and decision.meets_thresholds
    assert decision.beats_champion is None
    low = decide({**GOOD, "test_f1": 0.5}, None, metric="f1", thresholds=Thresholds())
    assert not low.passed and not low.meets_thresholds


@pytest.mark.parametrize(
    ("metric", "candidate", "champion", "wins"),
    [
        ("f1", 0.91, 0.90, True),
        ("F1", 0.89, 0.90, False),
        ("accuracy", 0.95, 0.90, True),
        ("Accuracy", 0.85, 0.90, False),
        ("precision", 0.70, 0.90, False),
        ("Recall", 0.99, 0.90, True),
        # Lower is better for loss: a smaller loss wins, a larger one is a drop.
        ("loss", 0.20, 0.30, True),
        ("Loss", 0.40, 0.30, False),
    ],
)
def test_a_challenger_must_beat_the_champion_in_the_named_metric(
    metric: str, candidate: float, champion: float, wins: bool
) -> None:
    name = metric.lower()
    decision = decide(
        {**GOOD, f"test_{name}": candidate},
        {**GOOD, f"test_{name}": champion},
        metric=metric,
        thresholds=Thresholds.off(),
    )
    assert decision.beats_champion is wins
    assert decision.passed is wins
    if not wins:
        assert f"test_{name}" in decision.reasons[0]


def test_the_margin_is_a_minimum_absolute_improvement() -> None:
    champion = {**GOOD, "test_f1": 0.80, "test_loss": 0.50}
    margin = Thresholds.off(margin=0.05)
    assert decide({**GOOD, "test_f1": 0.86}, champion, metric="f1", thresholds=margin).passed
    assert not decide({**GOOD, "test_f1": 0.84}, champion, metric="f1", thresholds=margin).passed
    assert decide({**GOOD, "test_loss": 0.44}, champion, metric="loss", thresholds=margin).passed
    assert not decide(
        {**GOOD, "test_loss": 0.46}, champion, metric="loss", thresholds=margin
    ).passed
    # With no margin a tie keeps "at least as good" and passes.
    tie = decide({**GOOD, "test_f1": 0.80}, champion, metric="f1", thresholds=Thresholds.off())
    assert tie.passed


def test_a_candidate_must_meet_the_floors_even_when_it_beats_the_champion() -> None:
    weak_champion = {**GOOD, "test_f1": 0.50}
    decision = decide(
        {**GOOD, "test_f1": 0.70}, weak_champion, metric="f1", thresholds=Thresholds()
    )
    assert decision.beats_champion is True
    assert not decision.meets_thresholds and not decision.passed


def test_an_unknown_metric_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigurationError, match="allowed: loss, accuracy"):
        decide(GOOD, None, metric="auc", thresholds=Thresholds())


# --- the best version ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "candidates", "best"),
    [
        ("f1", {"1": {"test_f1": 0.8}, "2": {"test_f1": 0.9}, "3": {"test_f1": 0.7}}, "2"),
        # Lower is better for loss.
        ("loss", {"1": {"test_loss": 0.2}, "2": {"test_loss": 0.3}}, "1"),
        # Ties go to the newest version, by number (not by text: "10" is newer than "9").
        ("f1", {"9": {"test_f1": 0.9}, "10": {"test_f1": 0.9}, "3": {"test_f1": 0.9}}, "10"),
        ("Loss", {"4": {"test_loss": 0.2}, "2": {"test_loss": 0.2}}, "4"),
        # A missing, non-numeric or non-finite metric is never best, even for loss.
        ("f1", {"1": {"test_f1": 0.1}, "2": {}, "3": {"test_accuracy": 1.0}}, "1"),
        ("loss", {"1": {"test_loss": 0.9}, "2": {"test_loss": None}}, "1"),
        ("loss", {"1": {"test_loss": 0.9}, "2": {"test_loss": math.nan}}, "1"),
        ("f1", {"1": {"test_f1": 0.5}, "2": {"test_f1": math.inf}}, "1"),
        ("f1", {"1": {"test_f1": 0.5}, "2": {"test_f1": "n/a"}}, "1"),
        # Version tags hold text.
        ("accuracy", {"1": {"test_accuracy": "0.91"}, "2": {"test_accuracy": "0.9"}}, "1"),
        # Nothing to choose from.
        ("f1", {"1": {"test_accuracy": 0.9}}, None),
        ("f1", {}, None),
    ],
)
def test_one_function_chooses_the_best_version(
    metric: str, candidates: dict[str, dict[str, object]], best: str | None
) -> None:
    assert best_version(candidates, metric) == best


def test_the_pipeline_has_no_choice_of_its_own() -> None:
    from tirelib import pipeline

    assert not hasattr(pipeline, "_best")


def test_judge_turns_measured_metrics_into_a_comparison() -> None:
    comparison = judge(
        model_name="m",
        dataset_version="v1",
        candidate_version="3",
        candidate_metrics={**GOOD, "test_f1": 0.92},
        champion_version="2",
        champion_metrics={**GOOD, "test_f1": 0.90},
        metric="F1",
        thresholds=Thresholds.off(margin=0.01),
    )
    assert comparison.passed and comparison.champion_version == "2"
    assert comparison.metric == "f1"
    assert comparison.difference == pytest.approx(0.02)
    worse = judge(
        model_name="m",
        dataset_version="v1",
        candidate_version="3",
        candidate_metrics={**GOOD, "test_f1": 0.905},
        champion_version="2",
        champion_metrics={**GOOD, "test_f1": 0.90},
        thresholds=Thresholds.off(margin=0.01),
    )
    assert not worse.passed and worse.metric_drop
    first = judge(
        model_name="m",
        dataset_version="v1",
        candidate_version="1",
        candidate_metrics=GOOD,
        champion_version=None,
        champion_metrics=None,
    )
    assert first.passed and first.champion_version is None and first.beats_champion is None
    with pytest.raises(ConfigurationError, match="both the champion's version and its metrics"):
        judge(
            model_name="m",
            dataset_version="v1",
            candidate_version="1",
            candidate_metrics=GOOD,
            champion_version="2",
            champion_metrics=None,
        )


# --- history -------------------------------------------------------------------------------


def test_history_events_are_applied_when_the_chain_confirms_them() -> None:
    events: list[dict[str, str | None]] = [
        {"version": "1", "previous": None},
        {"version": "2", "previous": "1"},  # interrupted before the alias moved
        {"version": "2", "previous": "1"},  # the retry
        {"version": "1", "previous": "2"},  # a rollback
    ]
    assert applied_flags(events, production="1") == [True, False, True, True]
    assert applied_flags(events, production="2") == [True, False, True, False]
    assert applied_flags([], production=None) == []


# --- locks ---------------------------------------------------------------------------------


def test_sqlalchemy_urls_become_libpq_urls() -> None:
    assert libpq_url("postgresql+psycopg2://u:p@h:5432/db") == "postgresql://u:p@h:5432/db"
    assert libpq_url("postgres://h/db") == "postgresql://h/db"
    assert libpq_url("postgresql://h/db") == "postgresql://h/db"


def test_lock_keys_are_stable_signed_64_bit_numbers() -> None:
    key = lock_key("tire-defect-classifier")
    assert key == lock_key("tire-defect-classifier")
    assert key != lock_key("another-model")
    assert -(2**63) <= key < 2**63


def test_the_file_lock_serialises_threads(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, database_url=None)
    order: list[str] = []

    def other() -> None:
        with model_lock(settings):
            order.append("other")

    with model_lock(settings) as what:
        assert str(tmp_path / "locks") in what
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)  # the other thread waits meanwhile
        order.append("first")
    thread.join(10)
    assert order == ["first", "other"]


def test_a_held_file_lock_times_out_with_a_clear_message(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, database_url=None)
    with model_lock(settings):
        errors: list[Exception] = []

        def waiter() -> None:
            try:
                with model_lock(settings, timeout=0.3):
                    pass
            except RegistryError as error:
                errors.append(error)

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(10)
    assert errors and "held the lock file" in str(errors[0])


# --- no server -----------------------------------------------------------------------------


def test_a_server_that_is_down_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}"
    settings = load_settings(home=tmp_path, mlflow_tracking_uri=url)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as error:
        registry.info(settings)
    assert f"cannot reach the MLflow tracking server at {url}" in str(error.value)
    assert time.monotonic() - started < 30


def test_configure_sets_retry_defaults_without_overriding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in registry.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    registry.configure(load_settings(home=tmp_path))
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


class _Answer(BaseHTTPRequestHandler):
    """A tracking server that answers every request with one fixed status and body."""

    status = 503
    body = b"unavailable"
    content_type = "text/plain"

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering(request: pytest.FixtureRequest) -> Iterator[int]:
    """A loopback server answering with ``(status, body)`` from the test's parameter; its port."""
    status, body = request.param
    handler = type(
        "Handler",
        (_Answer,),
        {
            "status": status,
            "body": body if isinstance(body, bytes) else json.dumps(body).encode(),
            "content_type": "text/plain" if isinstance(body, bytes) else "application/json",
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    ("answering", "unavailable"),
    [
        ((503, b"<html>Service Unavailable</html>"), True),
        ((502, b"bad gateway"), True),
        ((429, b"slow down"), True),
        ((500, {"error_code": "INTERNAL_ERROR", "message": "database restarted"}), True),
        ((403, b"<html>Forbidden</html>"), False),
        ((401, b"who are you"), False),
        ((400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"}), False),
    ],
    indirect=["answering"],
    ids=["503", "502", "429", "500-json", "403", "401", "400-json"],
)
def test_mlflow_errors_are_classified_where_they_enter(
    answering: int, unavailable: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://tire:s3cret-pw@127.0.0.1:{answering}"
    settings = load_settings(home=tmp_path, mlflow_tracking_uri=url)
    with pytest.raises(RegistryError) as raised:
        registry.info(settings)
    error = raised.value
    assert isinstance(error, RegistryUnavailableError) is unavailable
    assert is_retryable(error) is unavailable
    assert "s3cret-pw" not in str(error)
    assert f"tire:***@127.0.0.1:{answering}" in str(error)
    if not unavailable:
        assert "refused reading the registry" in str(error)


def test_a_database_that_is_down_is_retryable_and_its_password_hidden(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://tire:s3cret-pw@127.0.0.1:{free_port()}/mlflow"
    settings = load_settings(home=tmp_path, database_url=url)
    with pytest.raises(DatabaseUnavailableError) as raised, model_lock(settings):
        pass
    assert is_retryable(raised.value)
    assert "s3cret-pw" not in str(raised.value)
    assert "PostgreSQL at postgresql+psycopg2://tire:***@127.0.0.1" in str(raised.value)


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["Stage", "Loss"], ["registry", "stage", "--metric", "Loss"]),
        (["Produce", "Loss"], ["registry", "produce", "--metric", "Loss"]),
        (["Produce", "F1", "--force"], ["registry", "produce", "--metric", "F1", "--force"]),
        (["Stage", "--metric", "f1"], ["registry", "stage", "--metric", "f1"]),
        (["ProductionInfo"], ["registry", "info"]),
        (["Produce"], ["registry", "produce"]),
        (["registry", "stage", "Loss"], ["registry", "stage", "Loss"]),
    ],
)
def test_the_earlier_registry_spellings_are_translated(
    argv: list[str], expected: list[str]
) -> None:
    assert translate_legacy(argv) == expected


def test_the_registry_commands_are_mounted() -> None:
    result = CliRunner().invoke(app, ["registry", "--help"])
    assert result.exit_code == 0
    for command in ["register", "compare", "stage", "produce", "info", "history", "rollback"]:
        assert command in result.output


def test_a_bad_metric_stops_before_any_server_call(tmp_path: Path) -> None:
    from tirelib.cli import main

    with pytest.raises(SystemExit) as done:
        main(["registry", "stage", "--metric", "auc"])
    assert done.value.code == 2
