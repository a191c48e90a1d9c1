"""Fault injection: outages of the real servers in the middle of the pipeline's steps.

The module runs its own servers on loopback, so it can stop and restart them freely: a private
PostgreSQL cluster (``initdb`` + ``pg_ctl`` in a temporary folder, never the machine's own), a
SeaweedFS S3 store, and an MLflow tracking server on that cluster with artifacts in that store.
The steps are :mod:`tirelib.pipeline`'s, run without Airflow; Airflow's retry is emulated the way
the task's retry policy decides it: a retryable error (:func:`tirelib.errors.is_retryable`, and
``RETRY_POLICY`` says RETRY) brings the service back and calls the same step again, while a
fail-fast error is raised at once and never retried.

Each test ends with its servers running and checks that the run ended correct with nothing made
twice: no split rewritten, one MLflow run per training job, one model version per run, one
production move per promotion. The table of faults is printed at the end of the session and
written to ``fault-table.md`` under the pytest temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import psycopg2
import pytest
from mlflow import MlflowClient

from tests.conftest import _FOREIGN_ENV, SlackReceiver
from tests.factories import write_image_folder
from tirelib import pipeline, registry
from tirelib.data import SPLITS, upload_version
from tirelib.errors import DataError, TirelibError, is_retryable
from tirelib.settings import Settings, get_settings, load_settings, reset_settings
from tirelib.stack import Component, free_port, mlflow_component, seaweedfs_component
from tirelib.storage import ObjectStore, split_key
from tirelib.synth import generate
from tirelib.train import JOB_DIGEST_TAG, SUPERSEDED_TAG, make_config

pytestmark = pytest.mark.integration

VERSION = "faults-1"
ACCESS_KEY = "tirelib-faults"
THRESHOLDS = {"accuracy": 0.0, "f1": 0.0, "margin": 0.0}  # every run passes; the gate compares
METRIC = "f1"


# --- a private PostgreSQL cluster -------------------------------------------------------------


def _pg_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live: ``pg_config --bindir``, else the PATH."""
    try:
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if found and (Path(found) / "initdb").exists():
            return Path(found)
    except (OSError, subprocess.SubprocessError):
        pass
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("initdb not found: the fault suite needs PostgreSQL's server binaries")
    return Path(initdb).parent


