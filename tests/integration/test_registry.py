"""The model registry against a real MLflow server (PostgreSQL backend, S3 artifacts).

Training is slow here, so the runs are made once per module (:func:`world`): one trained model
and a few hand-made ones whose behaviour is certain. A network whose last layer is zeroed with a
bias towards one class always predicts that class: "always defective" (mild) beats "always good"
(confident) on F1, precision, recall and loss, whatever the images. Runs whose metrics are set by
hand give stage an exact ranking. Each test registers what it needs under its own model name.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from typer.testing import CliRunner

from tests.cli import tirelib
from tests.conftest import S3Server, module_env
from tirelib import registry, tracking
from tirelib.cli import app
from tirelib.data import ensure_splits, upload_version
from tirelib.errors import PromotionConflictError, RegistryError, RegistryUnavailableError
from tirelib.evaluate import MODEL_URI_TAG, evaluate_model
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.registry import PRODUCTION, STAGING, Thresholds, lifecycle
from tirelib.registry.client import RegistryClient
from tirelib.settings import Settings, get_settings, load_settings, reset_settings
from tirelib.stack import Component, create_buckets, free_port, mlflow_component
from tirelib.storage import ObjectStore
from tirelib.synth import generate
from tirelib.train import make_config, train

pytestmark = pytest.mark.integration

VERSION = "reg-1"
OFF = Thresholds.off()
_NORM = (get_spec("cnn").mean, get_spec("cnn").std)

# Hand-set test metrics: the best by loss is B, by accuracy C, by precision B, by recall A, by f1 B.
RANKED = {
    "a": {"loss": 0.30, "accuracy": 0.90, "precision": 0.80, "recall": 0.95, "f1": 0.85},
    "b": {"loss": 0.20, "accuracy": 0.88, "precision": 0.95, "recall": 0.80, "f1": 0.86},
    "c": {"loss": 0.40, "accuracy": 0.92, "precision": 0.85, "recall": 0.85, "f1": 0.84},
}


@dataclass(frozen=True)
class World:
    settings: Settings
    database_url: str
    classes: list[str]
    trained: str  # run ids
    defective: str
    good: str
    ranked: dict[str, str]


def constant_network(classes: list[str], favour: str, confidence: float) -> nn.Module:
    """A cnn that always predicts ``favour`` with softmax logit gap ``confidence``."""
    network = get_model("cnn", num_classes=len(classes))
    head = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[classes.index(favour)] = confidence
    return network.eval()


def log_run(
    settings: Settings,
    network: nn.Module,
    classes: list[str],
    metrics: dict[str, float] | None = None,
) -> str:
    """A run like `tirelib train` makes; its test metrics are ``metrics`` or really measured."""
    tracking.configure(settings)
    spec = get_spec("cnn")
    with mlflow.start_run(tags={"dataset_version": VERSION, "model_type": "cnn"}) as run:
        mlflow.log_params({"dataset_version": VERSION, "model_type": "cnn"})
        uri = tracking.log_model(
            network,
            model_type="cnn",
            classes=classes,
            prep=Preprocessing(64, spec.mean, spec.std),
        )
        mlflow.set_tag(MODEL_URI_TAG, uri)
        if metrics is None:
            metrics = evaluate_model(uri, VERSION, settings).flat()
        mlflow.log_metrics(metrics)
    return str(run.info.run_id)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    mlflow_server: str,
    pg_database_url: str,
) -> Iterator[World]:
    """One dataset version and the module's runs, made once (a module-scoped environment)."""
    root = tmp_path_factory.mktemp("registry")
    with module_env(root, s3_server, mlflow_server, "registry") as settings:
        generate(root / "synth", 100, seed=11, size=64)
        store = ObjectStore.for_data(settings)
        upload_version(store, root / "synth", VERSION, progress=False)
        classes = ensure_splits(store, VERSION)["test"].classes
        config = make_config(dataset_version=VERSION, model_type="cnn", epochs=2, batch_size=16)
        trained = train(config, settings, progress=False).run_id
        assert trained is not None
        defective = log_run(settings, constant_network(classes, "defective", 1.0), classes)
        good = log_run(settings, constant_network(classes, "good", 6.0), classes)
        ranked = {
            key: log_run(
                settings,
                constant_network(classes, "defective", 1.0),
                classes,
                {f"test_{name}": value for name, value in values.items()},
            )
            for key, values in RANKED.items()
        }
        yield World(settings, pg_database_url, classes, trained, defective, good, ranked)


