"""The pipeline's task bodies run without Airflow: the sensor's check, resolution, idempotency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tirelib import pipeline
from tirelib.data import upload_version
from tirelib.errors import ConfigurationError, DataError, PromotionConflictError
from tirelib.settings import Settings
from tirelib.storage import ObjectStore
from tirelib.synth import generate

pytestmark = pytest.mark.integration


@dataclass
class Event:
    extra: dict


@pytest.fixture
def lake(tracked_env: Settings, tmp_path: Path) -> ObjectStore:
    store = ObjectStore.for_data(tracked_env)
    generate(tmp_path / "v1", 120, seed=3, size=64)
    upload_version(store, tmp_path / "v1", "v1", progress=False)
    return store


def test_the_sensor_sees_only_unprocessed_versions(lake: ObjectStore) -> None:
    assert pipeline.poke_new_versions() == ["v1"]
    assert pipeline.announce_versions() == {"version": "v1", "pending": ["v1"]}
    pipeline.mark_processed("v1", {"promotion": None})
    assert pipeline.poke_new_versions() == []
    assert pipeline.new_versions() == []
    with pytest.raises(DataError, match="no unprocessed version"):
        pipeline.announce_versions()


def test_resolution_from_an_event_or_params(lake: ObjectStore) -> None:
    events = {"tire_raw_data": [Event({"version": "v1", "pending": ["v1"]})]}
    jobs = pipeline.resolve_version({"model_types": ["cnn", "tinyvgg"], "epochs": 2}, events)
    assert [j["model_type"] for j in jobs] == ["cnn", "tinyvgg"]
    assert pipeline.version_of(jobs) == "v1"
    assert jobs[0]["epochs"] == 2
    pipeline.mark_processed("v1", {})
    # A duplicate event for a processed version: nothing to do, the run skips the rest.
    assert pipeline.resolve_version({}, events) == []
    # By hand, a processed version runs again.
    assert pipeline.version_of(pipeline.resolve_version({"dataset_version": "v1"})) == "v1"


def test_the_first_task_says_which_version_it_processes(
    lake: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    events = {"tire_raw_data": [Event({"version": "v1", "pending": ["v1"]})]}
    with caplog.at_level("INFO", logger="tirelib.pipeline"):
        pipeline.resolve_version({}, events)
    assert "processing dataset version v1 (from the sensor's asset event)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="tirelib.pipeline"):
        pipeline.resolve_version({"dataset_version": "v1"})
    assert "processing dataset version v1 (named in the run's params)" in caplog.text


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"dataset_version": "nope"}, DataError, "not found"),
        ({"dataset_version": "v1", "optimizer_type": "adagrad"}, ConfigurationError, "rmsprop"),
        ({"dataset_version": "v1", "model_types": ["vgg"]}, ConfigurationError, "choose one of"),
        ({"dataset_version": "v1", "epoch": 3}, ConfigurationError, "epoch=3: unknown key"),
        (
            {"dataset_version": "v1", "thresholds": {"acuracy": 0.9}},
            ConfigurationError,
            "thresholds.acuracy=0.9: unknown key",
        ),
        (
            {"dataset_version": "v1", "sweep": {"seed": list(range(40))}},
            ConfigurationError,
            "40 training jobs",
        ),
    ],
)
def test_bad_params_stop_before_any_work(
    lake: ObjectStore, params: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        pipeline.resolve_version(params)


def test_a_retried_step_makes_nothing_twice_and_a_sweep_trains_one_tagged_run_per_member(
    tracked_env: Settings, lake: ObjectStore
) -> None:
    assert pipeline.validate_data("v1")["images"] == 120
    first_split = pipeline.split("v1")
    assert pipeline.split("v1") == first_split
    params = {"dataset_version": "v1", "epochs": 1, "sweep": {"seed": [1, 2]}}
    jobs = pipeline.resolve_version(params)
    assert len(jobs) == 2
    trained = [pipeline.train(job) for job in jobs]
    assert trained[0]["run_id"] != trained[1]["run_id"]  # another job trains anew
    again = pipeline.train(jobs[1])  # a retry reuses its run
    assert again["run_id"] == trained[1]["run_id"]
    assert again["test_metrics"] == trained[1]["test_metrics"]
    client = MlflowClient(tracked_env.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(tracked_env.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 2
    tags = [client.get_run(t["run_id"]).data.tags for t in trained]
    assert {t["tire.sweep_id"] for t in tags} == {jobs[0]["sweep"]["id"]}
    assert [t["tire.sweep_index"] for t in tags] == ["0", "1"]
    assert [t["sweep"]["index"] for t in trained] == [0, 1]


def test_promote_judges_the_evaluate_result_and_refuses_stale_evidence(
    tracked_env: Settings, lake: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tirelib import registry
    from tirelib.registry import lifecycle

    off = {"accuracy": None, "f1": None}
    (job,) = pipeline.resolve_version({"dataset_version": "v1", "epochs": 1})
    trained = [pipeline.train(job), pipeline.train({**job, "seed": 7})]
    evaluation = pipeline.evaluate("v1", trained)
    assert evaluation["champion"] is None  # nothing serves yet
    assert [c["run_id"] for c in evaluation["challengers"]] == [t["run_id"] for t in trained]
    registered = pipeline.register(trained, off)
    staged = pipeline.stage(registered, "f1")
    assert staged["run_id"] in {t["run_id"] for t in trained}
    other = next(r["version"] for r in registered if r["version"] != staged["version"])

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("promote scored a model: it must judge the evaluate result")

    monkeypatch.setattr(lifecycle, "evaluate_model", no_scoring)
    # Production moves after evaluate scored (here: no champion); the evidence is stale.
    registry.produce(tracked_env, version=other, force=True)
    with pytest.raises(PromotionConflictError, match="against no production version"):
        pipeline.promote(staged, evaluation, "f1", off)
    serving = registry.info(tracked_env).production
    assert serving is not None and serving.version == other

    # Evaluated again (the champion scored once, in evaluate), the promotion is decided on it.
    evaluation = pipeline.evaluate("v1", trained)
    assert evaluation["champion"]["version"] == other
    result = pipeline.promote(staged, evaluation, "f1", off)
    comparison = result["comparison"]
    assert comparison["champion_version"] == other
    assert comparison["champion_metrics"] == evaluation["champion"]["metrics"]
    challenger = next(c for c in evaluation["challengers"] if c["run_id"] == staged["run_id"])
    assert comparison["candidate_metrics"] == challenger["metrics"]
    assert result["promoted"] is comparison["passed"]
    serving = registry.info(tracked_env).production
    assert serving is not None
    assert serving.version == (staged["version"] if result["promoted"] else other)