class PrivatePostgres:
    """A PostgreSQL cluster of this module's own: 127.0.0.1 on a free port, trust auth.

    ``initdb`` refuses to run as root; then the cluster belongs to the ``postgres`` user and
    every command runs as that user (``runuser``). It is stopped by ``pg_ctl`` (which signals
    the pid in its own ``postmaster.pid``), never by name.
    """

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.port = free_port()
        # Not under pytest's folder: the cluster's owner must be able to enter every parent.
        self.root = Path(tempfile.mkdtemp(prefix="tirelib-pg-"))
        self.data = self.root / "data"
        self.owner = "postgres" if os.geteuid() == 0 else None
        if self.owner is not None:
            shutil.chown(self.root, user=self.owner)

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        try:
            psycopg2.connect(self.dsn("postgres"), connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        connection = psycopg2.connect(self.dsn("postgres"), connect_timeout=5)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# --- the module's world: servers, one uploaded version, two trained runs ---------------------


@dataclass
class World:
    postgres: PrivatePostgres
    s3: Component
    mlflow: Component
    tracking_uri: str
    jobs: list[dict[str, Any]]
    trained: list[dict[str, Any]]
    split_etags: dict[str, str]

    def store(self) -> ObjectStore:
        return ObjectStore.for_data(get_settings())

    def restore(self) -> None:
        """Every server running again (what each test leaves behind)."""
        self.postgres.ensure_running()
        self.s3.up()
        self.mlflow_up()

    def mlflow_up(self) -> None:
        """Start MLflow again, without the schema migration of a first start."""
        if self.mlflow.process.pid is None:
            self.mlflow.process.start()
        self.mlflow.process.wait_ready(self.mlflow.ready_timeout)


@dataclass
class Row:
    fault: str
    run: str
    duplicates: str


@dataclass
class FaultTable:
    rows: list[Row] = field(default_factory=list)

    def render(self) -> str:
        header = ("fault", "what the run did", "duplicates found")
        cells = [header, *((r.fault, r.run, r.duplicates) for r in self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(3)) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


class _TableReport:
    """Prints the fault table in pytest's terminal summary (no ``-s`` needed)."""

    def __init__(self, table: FaultTable, path: Path) -> None:
        self.table = table
        self.path = path

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.table.rows:
            return
        terminalreporter.section("fault injection")
        terminalreporter.write_line(self.table.render())
        terminalreporter.write_line(f"(also in {self.path})")


@pytest.fixture(scope="module")
def table(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultTable]:
    result = FaultTable()
    path = tmp_path_factory.mktemp("faults") / "fault-table.md"
    request.config.pluginmanager.register(_TableReport(result, path), "tirelib-fault-table")
    yield result
    path.write_text(result.render() + "\n")


def _server_settings(home: Path, **values: Any) -> Settings:
    return load_settings(home=home, **values)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, _slack_server: SlackReceiver
) -> Iterator[World]:
    home = tmp_path_factory.mktemp("faults-home")
    secret = secrets.token_hex(16)
    postgres = PrivatePostgres()
    components: list[Component] = []
    with pytest.MonkeyPatch.context() as env:
        try:
            postgres.init()
            postgres.start()
            database_url = postgres.create_database("mlflow")
            s3_settings = _server_settings(
                home / "s3",
                s3_port=free_port(),
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=secret,
            )
            s3 = seaweedfs_component(s3_settings, buckets=["tire-data", "tire-mlflow"])
            components.append(s3)
            s3.up()
            endpoint = str(s3.process.url)
            mlflow_settings = _server_settings(
                home / "mlflow",
                s3_endpoint_url=endpoint,
                mlflow_port=free_port(),
                database_url=database_url,
                artifact_bucket="tire-mlflow",
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=secret,
            )
            server = mlflow_component(mlflow_settings)
            components.append(server)
            server.up()
            uri = str(server.process.url)

            for name in _FOREIGN_ENV:
                env.delenv(name, raising=False)
            values = {
                "TIRE_HOME": str(home / "client"),
                "TIRE_S3_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "us-east-1",
                "TIRE_DATA_BUCKET": "tire-data",
                "TIRE_ARTIFACT_BUCKET": "tire-mlflow",
                "TIRE_DATABASE_URL": database_url,  # the registry's lock is on this cluster too
                "MLFLOW_TRACKING_URI": uri,
                "TIRE_EXPERIMENT": "tire-faults",
                "TIRE_MODEL_NAME": "tire-faults",
                "TIRE_SLACK_WEBHOOK_URL": _slack_server.url,
                # Give up quickly on a stopped server: the emulated Airflow retry takes over.
                "TIRE_S3_MAX_ATTEMPTS": "2",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
            }
            for name, value in values.items():
                env.setenv(name, value)
            reset_settings()
            mlflow.set_tracking_uri(uri)

            settings = get_settings()
            store = ObjectStore.for_data(settings)
            generate(home / "images", 80, seed=17, size=32)
            upload_version(store, home / "images", VERSION, progress=False)
            pipeline.validate_data(VERSION)
            pipeline.split(VERSION)
            etags = {s: _etag(store, split_key(VERSION, s)) for s in SPLITS}
            jobs = [
                make_config(
                    dataset_version=VERSION,
                    model_type="cnn",
                    epochs=1,
                    batch_size=16,
                    image_size=32,
                    seed=seed,
                ).model_dump(mode="json")
                for seed in (1, 2)
            ]
            trained = [pipeline.train(job) for job in jobs]
            yield World(postgres, s3, server, uri, jobs, trained, etags)
        finally:
            for component in reversed(components):
                component.down()
            postgres.remove()
            reset_settings()


@pytest.fixture(autouse=True)
def _fresh_settings(world: World) -> Iterator[None]:
    """Settings read anew: a test's environment changes never leak into the next one."""
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def model(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A registered model name of this test's own; every server runs before and after."""
    world.restore()
    monkeypatch.setenv("TIRE_MODEL_NAME", f"tire-faults-{secrets.token_hex(4)}")
    reset_settings()
    yield get_settings()
    world.restore()
    reset_settings()


# --- emulating Airflow's retry ---------------------------------------------------------------


@dataclass
class Outcome:
    value: Any
    errors: list[BaseException]

    def story(self, done: str) -> str:
        tries = [f"try {i}: {type(e).__name__} (retried)" for i, e in enumerate(self.errors, 1)]
        return "; ".join([*tries, f"try {len(self.errors) + 1}: {done}"])


def with_retries(
    step: Callable[..., Any], *args: Any, restore: Callable[[], None], tries: int = 4
) -> Outcome:
    """Call ``step`` as Airflow would with the retry policy: a retryable error restores the
    service and tries again; any other error is raised at once (fail-fast: never retried)."""
    from airflow.sdk import RetryAction

    from tirelib.orchestration import RETRY_POLICY

    errors: list[BaseException] = []
    for attempt in range(1, tries + 1):
        try:
            return Outcome(step(*args), errors)
        except Exception as error:
            decision = RETRY_POLICY.evaluate(error, try_number=attempt, max_tries=tries)
            if not is_retryable(error):
                assert decision.action != RetryAction.RETRY, error
                raise
            assert decision.action == RetryAction.RETRY, (type(error), decision)
            errors.append(error)
            restore()
    raise AssertionError(f"{step.__name__} still failed after {tries} tries: {errors[-1]}")


class Trigger:
    """Run ``action`` once, on the ``at``-th call of a wrapped function (thread-safe)."""

    def __init__(self, at: int, action: Callable[[], None]) -> None:
        self.at = at
        self.action = action
        self.calls = 0
        self.fired = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
            if self.fired or self.calls < self.at:
                return
            self.fired = True
            self.action()


def _wrap(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, before: Callable) -> None:
    original = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


# --- what a run must not have made twice -----------------------------------------------------


def _etag(store: ObjectStore, key: str) -> str:
    return store.client.head_object(Bucket=store.bucket, Key=key)["ETag"]


def duplicates(world: World, settings: Settings, *, versions: tuple[str, ...] = ()) -> str:
    """Whatever was made twice, in words ("none" when nothing was)."""
    found = []
    store = world.store()
    for version in (VERSION, *versions):
        expected = world.split_etags if version == VERSION else None
        if expected is not None:
            now = {s: _etag(store, split_key(version, s)) for s in SPLITS}
            if now != expected:
                found.append(f"splits of {version} rewritten")
    client = MlflowClient(world.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    # A run that an outage interrupted is closed (KILLED, tagged) by the run that replaced it.
    per_job = Counter(
        r.data.tags.get(JOB_DIGEST_TAG) for r in runs if SUPERSEDED_TAG not in r.data.tags
    )
    if any(n > 1 for n in per_job.values()):
        found.append(f"runs per job {sorted(per_job.values())}")
    versions_found = client.search_model_versions(f"name = '{settings.model_name}'")
    per_run = Counter(v.run_id for v in versions_found)
    if any(n > 1 for n in per_run.values()):
        found.append(f"model versions per run {dict(per_run)}")
    events = registry.history(settings) if versions_found else []
    moves = Counter(e.version for e in events if e.applied)
    if any(n > 1 for n in moves.values()):
        found.append(f"production moves per version {dict(moves)}")
    return "; ".join(found) or "none"


def _versions_per_run(world: World, settings: Settings) -> Counter[str]:
    client = MlflowClient(world.tracking_uri)
    return Counter(
        v.run_id for v in client.search_model_versions(f"name = '{settings.model_name}'")
    )


def _ordered(trained: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weaker, stronger) by test f1, then loss: the champion, and a challenger that beats it
    or ties it (margin 0 promotes a tie)."""
    ranked = sorted(
        trained, key=lambda t: (t["test_metrics"]["test_f1"], -t["test_metrics"]["test_loss"])
    )
    return ranked[0], ranked[-1]


def _run_through(
    world: World, champion: dict[str, Any] | None, challenger: dict[str, Any]
) -> dict[str, Any]:
    """register -> stage -> evaluate -> promote for ``challenger`` (``champion`` first, if any),
    with no faults."""
    if champion is not None:
        _run_through(world, None, champion)
    registered = pipeline.register([challenger], THRESHOLDS)
    staged = pipeline.stage(registered, METRIC)
    evaluation = pipeline.evaluate(VERSION, [challenger])
    return pipeline.promote(staged, evaluation, METRIC, THRESHOLDS)


# --- the faults ------------------------------------------------------------------------------


def test_s3_stopped_during_an_upload_resumes(
    world: World, table: FaultTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.restore()
    images = tmp_path / "upload"
    write_image_folder(images, {"good": 30, "defective": 30}, size=16, start=5000)
    store = world.store()
    trigger = Trigger(21, world.s3.down)  # S3 stops before the 21st object is sent
    _wrap(monkeypatch, ObjectStore, "put_bytes", lambda self, key, *a, **k: trigger())

    def upload() -> Any:
        return upload_version(store, images, "faults-upload", max_workers=4, progress=False)

    outcome = with_retries(upload, restore=world.s3.up)
    report = outcome.value
    assert trigger.fired and outcome.errors, "the upload never met the stopped store"
    assert report.uploaded + report.unchanged == 60
    assert report.unchanged >= 20 - 4, "the second upload sent everything again"
    manifest = store.get_json("raw/faults-upload/_manifest.json")
    assert len(manifest["objects"]) == 60
    keys = [o.key for o in store.iter_objects("raw/faults-upload/")]
    assert len(keys) == 61  # the images and the manifest, nothing else
    story = outcome.story(f"resumed: {report.uploaded} sent, {report.unchanged} already there")
    table.rows.append(Row("S3 stopped during an upload", story, duplicates(world, get_settings())))


def test_s3_restarted_while_a_task_prepares_the_data(
    world: World, table: FaultTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.restore()
    store = world.store()
    write_image_folder(tmp_path / "prep", {"good": 40, "defective": 40}, size=16, start=9000)
    upload_version(store, tmp_path / "prep", "faults-prep", progress=False)
    monkeypatch.setenv("TIRE_CACHE_DIR", str(tmp_path / "cache"))  # every image is fetched
    reset_settings()

    # validate_data: S3 goes down after 10 images were downloaded.
    fetch = Trigger(11, world.s3.down)
    _wrap(monkeypatch, ObjectStore, "get_bytes", lambda self, key: fetch())
    validated = with_retries(pipeline.validate_data, "faults-prep", restore=world.s3.up)
    assert fetch.fired and validated.errors
    assert validated.value["images"] == 80

    # split: S3 goes down between the first split manifest and the second.
    write = Trigger(2, world.s3.down)
    _wrap(monkeypatch, ObjectStore, "put_bytes", lambda self, key, *a, **k: write())
    split = with_retries(pipeline.split, "faults-prep", restore=world.s3.up)
    assert write.fired and split.errors
    etags = {s: _etag(store, split_key("faults-prep", s)) for s in SPLITS}
    assert pipeline.split("faults-prep") == split.value  # read back, not made again
    assert {s: _etag(store, split_key("faults-prep", s)) for s in SPLITS} == etags
    from tirelib.data import make_splits, read_manifest, read_split

    expected = make_splits(read_manifest(store, "faults-prep"))
    for name in SPLITS:
        assert read_split(store, "faults-prep", name).records == expected[name].records

    story = (
        f"validate_data: {validated.story('80 images checked')}. "
        f"split: {split.story('3 splits written, identical to a clean split')}"
    )
    table.rows.append(
        Row("S3 restarted while a task prepares the data", story, duplicates(world, get_settings()))
    )


def test_mlflow_stopped_during_training(
    world: World, table: FaultTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.restore()
    job = {**world.jobs[0], "seed": 3}  # a job not trained yet
    logged = Trigger(1, world.mlflow.down)  # MLflow stops as the first epoch is logged
    _wrap(monkeypatch, mlflow, "log_metrics", lambda *a, **k: logged())
    outcome = with_retries(pipeline.train, job, restore=world.mlflow_up)
    assert logged.fired and outcome.errors
    again = pipeline.train(job)  # a retried task finds the finished run
    assert again["run_id"] == outcome.value["run_id"]
    settings = get_settings()
    client = MlflowClient(world.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    digest = client.get_run(outcome.value["run_id"]).data.tags[JOB_DIGEST_TAG]
    runs = client.search_runs([experiment.experiment_id], f"tags.`{JOB_DIGEST_TAG}` = '{digest}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert [r.info.run_id for r in finished] == [outcome.value["run_id"]]
    interrupted = [r for r in runs if r.info.run_id != outcome.value["run_id"]]
    assert all(r.data.tags.get(SUPERSEDED_TAG) == outcome.value["run_id"] for r in interrupted)
    assert all(r.info.status == "KILLED" for r in interrupted)
    story = outcome.story(
        f"trained in a new run; {len(interrupted)} interrupted run closed as KILLED, "
        "tagged with its replacement"
    )
    table.rows.append(Row("MLflow stopped during training", story, duplicates(world, settings)))


def test_mlflow_stopped_during_register(
    world: World, table: FaultTable, model: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MlflowClient.create_model_version
    created = Trigger(1, world.mlflow.down)

    def stop_after_create(*args: Any, **kwargs: Any) -> Any:
        version = original(*args, **kwargs)
        created()  # the first version exists; its tags do not yet
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", stop_after_create)
    outcome = with_retries(pipeline.register, world.trained, THRESHOLDS, restore=world.mlflow_up)
    assert created.fired and outcome.errors, "register never met the stopped server"
    assert all(r["registered"] for r in outcome.value)
    counts = _versions_per_run(world, model)
    assert counts == {t["run_id"]: 1 for t in world.trained}
    again = pipeline.register(world.trained, THRESHOLDS)  # a retried task: nothing new
    assert [r["version"] for r in again] == [r["version"] for r in outcome.value]
    story = outcome.story(f"{len(counts)} runs registered, one version each")
    table.rows.append(Row("MLflow stopped during register", story, duplicates(world, model)))


def test_mlflow_stopped_during_evaluate_and_promote(
    world: World, table: FaultTable, model: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    champion, challenger = _ordered(world.trained)
    first = _run_through(world, None, champion)
    assert first["promoted"], first

    # evaluate: MLflow goes down as the champion's model is loaded.
    load = Trigger(1, world.mlflow.down)
    _wrap(monkeypatch, mlflow.pyfunc, "load_model", lambda *a, **k: load())
    evaluated = with_retries(pipeline.evaluate, VERSION, [challenger], restore=world.mlflow_up)
    assert load.fired and evaluated.errors
    assert evaluated.value["champion"]["version"] == first["version"]

    # promote: MLflow goes down after the history event, before production moves.
    registered = pipeline.register([challenger], THRESHOLDS)
    staged = pipeline.stage(registered, METRIC)

    def stop_before_production(self: Any, name: str, alias: str, version: Any) -> None:
        if alias == registry.PRODUCTION:
            move()

    move = Trigger(1, world.mlflow.down)
    _wrap(monkeypatch, MlflowClient, "set_registered_model_alias", stop_before_production)
    promoted = with_retries(
        pipeline.promote, staged, evaluated.value, METRIC, THRESHOLDS, restore=world.mlflow_up
    )
    assert move.fired and promoted.errors
    assert promoted.value["promoted"], promoted.value
    assert registry.info(model).production.version == staged["version"]
    again = pipeline.promote(staged, evaluated.value, METRIC, THRESHOLDS)  # retried task
    assert not again["promoted"]  # "already the production version": no second move
    events = registry.history(model)
    applied = [e.version for e in reversed(events) if e.applied]  # oldest first
    assert applied == [first["version"], staged["version"]]
    interrupted = len(events) - len(applied)
    moved = f"v{staged['version']} in production"
    story = (
        f"evaluate: {evaluated.story('champion scored')}. promote: {promoted.story(moved)} "
        f"({interrupted} interrupted history event kept, marked not applied)"
    )
    table.rows.append(
        Row("MLflow stopped during evaluate and promote", story, duplicates(world, model))
    )


def test_postgresql_restarted_under_mlflow(
    world: World, table: FaultTable, model: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    champion, _ = _ordered(world.trained)

    # register: PostgreSQL restarts as the version is created (MLflow's pool holds dead
    # connections); then stops outright before production moves.
    restart = Trigger(1, world.postgres.restart)
    _wrap(monkeypatch, MlflowClient, "create_model_version", lambda *a, **k: restart())
    registered = with_retries(
        pipeline.register, [champion], THRESHOLDS, restore=world.postgres.ensure_running
    )
    assert restart.fired
    staged = pipeline.stage(registered.value, METRIC)
    evaluation = pipeline.evaluate(VERSION, [champion])

    def stop_before_production(self: Any, name: str, alias: str, version: Any) -> None:
        if alias == registry.PRODUCTION:
            stop()

    stop = Trigger(1, world.postgres.stop)
    _wrap(monkeypatch, MlflowClient, "set_registered_model_alias", stop_before_production)
    promoted = with_retries(
        pipeline.promote,
        staged,
        evaluation,
        METRIC,
        THRESHOLDS,
        restore=world.postgres.ensure_running,
    )
    assert stop.fired and promoted.errors
    assert promoted.value["promoted"], promoted.value
    assert registry.info(model).production.version == staged["version"]
    assert _versions_per_run(world, model) == {champion["run_id"]: 1}
    moved = f"v{staged['version']} in production"
    story = (
        f"register (restart): {registered.story('registered')}. "
        f"promote (stopped): {promoted.story(moved)}"
    )
    table.rows.append(Row("PostgreSQL restarted under MLflow", story, duplicates(world, model)))


def test_slack_down_the_report_still_succeeds(
    world: World, table: FaultTable, model: Settings, slack_receiver: SlackReceiver
) -> None:
    champion, _ = _ordered(world.trained)
    slack_receiver.stop()
    try:
        promotion = _run_through(world, None, champion)
        evaluation = pipeline.evaluate(VERSION, [champion])
        outcome = with_retries(
            pipeline.report, VERSION, evaluation, promotion, restore=slack_receiver.start
        )
        assert not outcome.errors  # a Slack that is down fails nothing, so nothing is retried
        assert VERSION in outcome.value
        assert slack_receiver.messages == []
    finally:
        slack_receiver.start()
    pipeline.report(VERSION, evaluation, promotion)
    assert VERSION in slack_receiver.wait_for(1)[-1]["text"]
    table.rows.append(
        Row(
            "Slack down",
            "report: try 1 succeeded, the message was lost (logged); Slack back: delivered",
            duplicates(world, model),
        )
    )


def test_bad_input_is_never_retried(world: World, table: FaultTable, tmp_path: Path) -> None:
    world.restore()
    write_image_folder(tmp_path / "one", {"good": 12}, size=16, start=20000)
    upload_version(world.store(), tmp_path / "one", "faults-one-label", progress=False)
    calls = []

    def validate(version: str) -> Any:
        calls.append(version)
        return pipeline.validate_data(version)

    with pytest.raises(DataError, match="at least two"):
        with_retries(validate, "faults-one-label", restore=world.restore)
    assert calls == ["faults-one-label"]
    with pytest.raises(TirelibError):
        with_retries(pipeline.split, "faults-missing", restore=world.restore)
    table.rows.append(
        Row(
            "none: bad input (one label; unknown version)",
            "try 1: DataError, failed at once, not retried",
            duplicates(world, get_settings()),
        )
    )
