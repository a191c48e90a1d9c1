"""The local stack on loopback: SeaweedFS (S3), MLflow, Prometheus, Alertmanager, the Pushgateway,
the model server and Airflow.

``tirelib stack up|down|status`` calls :class:`Stack`. The package has one module per concern:

- :mod:`~tirelib.stack.ports`: free ports on 127.0.0.1 and HTTP readiness checks;
- :mod:`~tirelib.stack.process`: :class:`ManagedProcess` (a child process remembered by a pid
  file with its start time, stopped by process group, never by name) and :class:`Component`
  (a process plus what happens before it starts and after it answers);
- :mod:`~tirelib.stack.services`: SeaweedFS's ``weed mini`` and ``mlflow server``;
- :mod:`~tirelib.stack.pgpool`: PgPool-II in front of the MLflow database (``TIRE_PGPOOL``);
- :mod:`~tirelib.stack.monitoring`: Prometheus (the project's rules), Alertmanager (to Slack)
  and the Pushgateway, each when installed;
- :mod:`~tirelib.stack.serving`: the model server, ``tirelib serve`` following production;
- :mod:`~tirelib.stack.airflow`: Airflow's configuration, environment, connections and pool;
- :mod:`~tirelib.stack.celery`: Airflow on CeleryExecutor, each component a process, a worker
  per queue;
- :mod:`~tirelib.stack.stack`: :class:`Stack`, the servers in order.

Every name is importable from ``tirelib.stack`` itself.
"""

from __future__ import annotations

from tirelib.stack.airflow import (
    AIRFLOW_TEMPLATE,
    TRAINING_POOL,
    airflow_command,
    airflow_component,
    airflow_connections,
    airflow_env,
    airflow_password,
    airflow_url,
    create_pool,
    project_root,
    render_airflow_config,
)
from tirelib.stack.celery import celery_components, check_broker, worker_name
from tirelib.stack.monitoring import (
    SERVER_JOB,
    alertmanager_url,
    monitoring_components,
    prometheus_url,
    pushgateway_url,
    render_alertmanager_config,
    render_prometheus_config,
)
from tirelib.stack.pgpool import (
    RESET_QUERY_LIST,
    pgpool_binary,
    pgpool_component,
    pgpool_url,
    render_pgpool_config,
)
from tirelib.stack.ports import HOST, HttpCheck, free_port, free_port_pair, port_is_free
from tirelib.stack.process import (
    Component,
    ComponentStatus,
    ManagedProcess,
    PidRecord,
    find_executable,
    log_tail,
)
from tirelib.stack.services import (
    PLACEHOLDER_KEY,
    WEED_GRPC_OFFSET,
    create_buckets,
    mlflow_backend_uri,
    mlflow_component,
    mlflow_url,
    s3_url,
    seaweedfs_component,
    upgrade_database,
    weed_binary,
)
from tirelib.stack.serving import served_version, server_component, server_url, wait_serving
from tirelib.stack.stack import Stack
from tirelib.urls import masked_url, sqlalchemy_url

__all__ = [
    "AIRFLOW_TEMPLATE",
    "HOST",
    "PLACEHOLDER_KEY",
    "RESET_QUERY_LIST",
    "SERVER_JOB",
    "TRAINING_POOL",
    "WEED_GRPC_OFFSET",
    "Component",
    "ComponentStatus",
    "HttpCheck",
    "ManagedProcess",
    "PidRecord",
    "Stack",
    "airflow_command",
    "airflow_component",
    "airflow_connections",
    "airflow_env",
    "airflow_password",
    "airflow_url",
    "alertmanager_url",
    "celery_components",
    "check_broker",
    "create_buckets",
    "create_pool",
    "find_executable",
    "free_port",
    "free_port_pair",
    "log_tail",
    "masked_url",
    "mlflow_backend_uri",
    "mlflow_component",
    "mlflow_url",
    "monitoring_components",
    "pgpool_binary",
    "pgpool_component",
    "pgpool_url",
    "port_is_free",
    "project_root",
    "prometheus_url",
    "pushgateway_url",
    "render_airflow_config",
    "render_alertmanager_config",
    "render_pgpool_config",
    "render_prometheus_config",
    "s3_url",
    "seaweedfs_component",
    "served_version",
    "server_component",
    "server_url",
    "sqlalchemy_url",
    "upgrade_database",
    "wait_serving",
    "weed_binary",
    "worker_name",
]
