"""Errors are classified where they enter tirelib, and Airflow's retry policy follows the classes.

An outage (S3, MLflow, PostgreSQL unreachable, 5xx, throttling) is retried; bad data and bad
parameters fail at once. Real clients against a closed port show the classification end to end.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from mlflow.exceptions import MlflowException, RestException

from tirelib import errors, tracking
from tirelib.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    DataError,
    ImageTooLargeError,
    PrometheusUnavailableError,
    PromotionConflictError,
    RegistryError,
    RegistryUnavailableError,
    ServiceUnavailableError,
    StackError,
    StorageError,
    StorageUnavailableError,
    TirelibError,
    VersionExistsError,
    is_retryable,
)
from tirelib.settings import load_settings
from tirelib.stack import free_port
from tirelib.storage import ObjectStore, classify, is_transient, s3_client

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# What Airflow does with each error class: every class in tirelib.errors is listed, so a new one
# needs a decision here.
DECISIONS = {
    ServiceUnavailableError: "retry",
    StorageUnavailableError: "retry",
    RegistryUnavailableError: "retry",
    DatabaseUnavailableError: "retry",
    PrometheusUnavailableError: "retry",
    DataError: "fail",
    VersionExistsError: "fail",
    ImageTooLargeError: "fail",
    ConfigurationError: "fail",
    # Stale evidence: retrying promote would judge the same evaluate result again.
    PromotionConflictError: "fail",
    # Neither an outage nor bad input: the task's ordinary retries.
    TirelibError: "default",
    StorageError: "default",
    RegistryError: "default",
    StackError: "default",
}


def _policy():  # imported lazily: Airflow's SDK is slow to import
    from tirelib.orchestration import RETRY_POLICY

    return RETRY_POLICY


def test_every_error_class_has_a_decision() -> None:
    classes = {
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, TirelibError)
    }
    assert classes == set(DECISIONS)


@pytest.mark.parametrize("error_class", list(DECISIONS), ids=lambda c: c.__name__)
def test_the_retry_policy_retries_outages_and_fails_bad_input_at_once(
    error_class: type[TirelibError],
) -> None:
    from airflow.sdk import ExceptionRetryPolicy

    expected = DECISIONS[error_class]
    policy = _policy()
    decision = policy.evaluate(error_class("boom"), try_number=1, max_tries=4)
    assert decision.action.value == expected
    # The policy survives a serialization round trip with the same decision.
    again = ExceptionRetryPolicy.deserialize(policy.serialize())
    assert again.evaluate(error_class("boom"), try_number=1, max_tries=4).action.value == expected
    assert is_retryable(error_class("boom")) == (expected == "retry")


def test_errors_of_other_libraries_get_the_ordinary_retries() -> None:
    decision = _policy().evaluate(RuntimeError("a bug"), try_number=1, max_tries=4)
    assert decision.action.value == "default"


def test_is_retryable_follows_causes() -> None:
    try:
        try:
            raise StorageUnavailableError("S3 down")
        except StorageUnavailableError as outage:
            raise RuntimeError("wrapped") from outage
    except RuntimeError as error:
        assert is_retryable(error)
    assert not is_retryable(RuntimeError("plain"))


# --- S3 (botocore) ---------------------------------------------------------------------------


def _client_error(code: str, status: int) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ResponseStreamingError(error="IncompleteRead"), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("TooManyRequests", 429), True),
        (_client_error("RequestTimeout", 400), True),  # transient by its code alone
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("InvalidAccessKeyId", 403), False),
        (SSLError(endpoint_url="https://127.0.0.1:1", error="bad certificate"), False),
        (NoCredentialsError(), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_s3_errors_are_told_apart(error: Exception, transient: bool) -> None:
    assert is_transient(error) == transient
    classified = classify(error, "read", "s3://b/k", "http://key:secret@127.0.0.1:8333")
    assert isinstance(classified, StorageUnavailableError) == transient
    assert isinstance(classified, StorageError)
    assert "s3://b/k" in str(classified)
    assert "secret" not in str(classified)
    assert "127.0.0.1:8333" in str(classified)


def test_an_unreachable_store_raises_a_retryable_error(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path,
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nobody listens there
        s3_max_attempts=1,
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    store = ObjectStore(s3_client(settings), "tire-data")
    with pytest.raises(StorageUnavailableError, match="cannot reach S3") as caught:
        store.get_bytes("raw/v1/_manifest.json")
    assert is_retryable(caught.value)
    with pytest.raises(StorageUnavailableError):
        store.put_bytes("raw/v1/x.png", b"x")
    with pytest.raises(StorageUnavailableError):
        list(store.iter_objects("raw/"))


# --- MLflow ----------------------------------------------------------------------------------


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        (
            MlflowException(
                "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed with "
                "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"
            ),
            True,
        ),
        (
            MlflowException(
                "API request to http://127.0.0.1:5000/api/2.0/x failed with timeout exception "
                "Read timed out."
            ),
            True,
        ),
        (
            MlflowException(
                "API request to endpoint /api/2.0/x failed with error code 503 != 200. "
                "Response body: 'upstream down'"
            ),
            True,
        ),
        (
            MlflowException(
                "API request to endpoint /api/2.0/x failed with error code 404 != 200. "
                "Response body: 'not found'"
            ),
            False,
        ),
        (
            MlflowException(
                "The following failures occurred while downloading one or more artifacts from "
                "mlflow-artifacts:/1/m/artifacts:\n##### File model.pt #####\nAPI request to "
                "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/x failed with "
                "exception Connection refused"
            ),
            True,
        ),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "db down"}), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "later"}), True),
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow"}), True),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no model"}), False),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}), False),
        (MlflowException("Not a proper models:/ URI"), False),  # raised without any request
        (requests.ConnectionError("refused"), True),
        (requests.Timeout("slow"), True),
        (_http_error(502), True),
        (_http_error(404), False),
        (ValueError("a bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_mlflow_errors_are_told_apart(error: Exception, unreachable: bool) -> None:
    assert tracking.server_unreachable(error) == unreachable


def test_outages_become_retryable_and_refusals_pass_unchanged() -> None:
    uri = "http://user:secret@127.0.0.1:5000"
    with (
        pytest.raises(RegistryUnavailableError, match="while reading run r1") as caught,
        tracking.outages_are_retryable(uri, "reading run r1"),
    ):
        raise requests.ConnectionError("refused")
    assert "secret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    refusal = RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"})
    with pytest.raises(RestException), tracking.outages_are_retryable(uri, "reading run r1"):
        raise refusal


def test_evaluation_with_mlflow_down_is_retryable_not_bad_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, any MlflowException in evaluation became a DataError, failed at once."""
    from tirelib.evaluate import evaluate_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    settings = load_settings(home=tmp_path, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryUnavailableError, match="cannot reach the MLflow") as caught:
        evaluate_run("0123456789abcdef", settings)
    assert is_retryable(caught.value)
    assert _policy().evaluate(caught.value, try_number=1, max_tries=4).action.value == "retry"


# --- the DAG ---------------------------------------------------------------------------------

PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from tirelib.orchestration import RETRY_POLICY
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags["tire_training_pipeline"]
print(json.dumps({
    t.task_id: {"retries": t.retries, "policy": t.retry_policy is RETRY_POLICY} for t in dag.tasks
}))
"""


def test_every_task_of_the_training_pipeline_retries_outages(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import json

    home = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "dags" / "tire_training_pipeline.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"evaluate", "register", "promote", "train"} <= set(tasks)
    for task_id, task in tasks.items():
        assert task["policy"], f"{task_id} has no retry policy"
        assert task["retries"] >= 1, f"{task_id} is never retried"
    # Tasks that only read, or find their earlier result, retry like any I/O task.
    assert tasks["evaluate"]["retries"] == tasks["register"]["retries"]
