"""Batch-job metrics of the pipeline, pushed to a Prometheus Pushgateway.

A DAG run is no server Prometheus could scrape: when one ends, the pipeline pushes what it knows
to the Pushgateway at ``TIRE_PUSHGATEWAY_URL`` (unset: nothing is pushed), which Prometheus
scrapes with ``honor_labels``. The names are the metrics contract of
``docker/prometheus/README.md``, which the alert rules read.

Every push goes to the group ``job="tire-pipeline"``, ``dag_id=<the DAG>`` with POST
(prometheus_client's ``pushadd_to_gateway``), which replaces only the metrics it sends: a success
keeps the group's last failure time, a failure its last success time, and a run that promoted
nothing keeps the test metrics of the version promoted before. So every value is a gauge of the
group, never a counter of pushes: the version counts are the lake's, counted at the push.

Pushing never fails the caller: a Pushgateway that is down or refuses the push is one warning.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

from tirelib.settings import Settings
from tirelib.urls import mask_credentials, masked_url

log = logging.getLogger(__name__)

PUSH_JOB = "tire-pipeline"
TIMEOUT_S = 10.0

LAST_SUCCESS = "tire_pipeline_last_success_timestamp_seconds"
LAST_FAILURE = "tire_pipeline_last_failure_timestamp_seconds"
VERSIONS_PROCESSED = "tire_pipeline_versions_processed"
VERSIONS_FAILED = "tire_pipeline_versions_failed"
TRAINING_DURATION = "tire_pipeline_training_duration_seconds"
PROMOTED_TEST_METRIC = "tire_pipeline_promoted_test_metric"
PROMOTED_VERSION = "tire_pipeline_promoted_model_version"

# Every name this module may push, for the contract test and the readers of the metrics.
METRIC_NAMES = (
    LAST_SUCCESS,
    LAST_FAILURE,
    VERSIONS_PROCESSED,
    VERSIONS_FAILED,
    TRAINING_DURATION,
    PROMOTED_TEST_METRIC,
    PROMOTED_VERSION,
)


@dataclass(frozen=True)
class RunMetrics:
    """What one push says about the end of a DAG's run.

    A field left ``None`` (or empty) is not sent, so the group keeps its earlier value.
    ``training_seconds`` is by model type; ``promoted_metrics`` are test metrics by name
    without their ``test_`` prefix (``accuracy``, ``f1``, ...).
    """

    dag_id: str
    succeeded: bool
    at: float = field(default_factory=time.time)
    versions_processed: int | None = None
    versions_failed: int | None = None
    training_seconds: Mapping[str, float] = field(default_factory=dict)
    promoted_version: int | None = None
    promoted_metrics: Mapping[str, float] = field(default_factory=dict)

    def registry(self) -> CollectorRegistry:
        """A registry holding exactly the metrics this push sends."""
        registry = CollectorRegistry(auto_describe=True)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        if self.succeeded:
            gauge(LAST_SUCCESS, "Unix time of the DAG's last successful run.").set(self.at)
        else:
            gauge(LAST_FAILURE, "Unix time of the DAG's last failed run.").set(self.at)
        if self.versions_processed is not None:
            gauge(
                VERSIONS_PROCESSED, "Dataset versions the lake holds as processed, at the push."
            ).set(self.versions_processed)
        if self.versions_failed is not None:
            gauge(
                VERSIONS_FAILED, "Dataset versions the lake holds marked failed, at the push."
            ).set(self.versions_failed)
        if self.training_seconds:
            durations = gauge(
                TRAINING_DURATION,
                "Seconds the last run spent training each model type (a sweep's members summed).",
                ("model_type",),
            )
            for model_type, seconds in self.training_seconds.items():
                durations.labels(model_type=model_type).set(seconds)
        if self.promoted_version is not None:
            gauge(
                PROMOTED_VERSION, "Registry version of the model the pipeline last promoted."
            ).set(self.promoted_version)
        if self.promoted_metrics:
            metrics = gauge(
                PROMOTED_TEST_METRIC,
                "Test metrics of the model the pipeline last promoted, on its test split.",
                ("metric",),
            )
            for name, value in self.promoted_metrics.items():
                metrics.labels(metric=name).set(value)
        return registry


def push(metrics: RunMetrics, settings: Settings, *, timeout: float = TIMEOUT_S) -> bool:
    """Push ``metrics`` to ``settings.pushgateway_url``; True when the Pushgateway took them.

    Never raises: without a URL nothing is pushed, and a Pushgateway that cannot be reached or
    refuses the push is logged as a warning.
    """
    url = settings.pushgateway_url
    if not url:
        log.debug("no TIRE_PUSHGATEWAY_URL: pipeline metrics of %s not pushed", metrics.dag_id)
        return False
    try:
        pushadd_to_gateway(
            url,
            job=PUSH_JOB,
            registry=metrics.registry(),
            grouping_key={"dag_id": metrics.dag_id},
            timeout=timeout,
        )
    # URLError, HTTPError, refusals and timeouts are OSErrors; a malformed answer is an
    # HTTPException; a bad URL a ValueError.
    except (OSError, ValueError, http.client.HTTPException) as error:
        log.warning(
            "pipeline metrics of %s not pushed to %s: %s",
            metrics.dag_id,
            masked_url(url),
            mask_credentials(str(error)),
        )
        return False
    outcome = "success" if metrics.succeeded else "failure"
    log.info("pushed the %s of %s to %s", outcome, metrics.dag_id, masked_url(url))
    return True
