"""Version states, what ingestion keeps out, and how a failure is told: decisions, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tirelib.data import VersionInfo, VersionState, _object_problem, decide_state
from tirelib.errors import (
    ConfigurationError,
    DataError,
    RegistryUnavailableError,
    StorageUnavailableError,
)
from tirelib.pipeline import TaskFailure

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("marks", "expected"),
    [
        ({}, VersionState.NEW),
        ({"processing": True}, VersionState.PROCESSING),
        ({"processed": True}, VersionState.PROCESSED),
        ({"failed": True}, VersionState.FAILED),
        # A later run of a processed version failed: the failure is what an operator must see.
        ({"processed": True, "failed": True}, VersionState.FAILED),
        ({"processed": True, "processing": True}, VersionState.PROCESSED),
    ],
)
def test_markers_decide_the_state_of_a_complete_version(
    marks: dict[str, bool], expected: VersionState
) -> None:
    assert decide_state(complete=True, **marks) is expected


@pytest.mark.parametrize(
    ("age_s", "settle_s", "expected"),
    [
        (5, 120, VersionState.UPLOADING),
        (119, 120, VersionState.UPLOADING),
        (120, 120, VersionState.NEW),
        (3600, 120, VersionState.NEW),
        (0, 0, VersionState.NEW),
    ],
)
def test_a_version_without_manifest_is_uploading_until_it_settles(
    age_s: int, settle_s: int, expected: VersionState
) -> None:
    changed = NOW - timedelta(seconds=age_s)
    state = decide_state(complete=False, last_change=changed, now=NOW, settle_seconds=settle_s)
    assert state is expected


def test_an_unfinished_tirelib_upload_stays_uploading_however_old() -> None:
    long_ago = NOW - timedelta(days=3)
    state = decide_state(
        complete=False, last_change=long_ago, now=NOW, settle_seconds=120, upload_open=True
    )
    assert state is VersionState.UPLOADING


def test_a_failed_mark_holds_even_while_objects_still_arrive() -> None:
    state = decide_state(complete=False, failed=True, last_change=NOW, now=NOW, settle_seconds=120)
    assert state is VersionState.FAILED


def test_versions_are_ordered_by_creation_then_by_last_upload() -> None:
    infos = [
        VersionInfo("b", True, False, created_at="2026-11-30T10:00:00Z"),
        VersionInfo("c", False, False, last_change="2026-11-30T09:00:00Z"),
        VersionInfo("a", True, False, created_at="2026-11-30T10:00:00Z"),
    ]
    assert [i.version for i in sorted(infos, key=lambda i: i.order)] == ["c", "a", "b"]


@pytest.mark.parametrize(
    ("relative", "size", "reason"),
    [
        ("good/img.png", 10, None),
        ("good/sub/img.png", 10, None),
        ("readme.txt", 10, "not in a label folder"),
        ("good/.DS_Store", 10, "hidden file"),
        (".git/good/x.png", 10, "hidden file"),
        ("good/.hidden/x.png", 10, "hidden file"),
        ("bad label/x.png", 10, "label folder name not allowed"),
        ("good/empty.png", 0, "zero-byte file"),
    ],
)
def test_ingestion_keeps_out_what_cannot_be_an_image_by_its_key(
    relative: str, size: int, reason: str | None
) -> None:
    problem = _object_problem(relative, size)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason)


def _failure(error: BaseException, try_number: int = 1, max_tries: int = 3) -> TaskFailure:
    return TaskFailure(
        dag_id="tire_training_pipeline",
        task_id="validate_data",
        error=error,
        run_id="manual__1",
        try_number=try_number,
        max_tries=max_tries,
        log_url="http://airflow/log",
        version="v1",
    )


def test_bad_input_is_told_as_failed_at_once_never_as_try_1_of_4() -> None:
    failure = _failure(DataError("version 'v1' has labels ['good']"))
    assert failure.kind == "bad_input"
    assert failure.outcome() == "failed at once: bad input, a retry cannot help"
    assert "1 of" not in failure.outcome()
    assert _failure(ConfigurationError("bad epochs")).kind == "bad_input"


def test_an_outage_is_told_with_its_tries_and_service() -> None:
    failure = _failure(StorageUnavailableError("connection refused"), try_number=4)
    assert failure.kind == "infrastructure"
    assert failure.service == "S3"
    assert failure.outcome() == "failed for good after 4 tries: S3 stayed unreachable"


def test_the_service_is_found_behind_a_wrapping_error() -> None:
    try:
        try:
            raise RegistryUnavailableError("MLflow answered 503")
        except RegistryUnavailableError as cause:
            raise RuntimeError("promotion did not finish") from cause
    except RuntimeError as error:
        failure = _failure(error, try_number=2, max_tries=1)
    assert failure.service == "MLflow"
    assert failure.outcome() == "failed for good after 2 tries: MLflow stayed unreachable"


def test_an_unclassified_error_with_tries_left_was_not_retried() -> None:
    assert _failure(RuntimeError("boom")).outcome() == "failed at once, not retried"
    assert _failure(RuntimeError("boom"), try_number=1, max_tries=0).outcome() == (
        "failed for good after 1 try"
    )


def test_the_failed_marker_names_reason_task_run_and_error_class() -> None:
    marker = _failure(StorageUnavailableError("timeout"), try_number=4).marker()
    assert marker["reason"] == "StorageUnavailableError: timeout"
    assert marker["error"] == "tirelib.errors.StorageUnavailableError"
    assert (marker["kind"], marker["service"], marker["tries"]) == ("infrastructure", "S3", 4)
    assert (marker["task"], marker["run_id"], marker["run_url"]) == (
        "validate_data",
        "manual__1",
        "http://airflow/log",
    )


class _TaskInstance:
    """The few attributes of Airflow's RuntimeTaskInstance the failure callback reads."""

    def __init__(self, task_id: str, jobs: list[dict] | None, map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.map_index = "tire_training_pipeline", task_id, map_index
        self.run_id, self.try_number, self.max_tries = "asset_triggered__1", 1, 3
        self.log_url = "http://airflow/dags/tire_training_pipeline/runs/1"
        self._jobs = jobs

    def xcom_pull(self, task_ids: str) -> list[dict] | None:
        assert task_ids == "resolve_version"
        return self._jobs


class _Dag:
    task_ids = ("resolve_version", "validate_data", "train")


class _Event:
    def __init__(self, version: str) -> None:
        self.extra = {"version": version, "pending": [version]}


@pytest.fixture
def told(monkeypatch: pytest.MonkeyPatch) -> list[TaskFailure]:
    from tirelib import pipeline

    failures: list[TaskFailure] = []
    monkeypatch.setattr(pipeline, "version_failed", lambda failure: failures.append(failure))
    return failures


def test_the_callback_takes_the_version_resolve_version_chose(told: list[TaskFailure]) -> None:
    from tirelib.orchestration import on_task_failure

    jobs = [{"dataset_version": "v7", "model_type": "cnn"}]
    ti = _TaskInstance("train", jobs, map_index=0)
    error = DataError("too few images")
    on_task_failure({"ti": ti, "dag": _Dag(), "exception": error, "params": {}})
    (failure,) = told
    assert (failure.version, failure.task_id, failure.error) == ("v7", "train[0]", error)
    assert (failure.try_number, failure.max_tries, failure.log_url) == (1, 3, ti.log_url)


@pytest.mark.parametrize(
    ("params", "events", "version"),
    [
        ({"dataset_version": "v8"}, {}, "v8"),
        ({}, {"tire_raw_data": [_Event("v9")]}, "v9"),
        ({}, {}, None),
    ],
)
def test_when_resolve_version_fails_the_run_s_own_version_is_used(
    told: list[TaskFailure], params: dict, events: dict, version: str | None
) -> None:
    from tirelib.orchestration import on_task_failure

    context = {
        "ti": _TaskInstance("resolve_version", None),
        "dag": _Dag(),
        "exception": StorageUnavailableError("connection refused"),
        "params": params,
        "triggering_asset_events": events,
    }
    on_task_failure(context)
    assert told[0].version == version
