"""Prometheus, Alertmanager and the Pushgateway in the local stack, when they are installed.

Debian's packages (``prometheus``, ``prometheus-alertmanager``, ``prometheus-pushgateway``;
``make system-deps`` installs them as root) provide the binaries; each missing one is skipped
with one log line and the stack runs without it. Each binds 127.0.0.1 on its port setting and
keeps its state under ``<stack_dir>/<name>/``. Their configuration is written at each start:

- Prometheus scrapes the local model server as job ``model-server`` (the name the rules select
  on), the Pushgateway (``honor_labels``, so the pipeline's ``job`` and ``dag_id`` stay) and
  itself, evaluates ``docker/prometheus/rules/*.yml`` and sends alerts to the local Alertmanager.
- Alertmanager takes ``docker/alertmanager/alertmanager.yml`` (route, grouping, inhibition,
  the Slack templates) with the webhook URL of ``TIRE_SLACK_WEBHOOK_URL`` in a file of its own
  (mode 0600), as the compose service does; without one, alerts show in its UI and go nowhere.
- The Pushgateway keeps what was pushed in a file, so a restart keeps the last success times.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tirelib.errors import StackError
from tirelib.settings import Settings
from tirelib.stack.airflow import project_root
from tirelib.stack.ports import HOST, HttpCheck
from tirelib.stack.process import Component, ManagedProcess, find_executable

log = logging.getLogger(__name__)

# The job name the rules of docker/prometheus/rules select the model server by.
SERVER_JOB = "model-server"
PUSHGATEWAY_JOB = "pushgateway"
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
PUSHGATEWAY_BINARIES = ("prometheus-pushgateway", "pushgateway")
# Each component's Debian package, for the line that says it is missing.
PACKAGES = {
    "pushgateway": "prometheus-pushgateway",
    "alertmanager": "prometheus-alertmanager",
    "prometheus": "prometheus",
}


def prometheus_url(settings: Settings) -> str:
    return f"http://{HOST}:{settings.prometheus_port}"


def alertmanager_url(settings: Settings) -> str:
    return f"http://{HOST}:{settings.alertmanager_port}"


def pushgateway_url(settings: Settings) -> str:
    return f"http://{HOST}:{settings.pushgateway_port}"


def monitoring_binary(names: Sequence[str]) -> Path | None:
    """The first of ``names`` beside the interpreter or on PATH (Debian: /usr/bin)."""
    for name in names:
        found = find_executable(name)
        if found is not None:
            return found
    return None


def _docker_file(*parts: str) -> Path:
    path = project_root().joinpath("docker", *parts)
    if not path.exists():
        raise StackError(f"{path} is missing: it ships with the project's source tree")
    return path


def render_prometheus_config(
    settings: Settings,
    *,
    pushgateway: bool = True,
    alertmanager: bool = True,
    interval: str = "15s",
) -> Path:
    """Write ``<stack_dir>/prometheus/prometheus.yml`` for the local servers; return its path.

    ``interval`` is both the scrape and the rule evaluation interval. The Pushgateway and
    Alertmanager are named only when the stack runs them.
    """
    rules = _docker_file("prometheus", "rules")
    scrape: list[dict[str, Any]] = [
        {
            "job_name": SERVER_JOB,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"{HOST}:{settings.serve_port}"]}],
        }
    ]
    if pushgateway:
        scrape.append(
            {
                "job_name": PUSHGATEWAY_JOB,
                "honor_labels": True,  # the pushed job and dag_id labels stay
                "static_configs": [{"targets": [f"{HOST}:{settings.pushgateway_port}"]}],
            }
        )
    scrape.append(
        {
            "job_name": "prometheus",
            "static_configs": [{"targets": [f"{HOST}:{settings.prometheus_port}"]}],
        }
    )
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules / "*.yml")],
        "scrape_configs": scrape,
    }
    if alertmanager:
        targets = [f"{HOST}:{settings.alertmanager_port}"]
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": targets}]}]}
    folder = settings.stack_dir.absolute() / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(
        "# Written by tirelib at each start of the local Prometheus; edits are lost.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def render_alertmanager_config(settings: Settings, *, group_wait: str | None = None) -> Path:
    """Write ``<stack_dir>/alertmanager/alertmanager.yml`` from the deployment's own file.

    The route, grouping, inhibition and Slack templates are ``docker/alertmanager``'s. With
    ``TIRE_SLACK_WEBHOOK_URL`` the Slack receiver reads the URL from a file beside the config
    (mode 0600), never from the config itself; without it the receiver sends nothing.
    ``group_wait`` shortens the wait before a new group's first message (and the interval
    between its updates), for tests.
    """
    source = _docker_file("alertmanager", "alertmanager.yml")
    config = yaml.safe_load(source.read_text())
    config["templates"] = [str(source.parent / template) for template in config["templates"]]
    folder = settings.stack_dir.absolute() / "alertmanager"
    folder.mkdir(parents=True, exist_ok=True)
    webhook_file = folder / "slack-webhook-url"
    webhook = settings.slack_webhook_url
    if webhook is not None:
        # Created private before the secret is written into it.
        fd = os.open(webhook_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(webhook.get_secret_value() + "\n")
        webhook_file.chmod(0o600)
    else:
        webhook_file.unlink(missing_ok=True)
        log.info("no TIRE_SLACK_WEBHOOK_URL: Alertmanager shows alerts but sends them nowhere")
    for receiver in config["receivers"]:
        if webhook is None:
            receiver.pop("slack_configs", None)
        for slack in receiver.get("slack_configs", []):
            slack.pop("api_url", None)
            slack["api_url_file"] = str(webhook_file)
    if group_wait is not None:
        config["route"].update(group_wait=group_wait, group_interval=group_wait)
    path = folder / "alertmanager.yml"
    path.write_text(
        "# Written by tirelib at each start of the local Alertmanager from "
        "docker/alertmanager/alertmanager.yml; edits are lost.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def pushgateway_component(settings: Settings, binary: Path) -> Component:
    """The Pushgateway on 127.0.0.1:``settings.pushgateway_port``, persisted to a file."""
    state_dir = settings.stack_dir.absolute()
    folder = state_dir / "pushgateway"
    url = pushgateway_url(settings)
    process = ManagedProcess(
        "pushgateway",
        [
            str(binary),
            f"--web.listen-address={HOST}:{settings.pushgateway_port}",
            f"--persistence.file={folder / 'metrics'}",
            "--persistence.interval=1m",
        ],
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/-/ready"),
        cwd=folder,
        title="Pushgateway",
        url=url,
        ports=(settings.pushgateway_port,),
    )
    return Component(process, ready_timeout=30.0)


def alertmanager_component(
    settings: Settings, binary: Path, *, group_wait: str | None = None
) -> Component:
    """Alertmanager on 127.0.0.1:``settings.alertmanager_port``, one instance (no gossip)."""
    state_dir = settings.stack_dir.absolute()
    folder = state_dir / "alertmanager"
    url = alertmanager_url(settings)
    config = folder / "alertmanager.yml"
    process = ManagedProcess(
        "alertmanager",
        [
            str(binary),
            f"--config.file={config}",
            f"--storage.path={folder / 'data'}",
            f"--web.listen-address={HOST}:{settings.alertmanager_port}",
            "--cluster.listen-address=",
        ],
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/-/ready"),
        cwd=folder,
        title="Alertmanager",
        url=url,
        ports=(settings.alertmanager_port,),
    )

    def configure() -> None:
        render_alertmanager_config(settings, group_wait=group_wait)

    return Component(process, ready_timeout=30.0, before_start=configure)


def prometheus_component(
    settings: Settings,
    binary: Path,
    *,
    pushgateway: bool = True,
    alertmanager: bool = True,
    interval: str = "15s",
) -> Component:
    """Prometheus on 127.0.0.1:``settings.prometheus_port`` with the project's rules."""
    state_dir = settings.stack_dir.absolute()
    folder = state_dir / "prometheus"
    url = prometheus_url(settings)
    process = ManagedProcess(
        "prometheus",
        [
            str(binary),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={HOST}:{settings.prometheus_port}",
        ],
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/-/ready"),
        cwd=folder,
        title="Prometheus",
        url=url,
        ports=(settings.prometheus_port,),
    )

    def configure() -> None:
        render_prometheus_config(
            settings, pushgateway=pushgateway, alertmanager=alertmanager, interval=interval
        )

    return Component(process, ready_timeout=60.0, before_start=configure)