@pytest.fixture
def reg(world: World, tracked_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``tracked_env`` (a registered model of this test's own) on the module's data, with the
    PostgreSQL advisory lock on (``TIRE_DATABASE_URL``)."""
    monkeypatch.setenv("TIRE_DATA_BUCKET", world.settings.data_bucket)
    monkeypatch.setenv("TIRE_CACHE_DIR", str(world.settings.resolved_cache_dir))
    monkeypatch.setenv("TIRE_DATABASE_URL", world.database_url)
    reset_settings()
    return get_settings()


def client(settings: Settings) -> MlflowClient:
    return MlflowClient(settings.mlflow_tracking_uri)


def aliases(settings: Settings) -> dict[str, str]:
    return dict(client(settings).get_registered_model(settings.model_name).aliases)


def tags(settings: Settings, version: str) -> dict[str, str]:
    return dict(client(settings).get_model_version(settings.model_name, version).tags)


def register(settings: Settings, run_id: str) -> str:
    result = registry.register_run(settings, run_id, thresholds=OFF)
    assert result.registered and result.version is not None
    return result.version


# --- registration --------------------------------------------------------------------------


def test_only_a_run_that_meets_the_thresholds_is_registered(world: World, reg: Settings) -> None:
    metrics = client(reg).get_run(world.trained).data.metrics
    too_strict = Thresholds.parse({"loss": metrics["test_loss"] / 2})
    refused = registry.register_run(reg, world.trained, thresholds=too_strict)
    assert not refused.registered and refused.metric_drop
    assert "test_loss value threshold check failed" in refused.reasons[0]
    assert client(reg).search_model_versions(f"name = '{reg.model_name}'") == []

    # A score exactly at the floor passes (tiny training may leave f1 at 0: no floor on it).
    reachable = Thresholds.parse({"accuracy": metrics["test_accuracy"], "f1": None})
    done = registry.register_run(reg, world.trained, thresholds=reachable)
    assert done.registered and done.created and done.version == "1"
    version = client(reg).get_model_version(reg.model_name, "1")
    assert version.run_id == world.trained
    assert version.source == client(reg).get_run(world.trained).data.tags[MODEL_URI_TAG]
    assert version.tags["dataset_version"] == VERSION
    assert version.tags["model_type"] == "cnn"
    assert version.tags["source_run_id"] == world.trained
    for name in ["test_accuracy", "test_f1", "test_loss", "test_precision", "test_recall"]:
        assert float(version.tags[name]) == pytest.approx(metrics[name])
    assert done.summary()["metric_drop"] is False


def test_registering_a_run_again_returns_the_same_version(world: World, reg: Settings) -> None:
    first = registry.register_run(reg, world.defective, thresholds=OFF)
    again = registry.register_run(reg, world.defective, thresholds=OFF)
    assert (first.version, first.created) == ("1", True)
    assert (again.version, again.created) == ("1", False)
    # Two retries at once still make one version: the lookup by run id happens under the lock.
    results: list[registry.Registration] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(registry.register_run(reg, world.good, thresholds=OFF))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r.version or "" for r in results) == ["2", "2"]
    assert sorted(r.created for r in results) == [False, True]
    versions = client(reg).search_model_versions(f"name = '{reg.model_name}'")
    assert sorted(v.version for v in versions) == ["1", "2"]


# --- stage and produce ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "best"),
    [("Loss", "b"), ("accuracy", "c"), ("Precision", "b"), ("recall", "a"), ("F1", "b")],
)
def test_stage_and_produce_by_each_metric(
    world: World, reg: Settings, metric: str, best: str
) -> None:
    versions = {key: register(reg, run_id) for key, run_id in world.ranked.items()}
    staged = registry.stage(reg, metric=metric)
    assert staged.version == versions[best]
    assert staged.metric == metric.lower()
    assert set(staged.scores) == set(versions.values())
    # The first production model faces the floors only (switched off: these models are fake).
    promoted = registry.produce(reg, metric=metric, thresholds=OFF)
    assert promoted.promoted, promoted.reason
    assert promoted.comparison is not None and promoted.comparison.champion_version is None
    assert aliases(reg) == {STAGING: versions[best], PRODUCTION: versions[best]}
    shown = registry.info(reg)
    assert shown.production is not None and shown.production.version == versions[best]
    assert shown.production.metrics["test_f1"] == RANKED[best]["f1"]
    # Producing again changes nothing: the staging version already serves.
    again = registry.produce(reg, metric=metric, thresholds=OFF)
    assert not again.promoted and "already" in again.reason


def test_a_worse_challenger_is_refused_and_a_better_one_promoted(
    world: World, reg: Settings
) -> None:
    champion = register(reg, world.defective)
    challenger = register(reg, world.good)
    assert registry.produce(reg, version=champion, thresholds=OFF).promoted

    for metric in ["f1", "Loss"]:
        comparison = registry.compare(reg, challenger, metric=metric, thresholds=OFF)
        assert comparison.champion_version == champion
        assert comparison.dataset_version == VERSION
        assert comparison.beats_champion is False and comparison.metric_drop
        assert comparison.summary()["metric_drop"] is True
    f1 = registry.compare(reg, challenger, metric="f1", thresholds=OFF)
    assert f1.candidate_score == 0.0 and f1.champion_score is not None
    assert f1.difference == pytest.approx(-f1.champion_score)

    registry.stage(reg, version=challenger)
    refused = registry.produce(reg, metric="f1", thresholds=OFF)
    assert not refused.promoted and refused.metric_drop
    assert aliases(reg)[PRODUCTION] == champion
    assert len(registry.history(reg)) == 1

    # The other way round the challenger wins, lower loss being better.
    registry.produce(reg, version=challenger, force=True)
    won = registry.produce(reg, version=champion, metric="loss", thresholds=OFF)
    assert won.promoted and won.comparison is not None
    assert won.comparison.beats_champion is True
    assert won.comparison.difference is not None and won.comparison.difference < 0
    assert aliases(reg)[PRODUCTION] == champion
    assert tags(reg, champion)["previous_production_version"] == challenger
    assert tags(reg, challenger)["archived"] == "true"
    # The default floors (accuracy >= 0.80, f1 >= 0.75) refuse a model that always says one thing.
    floors = registry.compare(reg, champion, metric="f1")
    assert not floors.meets_thresholds
    assert any("test_accuracy" in reason for reason in floors.reasons)


def test_the_cli_compares_and_promotes(world: World, reg: Settings) -> None:
    champion = register(reg, world.defective)
    challenger = register(reg, world.good)
    runner = CliRunner()
    first = runner.invoke(
        app, ["registry", "produce", "--version", champion, "--min-accuracy", "0", "--min-f1", "0"]
    )
    assert first.exit_code == 0, first.output
    assert f"now version {champion}" in first.output
    shown = runner.invoke(
        app, ["registry", "compare", "--candidate", challenger, "--metric", "F1", "--min-f1", "0"]
    )
    assert shown.exit_code == 0, shown.output
    assert f"production version {champion}" in shown.output
    assert "fails the gate (metric drop)" in shown.output


def test_a_script_tells_promoted_from_refused_by_the_exit_status(
    world: World, reg: Settings
) -> None:
    champion = register(reg, world.defective)
    challenger = register(reg, world.good)
    no_floors = ["--min-accuracy", "0", "--min-f1", "0", "--metric", "f1"]
    promoted = tirelib("registry", "produce", "--version", champion, *no_floors)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    again = tirelib("registry", "produce", "--version", champion, *no_floors)
    assert again.returncode == 0, again.stderr[-2000:]  # production is that version already
    assert "already the production version" in again.stdout

    for extra in [[], ["--json"]]:
        refused = tirelib("registry", "produce", "--version", challenger, *no_floors, *extra)
        assert refused.returncode == 1, refused.stdout + refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
        assert "not promoted" in refused.stdout
    assert aliases(reg)[PRODUCTION] == champion
    # A run below the floors is not registered: status 1 too (test accuracy 0.92 here).
    below = tirelib("registry", "register", "--run-id", world.ranked["c"], "--min-accuracy", "0.99")
    assert below.returncode == 1, below.stdout + below.stderr[-2000:]
    assert "was not registered" in below.stdout


def test_the_full_life_cycle_of_a_trained_model(world: World, reg: Settings) -> None:
    metrics = client(reg).get_run(world.trained).data.metrics
    # Just below the run's own scores, so the fresh evaluation on the same split passes too.
    floors = Thresholds.parse(
        {"accuracy": metrics["test_accuracy"] - 0.01, "f1": max(metrics["test_f1"] - 0.01, 0)}
    )
    version = registry.register_run(reg, world.trained, thresholds=floors).version
    assert version == "1"
    assert registry.stage(reg, metric="f1").version == "1"
    promoted = registry.produce(reg, metric="f1", thresholds=floors)
    assert promoted.promoted, promoted.reason

    shown = registry.info(reg).summary()
    production = shown["production"]
    experiment = client(reg).get_run(world.trained).info.experiment_id
    assert production["version"] == "1"
    assert production["model_type"] == "cnn"
    assert production["dataset_version"] == VERSION
    assert production["run_link"] == (
        f"{reg.mlflow_tracking_uri}/#/experiments/{experiment}/runs/{world.trained}"
    )
    assert production["model_uri"] == f"models:/{reg.model_name}/1"
    assert production["source"].startswith("models:/m-")
    assert production["artifact_uri"]
    assert production["metrics"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert production["tags"]["promoted_by"]
    # What serves is what was registered: the production alias loads and scores the same.
    served = evaluate_model(f"models:/{reg.model_name}@production", VERSION, reg)
    assert served.metrics.accuracy == pytest.approx(metrics["test_accuracy"])


# --- rollback and history ------------------------------------------------------------------


def test_rollback_restores_the_previous_version_in_one_step(world: World, reg: Settings) -> None:
    first = register(reg, world.ranked["a"])
    second = register(reg, world.ranked["b"])
    registry.produce(reg, version=first, force=True)
    registry.produce(reg, version=second, force=True)
    assert tags(reg, second)["previous_production_version"] == first
    assert tags(reg, first)["archived"] == "true"

    back = registry.rollback(reg)
    assert back.promoted and (back.version, back.previous) == (first, second)
    assert aliases(reg)[PRODUCTION] == first
    assert "archived" not in tags(reg, first)
    assert tags(reg, second)["rolled_back"] == "true"

    events = registry.history(reg)
    assert [(e.action, e.version, e.previous) for e in events] == [
        ("rollback", first, second),
        ("force", second, first),
        ("force", first, None),
    ]
    assert all(e.applied for e in events)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(reg)

    listed = CliRunner().invoke(app, ["registry", "history"])
    assert listed.exit_code == 0, listed.output
    actions = [line.split()[2] for line in listed.output.splitlines() if "@" in line]
    assert actions == ["rollback", "force", "force"]


def test_a_rollback_of_a_version_that_no_longer_serves_is_refused(
    world: World, reg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = (register(reg, world.ranked[k]) for k in ("a", "b", "c"))
    registry.produce(reg, version=first, force=True)
    registry.produce(reg, version=second, force=True)
    # Monitoring judged the second; a promotion moves production while the first loads: the
    # check under the lock refuses, where a plain rollback would roll the third back.
    load = RegistryClient.check_loadable

    def promote_meanwhile(self: RegistryClient, version: str) -> None:
        load(self, version)
        if version == first:
            monkeypatch.setattr(RegistryClient, "check_loadable", load)
            assert registry.produce(reg, version=third, force=True).promoted

    monkeypatch.setattr(RegistryClient, "check_loadable", promote_meanwhile)
    with pytest.raises(PromotionConflictError, match=f"judged was version {second}"):
        registry.rollback(reg, expected=second)
    assert aliases(reg)[PRODUCTION] == third
    # Refused before loading anything when production already moved; the right one goes.
    with pytest.raises(PromotionConflictError, match=f"production is now version {third}"):
        registry.rollback(reg, expected=second)
    assert registry.rollback(reg, expected=third).version == second
    assert aliases(reg)[PRODUCTION] == second


# --- safety --------------------------------------------------------------------------------


def test_racing_promotions_leave_one_production_and_a_consistent_history(
    world: World, reg: Settings
) -> None:
    first = register(reg, world.ranked["a"])
    second = register(reg, world.ranked["b"])
    start = threading.Barrier(2)
    results: list[registry.Promotion] = []

    def promote(version: str) -> None:
        start.wait()
        results.append(registry.produce(reg, version=version, force=True))

    threads = [threading.Thread(target=promote, args=(v,)) for v in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(r.promoted for r in results) and len(results) == 2

    newest, oldest = registry.history(reg)
    assert newest.applied and oldest.applied
    assert oldest.previous is None
    assert newest.previous == oldest.version  # the second saw the first one's result
    assert aliases(reg)[PRODUCTION] == newest.version
    assert tags(reg, oldest.version)["archived"] == "true"
    assert tags(reg, newest.version)["previous_production_version"] == oldest.version


def test_a_promotion_waits_for_the_lock(world: World, reg: Settings) -> None:
    version = register(reg, world.ranked["c"])
    with registry.model_lock(reg) as what:
        assert "PostgreSQL advisory lock" in what
        thread = threading.Thread(
            target=registry.produce, args=(reg,), kwargs={"version": version, "force": True}
        )
        thread.start()
        time.sleep(2)
        assert thread.is_alive()
        assert PRODUCTION not in aliases(reg)
    thread.join(60)
    assert aliases(reg)[PRODUCTION] == version


def test_a_promotion_on_stale_evidence_is_refused(world: World, reg: Settings) -> None:
    # The ranked models all predict "defective": scored for real they tie, so each passes.
    champion = register(reg, world.ranked["a"])
    challenger = register(reg, world.ranked["c"])
    other = register(reg, world.ranked["b"])
    registry.produce(reg, version=champion, force=True)
    comparison = registry.compare(reg, challenger, metric="f1", thresholds=OFF)
    assert comparison.passed and comparison.champion_version == champion

    registry.produce(reg, version=other, force=True)  # production moves after the comparison
    with pytest.raises(PromotionConflictError) as error:
        registry.produce(reg, comparison=comparison)
    message = str(error.value)
    assert f"refusing to promote version {challenger}" in message
    assert f"production is now version {other} (force by " in message
    assert f"the comparison was made against production version {champion}" in message
    assert f"tirelib registry compare --candidate {challenger}" in message
    assert aliases(reg)[PRODUCTION] == other
    assert [e.version for e in registry.history(reg)] == [other, champion]
    assert "promoted_at" not in tags(reg, challenger)

    # A comparison made before any production model is stale once there is one.
    first = registry.judge(
        model_name=reg.model_name,
        dataset_version=VERSION,
        candidate_version=challenger,
        candidate_metrics={"test_f1": 0.99},
        champion_version=None,
        champion_metrics=None,
        thresholds=OFF,
    )
    with pytest.raises(PromotionConflictError, match="against no production version"):
        registry.produce(reg, comparison=first)

    # Compared again, against what serves now, the promotion goes ahead.
    fresh = registry.compare(reg, challenger, metric="f1", thresholds=OFF)
    assert fresh.champion_version == other
    promoted = registry.produce(reg, comparison=fresh)
    assert promoted.promoted and promoted.previous == other
    assert aliases(reg)[PRODUCTION] == challenger


def test_the_lock_is_free_while_models_are_scored_and_loaded(
    world: World, reg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    champion = register(reg, world.ranked["a"])
    challenger = register(reg, world.ranked["c"])
    registry.produce(reg, version=champion, force=True)
    free: list[tuple[str, bool]] = []

    def lock_is_free(during: str) -> None:
        """Another thread (its own connection) tries the lock while the work goes on."""

        def take() -> None:
            try:
                with registry.model_lock(reg, timeout=3):
                    free.append((during, True))
            except RegistryError:
                free.append((during, False))

        thread = threading.Thread(target=take)
        thread.start()
        thread.join(60)

    scoring, loading = lifecycle.evaluate_model, RegistryClient.check_loadable

    def score(*args: object, **kwargs: object) -> object:
        lock_is_free("scoring")
        return scoring(*args, **kwargs)

    def load(self: RegistryClient, version: str) -> None:
        lock_is_free("loading")
        loading(self, version)

    monkeypatch.setattr(lifecycle, "evaluate_model", score)
    monkeypatch.setattr(RegistryClient, "check_loadable", load)
    promoted = registry.produce(reg, version=challenger, metric="f1", thresholds=OFF)
    assert promoted.promoted, promoted.reason
    assert free == [("scoring", True), ("scoring", True), ("loading", True)]


def test_a_model_that_cannot_be_loaded_is_never_promoted(world: World, reg: Settings) -> None:
    # Weights of a cnn under a config that says tinyvgg: the files are there, loading fails.
    network = constant_network(world.classes, "defective", 1.0)
    tracking.configure(reg)
    with mlflow.start_run(tags={"dataset_version": VERSION, "model_type": "tinyvgg"}) as run:
        uri = tracking.log_model(
            network, model_type="tinyvgg", classes=world.classes, prep=Preprocessing(64, *_NORM)
        )
        mlflow.set_tag(MODEL_URI_TAG, uri)
        mlflow.log_metrics({"test_f1": 0.99, "test_accuracy": 0.99})
    broken = register(reg, run.info.run_id)
    good = register(reg, world.ranked["a"])
    registry.produce(reg, version=good, force=True)

    with pytest.raises(RegistryError, match=f"refusing to promote version {broken}"):
        registry.produce(reg, version=broken, force=True)
    assert aliases(reg)[PRODUCTION] == good
    assert [e.version for e in registry.history(reg)] == [good]
    assert "promoted_at" not in tags(reg, broken)


def test_the_earlier_command_spellings(world: World, reg: Settings) -> None:
    versions = {key: register(reg, run_id) for key, run_id in world.ranked.items()}
    staged = tirelib("Stage", "Loss")
    assert staged.returncode == 0, staged.stderr[-2000:]
    assert aliases(reg)[STAGING] == versions["b"]
    produced = tirelib("Produce", "Loss", TIRE_MIN_ACCURACY="0", TIRE_MIN_F1="0")
    assert produced.returncode == 0, produced.stderr[-2000:]
    assert f"now version {versions['b']}" in produced.stdout
    assert aliases(reg)[PRODUCTION] == versions["b"]
    shown = tirelib("ProductionInfo")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"production: version {versions['b']}" in shown.stdout
    assert "model type           cnn" in shown.stdout
    assert f"dataset version      {VERSION}" in shown.stdout
    assert "#/experiments/" in shown.stdout
    assert f"models:/{reg.model_name}/{versions['b']}" in shown.stdout


def test_a_server_stopped_mid_promotion_leaves_a_consistent_registry(
    world: World,
    reg: Settings,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A private server, stopped between the tags and the alias move, then started again."""

    def private_server(port: int) -> tuple[Settings, Component]:
        settings = load_settings(
            home=tmp_path / "private",
            s3_endpoint_url=s3_server.endpoint_url,
            mlflow_port=port,
            artifact_bucket=f"tire-private-{suffix}",
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key=s3_server.secret_key,
            database_url=None,
        )
        return settings, mlflow_component(settings)

    suffix = secrets.token_hex(4)
    server_settings, component = private_server(free_port())
    create_buckets(server_settings, [server_settings.artifact_bucket])
    component.up()
    restarted = None
    try:
        url = component.process.url
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("TIRE_DATABASE_URL")  # the file lock this time
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        reset_settings()
        settings = get_settings()
        network = constant_network(world.classes, "defective", 1.0)
        first = register(settings, log_run(settings, network, world.classes, {"test_f1": 0.9}))
        second = register(settings, log_run(settings, network, world.classes, {"test_f1": 0.8}))
        registry.produce(settings, version=first, force=True)

        original = RegistryClient.move_alias

        def stop_first(self: RegistryClient, alias: str, version: str) -> None:
            if alias == PRODUCTION:
                component.down()
            original(self, alias, version)

        monkeypatch.setattr(RegistryClient, "move_alias", stop_first)
        with pytest.raises(RegistryUnavailableError) as error:
            registry.produce(settings, version=second, force=True)
        assert f"cannot reach the MLflow tracking server at {url}" in str(error.value)
        monkeypatch.setattr(RegistryClient, "move_alias", original)
        # Every entry into MLflow says the same of a stopped server: retryable, named.
        for call in (
            lambda: registry.compare(settings, second, thresholds=OFF),
            lambda: registry.register_run(settings, "0123456789abcdef", thresholds=OFF),
            lambda: registry.stage(settings, metric="f1"),
        ):
            with pytest.raises(RegistryUnavailableError, match=f"MLflow tracking server at {url}"):
                call()

        down = tirelib("registry", "info")
        assert down.returncode == 3  # a service is unreachable: worth a retry later
        assert f"error: cannot reach the MLflow tracking server at {url}" in down.stderr
        assert "Traceback" not in down.stderr

        # Started again (on a new port: the old one may linger in TIME_WAIT), same database.
        _, restarted = private_server(free_port())
        restarted.up()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", restarted.process.url)
        reset_settings()
        settings = get_settings()
        assert aliases(settings)[PRODUCTION] == first
        assert "archived" not in tags(settings, first)
        events = registry.history(settings)
        assert [(e.version, e.applied) for e in events] == [(second, False), (first, True)]

        # Running the command again finishes the job; the history tells both attempts apart.
        assert registry.produce(settings, version=second, force=True).promoted
        assert aliases(settings)[PRODUCTION] == second
        assert tags(settings, first)["archived"] == "true"
        events = registry.history(settings)
        assert [(e.version, e.previous, e.applied) for e in events] == [
            (second, first, True),
            (second, first, False),
            (first, None, True),
        ]
    finally:
        component.down()
        if restarted is not None:
            restarted.down()