def monitoring_components(
    settings: Settings, *, interval: str = "15s", group_wait: str | None = None
) -> list[Component]:
    """The Pushgateway, Alertmanager and Prometheus, those of them that are installed.

    Each missing binary is one log line; the others start without it. ``interval`` (scrapes and
    rule evaluation) and ``group_wait`` (Alertmanager) are shortened by tests.
    """
    binaries = {
        "pushgateway": monitoring_binary(PUSHGATEWAY_BINARIES),
        "alertmanager": monitoring_binary(ALERTMANAGER_BINARIES),
        "prometheus": monitoring_binary(PROMETHEUS_BINARIES),
    }
    for name, binary in binaries.items():
        if binary is None:
            log.info(
                "%s is not installed (apt-get install %s): the stack runs without it",
                name,
                PACKAGES[name],
            )
    pushgateway = binaries["pushgateway"]
    alertmanager = binaries["alertmanager"]
    prometheus = binaries["prometheus"]
    components = []
    if pushgateway is not None:
        components.append(pushgateway_component(settings, pushgateway))
    if alertmanager is not None:
        components.append(alertmanager_component(settings, alertmanager, group_wait=group_wait))
    if prometheus is not None:
        components.append(
            prometheus_component(
                settings,
                prometheus,
                pushgateway=pushgateway is not None,
                alertmanager=alertmanager is not None,
                interval=interval,
            )
        )
    return components
