"""Grafana dashboards as code: serving, model quality and pipeline, built with Grafana's own
``grafana-foundation-sdk`` and written as JSON to ``docker/grafana/dashboards/``.

    python docker/grafana/dashboards.py            # write the JSON files
    python docker/grafana/dashboards.py --check    # exit 1 when a file differs from the code

Grafana provisions the files (``provisioning/dashboards/tire.yaml``); nobody edits them by hand.
The queries read the metric names of ``tirelib/serve/metrics.py`` and the contract in
``docker/prometheus/README.md``, and the recording rules of ``docker/prometheus/rules/`` where
one exists, so a panel and the alert about it show the same number. Every panel's query is
evaluated against a real Prometheus in ``tests/integration/test_grafana_dashboards.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    prometheus,
    stat,
    timeseries,
)
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards"

# The data source of provisioning/datasources/prometheus.yaml, by its uid.
DATASOURCE_UID = "prometheus"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)

# The inference routes, as the recording rule of the p99 latency selects them.
INFERENCE_ROUTES = ".*(:predict|:classify|:upload|/infer)"

# The alerts' thresholds (docker/prometheus/rules/alerts.yml), drawn on the panels that show
# the same quantity; a test checks that each one is still the alert's.
ERROR_RATIO_SLO = 0.05  # TireServer5xxRatioHigh
LATENCY_P99_SLO = 0.5  # TireServerLatencyP99High, seconds
MIX_DRIFT_POINTS = 0.15  # TirePredictionMixDrift, share of defective predictions
CONFIDENCE_DROP = 0.1  # TireConfidenceDrop, below the baseline's mean
ACCURACY_FLOOR = 0.8  # TireLiveAccuracyDrop
MIN_LABELS = 50  # TireLiveAccuracyDrop, labels in the hour
NO_SUCCESS_SECONDS = 7 * 86400  # TireNoSuccessfulRun

GREEN, YELLOW, RED, BLUE = "green", "#EAB839", "red", "blue"
RANGE = "$__range"
RATE = "$__rate_interval"
INTERVAL = "$__interval"  # the query's step


# --- building blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    """One PromQL target: the expression, its legend, and how Grafana asks for it."""

    expr: str
    legend: str = ""
    instant: bool = False
    heatmap: bool = False  # cumulative ``le`` buckets shown per bucket


def _targets(queries: Sequence[Q]) -> list[Builder[Dataquery]]:
    targets: list[Builder[Dataquery]] = []
    for ref, q in zip("ABCDEFGH", queries, strict=False):
        target = (
            prometheus.Dataquery()
            .ref_id(ref)
            .datasource(DATASOURCE)
            .expr(q.expr)
            .legend_format(q.legend or "__auto")
        )
        target = target.instant() if q.instant else target.range()
        if q.heatmap:
            target = target.format(PromQueryFormat.HEATMAP)
        targets.append(target)
    return targets


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def timeseries_panel(
    title: str,
    description: str,
    queries: Sequence[Q],
    *,
    unit: str = "short",
    span: int = 8,
    height: int = 8,
    stacked: bool = False,
    bars: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    threshold: tuple[float, str] | None = None,
    soft_max: float | None = None,
    dashed: str | None = None,
) -> timeseries.Panel:
    """A time series; ``threshold`` draws a dashed line where an alert fires (``soft_max`` keeps
    it in view when the data stay far below), ``dashed`` draws the series whose name matches
    that regex dashed (a baseline beside the live value)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .span(span)
        .height(height)
        .fill_opacity(60 if bars or stacked else 10)
        .line_width(1 if bars else 2)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(
            common.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.NONE)
        )
    )
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS)
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    if soft_max is not None:
        panel = panel.axis_soft_max(soft_max)
    if threshold is not None:
        value, color = threshold
        panel = panel.thresholds(
            _thresholds((None, "transparent"), (value, color))
        ).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    if dashed is not None:
        panel = panel.override_by_regexp(
            dashed,
            [dm.DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})],
        )
    return panel


def stat_panel(
    title: str,
    description: str,
    queries: Sequence[Q],
    *,
    unit: str = "short",
    steps: Sequence[tuple[float | None, str]] = ((None, GREEN),),
    span: int = 4,
    height: int = 4,
    text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO,
    mappings: dict[str, tuple[str, str]] | None = None,
    decimals: int | None = None,
) -> stat.Panel:
    """A big number (the last value of each series), coloured by ``steps``."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .span(span)
        .height(height)
        .thresholds(_thresholds(*steps))
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .text_mode(text_mode)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    if mappings:
        options = {
            value: dm.ValueMappingResult(text=text, color=color, index=index)
            for index, (value, (text, color)) in enumerate(mappings.items())
        }
        panel = panel.mappings([dm.ValueMap(options=options)])
    return panel


def distribution_panel(
    title: str, description: str, metric: str, selector: str, *, unit: str = "short", span: int = 8
) -> bargauge.Panel:
    """Each bucket's share of a histogram's observations over the dashboard's time range."""
    expr = f"sum by (le) (increase({metric}_bucket{{{selector}}}[{RANGE}]))"
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets([Q(expr, "{{le}}", instant=True, heatmap=True)]))
        .unit(unit)
        .span(span)
        .height(8)
        .min(0)
        .thresholds(_thresholds((None, BLUE)))
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def bars_panel(
    title: str, description: str, queries: Sequence[Q], *, unit: str = "short", span: int = 8
) -> bargauge.Panel:
    """One bar per series: the last value (instant queries)."""
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .span(span)
        .height(8)
        .min(0)
        .thresholds(_thresholds((None, BLUE)))
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def query_variable(
    name: str, label: str, query: str, *, include_all: bool = False
) -> dashboard.QueryVariable:
    """A variable from ``label_values(...)``; with ``include_all``, "All" is the regex ``.*``
    (panels select with ``=~``), and several values may be picked."""
    variable = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.NATURAL_ASC)
    )
    if include_all:
        variable = variable.include_all(True).all_value(".*").multi(True)
    return variable


def _dashboard(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["tire"])
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("Tire dashboards")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["tire"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def _numbered(board: dm.Dashboard) -> dm.Dashboard:
    """Give every panel (rows included) a stable id, in reading order."""
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    return board


# --- the dashboards --------------------------------------------------------------------------

SERVER = 'job=~"$job", instance=~"$instance"'


def serving() -> dm.Dashboard:
    """Traffic, latency, errors, batching, the version served, predictions and confidence."""
    inference = f'{SERVER}, endpoint=~"{INFERENCE_ROUTES}"'
    latency = "tire_http_request_duration_seconds_bucket"
    board = (
        _dashboard(
            "tire-serving",
            "Tire model server",
            "The model server's replicas: traffic, latency, errors, dynamic batching, the model "
            "version served and what it predicts.",
        )
        .with_variable(query_variable("job", "Job", "label_values(tire_model_info, job)"))
        .with_variable(
            query_variable(
                "instance",
                "Replica",
                'label_values(tire_model_info{job=~"$job"}, instance)',
                include_all=True,
            )
        )
        .with_row(dashboard.Row("Service level (all replicas, as the alerts read it)"))
        .with_panel(
            stat_panel(
                "Model version served",
                "The registry version each replica serves (tire_model_info); more than one "
                "value is a rollout in progress.",
                [
                    Q(
                        f"max by (version, model_type) (tire_model_info{{{SERVER}}})",
                        "v{{version}} · {{model_type}}",
                        instant=True,
                    )
                ],
                text_mode=cm.BigValueTextMode.NAME,
                steps=((None, BLUE),),
            )
        )
        .with_panel(
            stat_panel(
                "Replicas up",
                "Replicas that answer Prometheus' scrape.",
                [Q(f"sum(up{{{SERVER}}})", instant=True)],
                steps=((None, RED), (1, GREEN)),
                decimals=0,
            )
        )
        .with_panel(
            stat_panel(
                "Requests per second",
                "All routes over 5 minutes (job:tire_http_requests:rate5m).",
                [Q('sum(job:tire_http_requests:rate5m{job=~"$job"})', instant=True)],
                unit="reqps",
            )
        )
        .with_panel(
            stat_panel(
                "5xx ratio (5 min)",
                f"Share of answers that are 5xx; TireServer5xxRatioHigh fires over "
                f"{ERROR_RATIO_SLO:.0%} for 5 minutes.",
                [
                    Q(
                        # The recorded ratio has no series while there is no 5xx at all: 0 then.
                        'max(job:tire_http_requests_5xx:ratio_rate5m{job=~"$job"}) or on () '
                        '(0 * sum(job:tire_http_requests:rate5m{job=~"$job"}))',
                        instant=True,
                    )
                ],
                unit="percentunit",
                steps=((None, GREEN), (ERROR_RATIO_SLO, RED)),
            )
        )
        .with_panel(
            stat_panel(
                "p99 latency, inference (5 min)",
                f"99th percentile of the inference routes; the SLO is {LATENCY_P99_SLO} s "
                "(TireServerLatencyP99High).",
                [
                    Q(
                        'max(job:tire_inference_request_duration_seconds:p99_5m{job=~"$job"})',
                        instant=True,
                    )
                ],
                unit="s",
                steps=((None, GREEN), (LATENCY_P99_SLO, RED)),
            )
        )
        .with_panel(
            stat_panel(
                "Since the last model load",
                "Time since a replica last swapped in a model version.",
                [
                    Q(
                        f"time() - max(tire_model_last_reload_timestamp_seconds{{{SERVER}}})",
                        instant=True,
                    )
                ],
                unit="dtdurations",
                steps=((None, BLUE),),
            )
        )
        .with_row(dashboard.Row("Traffic and latency"))
        .with_panel(
            timeseries_panel(
                "Requests by route and status",
                "Answers per second by route template and status code.",
                [
                    Q(
                        f"sum by (endpoint, status) "
                        f"(rate(tire_http_requests_total{{{SERVER}}}[{RATE}]))",
                        "{{endpoint}} {{status}}",
                    )
                ],
                unit="reqps",
                stacked=True,
            )
        )
        .with_panel(
            timeseries_panel(
                "Errors by route and status",
                "4xx (bad input: the message names the problem) and 5xx answers per second.",
                [
                    Q(
                        f"sum by (endpoint, status) (rate(tire_http_requests_total"
                        f'{{{SERVER}, status=~"[45].."}}[{RATE}]))',
                        "{{endpoint}} {{status}}",
                    )
                ],
                unit="reqps",
                bars=True,
            )
        )
        .with_panel(
            timeseries_panel(
                "Latency of the inference routes",
                "Quantiles of the time from a request's arrival to the end of its answer.",
                [
                    Q(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate({latency}{{{inference}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.9, 0.99)
                ],
                unit="s",
                threshold=(LATENCY_P99_SLO, RED),
                soft_max=LATENCY_P99_SLO,
            )
        )
        .with_panel(
            timeseries_panel(
                "Dynamic batching: images per forward pass",
                "How many images each forward pass took: concurrent requests are gathered up "
                "to the maximum batch size or the maximum wait.",
                [
                    Q(
                        f"sum(rate(tire_inference_batch_size_sum{{{SERVER}}}[{RATE}])) / "
                        f"sum(rate(tire_inference_batch_size_count{{{SERVER}}}[{RATE}]))",
                        "mean",
                    ),
                    Q(
                        f"histogram_quantile(0.99, sum by (le) "
                        f"(rate(tire_inference_batch_size_bucket{{{SERVER}}}[{RATE}])))",
                        "p99",
                    ),
                ],
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Forward pass duration",
                "Time of one batched forward pass.",
                [
                    Q(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(tire_inference_duration_seconds_bucket{{{SERVER}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ],
                unit="s",
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Replicas by model version",
                "How many replicas serve each version: a promotion shows as one line handing "
                "over to the next.",
                [Q(f"count by (version) (tire_model_info{{{SERVER}}})", "v{{version}}")],
                span=8,
                minimum=0,
            )
        )
        .with_row(dashboard.Row("Predictions"))
        .with_panel(
            timeseries_panel(
                "Predictions by class",
                "Images classified per second, by predicted class.",
                [
                    Q(
                        f"sum by (class) (rate(tire_predictions_total{{{SERVER}}}[{RATE}]))",
                        "{{class}}",
                    )
                ],
                unit="suffix: img/s",
                stacked=True,
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Confidence of the predicted class",
                "Mean and 10th percentile of the probability of the predicted class.",
                [
                    Q(
                        f"sum(rate(tire_prediction_confidence_sum{{{SERVER}}}[{RATE}])) / "
                        f"sum(rate(tire_prediction_confidence_count{{{SERVER}}}[{RATE}]))",
                        "mean",
                    ),
                    Q(
                        f"histogram_quantile(0.1, sum by (le) "
                        f"(rate(tire_prediction_confidence_bucket{{{SERVER}}}[{RATE}])))",
                        "p10",
                    ),
                ],
                unit="percentunit",
                maximum=1,
                span=8,
            )
        )
        .with_panel(
            distribution_panel(
                "Confidence distribution (time range)",
                "Predictions per confidence bucket over the dashboard's time range.",
                "tire_prediction_confidence",
                SERVER,
            )
        )
        .with_panel(
            timeseries_panel(
                "Model loads by result",
                "Attempts to load a model version; a failed one never replaces the version "
                "being served (TireModelReloadFailing).",
                [
                    Q(
                        f"sum by (result) (increase(tire_model_reloads_total{{{SERVER}}}[{RATE}]))",
                        "{{result}}",
                    )
                ],
                bars=True,
                span=24,
                height=6,
            )
        )
    )
    return _numbered(board.build())


FEEDBACK = 'job=~"$job", version=~"$version"'


def model_quality() -> dm.Dashboard:
    """Live accuracy, precision and recall from feedback; drift against the training baseline."""
    board = (
        _dashboard(
            "tire-model-quality",
            "Tire model quality",
            "How the served model does on real traffic: live accuracy, precision and recall "
            "from the true labels sent as feedback, and drift of its predictions and inputs "
            "against the baseline stored with the model at training.",
        )
        .with_variable(query_variable("job", "Job", "label_values(tire_model_info, job)"))
        .with_variable(
            query_variable(
                "version",
                "Model version",
                'label_values(tire_feedback_labels_total{job=~"$job"}, version)',
                include_all=True,
            )
        )
        .with_row(dashboard.Row("Live quality from feedback (last hour)"))
        .with_panel(
            stat_panel(
                "Live accuracy",
                f"Correct over labelled predictions in the last hour, by model version; "
                f"TireLiveAccuracyDrop fires under {ACCURACY_FLOOR:.0%} with at least "
                f"{MIN_LABELS} labels.",
                [
                    Q(
                        f"job_version:tire_feedback_accuracy:ratio_rate1h{{{FEEDBACK}}}",
                        "v{{version}}",
                        instant=True,
                    )
                ],
                unit="percentunit",
                steps=((None, RED), (ACCURACY_FLOOR, GREEN)),
            )
        )
        .with_panel(
            stat_panel(
                "Precision of defective",
                "Of the images predicted defective and labelled, the share that were defective.",
                [
                    Q(
                        f"job_version_class:tire_feedback_precision:ratio_rate1h"
                        f'{{{FEEDBACK}, class="defective"}}',
                        "v{{version}}",
                        instant=True,
                    )
                ],
                unit="percentunit",
                steps=((None, YELLOW), (ACCURACY_FLOOR, GREEN)),
            )
        )
        .with_panel(
            stat_panel(
                "Recall of defective",
                "Of the labelled defective tires, the share the model caught.",
                [
                    Q(
                        f"job_version_class:tire_feedback_recall:ratio_rate1h"
                        f'{{{FEEDBACK}, class="defective"}}',
                        "v{{version}}",
                        instant=True,
                    )
                ],
                unit="percentunit",
                steps=((None, YELLOW), (ACCURACY_FLOOR, GREEN)),
            )
        )
        .with_panel(
            stat_panel(
                "Labels in the last hour",
                f"Predictions given their true label; live accuracy is judged from "
                f"{MIN_LABELS} on.",
                [
                    Q(
                        f"sum by (version) "
                        f"(job_version:tire_feedback_labels:increase1h{{{FEEDBACK}}})",
                        "v{{version}}",
                        instant=True,
                    )
                ],
                steps=((None, YELLOW), (MIN_LABELS, GREEN)),
                decimals=0,
            )
        )
        .with_panel(
            stat_panel(
                "Defective share vs baseline",
                f"Share of defective predictions in the last hour minus the baseline's; "
                f"TirePredictionMixDrift fires beyond ±{MIX_DRIFT_POINTS:.0%}.",
                [
                    Q(
                        'job_class:tire_predictions:share_rate1h{job=~"$job", class="defective"}'
                        " - on (job, class) "
                        "job_class:tire_model_baseline_class_share:avg"
                        '{job=~"$job", class="defective"}',
                        instant=True,
                    )
                ],
                unit="percentunit",
                steps=(
                    (None, RED),
                    (-MIX_DRIFT_POINTS, GREEN),
                    (MIX_DRIFT_POINTS, RED),
                ),
            )
        )
        .with_panel(
            stat_panel(
                "Confidence vs baseline",
                f"Mean confidence in the last hour minus the baseline's; TireConfidenceDrop "
                f"fires {CONFIDENCE_DROP} below.",
                [
                    Q(
                        'job:tire_prediction_confidence:mean_rate1h{job=~"$job"} - on (job) '
                        'job:tire_model_baseline_confidence_mean:avg{job=~"$job"}',
                        instant=True,
                    )
                ],
                unit="percentunit",
                steps=((None, RED), (-CONFIDENCE_DROP, GREEN)),
            )
        )
        .with_row(dashboard.Row("Live quality over time"))
        .with_panel(
            timeseries_panel(
                "Live accuracy by model version (1 h window)",
                "Correct over labelled predictions in the trailing hour; the dashed line is the "
                "alert's floor.",
                [
                    Q(
                        f"job_version:tire_feedback_accuracy:ratio_rate1h{{{FEEDBACK}}}",
                        "v{{version}}",
                    )
                ],
                unit="percentunit",
                minimum=0,
                maximum=1,
                threshold=(ACCURACY_FLOOR, RED),
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Precision and recall of defective (1 h window)",
                "A missed defect is the costly error: recall is the number to watch.",
                [
                    Q(
                        f"job_version_class:tire_feedback_precision:ratio_rate1h"
                        f'{{{FEEDBACK}, class="defective"}}',
                        "precision v{{version}}",
                    ),
                    Q(
                        f"job_version_class:tire_feedback_recall:ratio_rate1h"
                        f'{{{FEEDBACK}, class="defective"}}',
                        "recall v{{version}}",
                    ),
                ],
                unit="percentunit",
                minimum=0,
                maximum=1,
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Feedback volume",
                "Labels received per second, and how many of them the model had right.",
                [
                    Q(
                        f"sum by (version) "
                        f"(rate(tire_feedback_labels_total{{{FEEDBACK}}}[{RATE}]))",
                        "labelled v{{version}}",
                    ),
                    Q(
                        f"sum by (version) "
                        f"(rate(tire_feedback_correct_total{{{FEEDBACK}}}[{RATE}]))",
                        "correct v{{version}}",
                    ),
                ],
                unit="suffix: labels/s",
                span=8,
            )
        )
        .with_panel(
            bars_panel(
                "Feedback by true and predicted class (time range)",
                "The confusion matrix of the labelled predictions over the time range.",
                [
                    Q(
                        f"sum by (class, predicted_class) "
                        f"(increase(tire_feedback_labels_total{{{FEEDBACK}}}[{RANGE}]))",
                        "{{class}} → {{predicted_class}}",
                        instant=True,
                    )
                ],
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prediction mix vs baseline (1 h window)",
                "Each class's share of the predictions in the trailing hour (solid) and in the "
                "served model's baseline (dashed).",
                [
                    Q('job_class:tire_predictions:share_rate1h{job=~"$job"}', "live {{class}}"),
                    Q(
                        'job_class:tire_model_baseline_class_share:avg{job=~"$job"}',
                        "baseline {{class}}",
                    ),
                ],
                unit="percentunit",
                minimum=0,
                maximum=1,
                dashed="baseline.*",
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Mean confidence vs baseline (1 h window)",
                "Mean probability of the predicted class on live traffic (solid) and on the "
                "model's test split at training (dashed).",
                [
                    Q('job:tire_prediction_confidence:mean_rate1h{job=~"$job"}', "live"),
                    Q('job:tire_model_baseline_confidence_mean:avg{job=~"$job"}', "baseline"),
                ],
                unit="percentunit",
                maximum=1,
                dashed="baseline",
                span=8,
            )
        )
        .with_row(dashboard.Row("Input drift"))
        .with_panel(
            timeseries_panel(
                "Input brightness",
                "Mean grayscale level of the images served, in [0, 1], with the 10th and 90th "
                "percentiles.",
                [
                    Q(
                        f'sum(rate(tire_input_brightness_sum{{job=~"$job"}}[{RATE}])) / '
                        f'sum(rate(tire_input_brightness_count{{job=~"$job"}}[{RATE}]))',
                        "mean",
                    ),
                    *(
                        Q(
                            f"histogram_quantile({q}, sum by (le) "
                            f'(rate(tire_input_brightness_bucket{{job=~"$job"}}[{RATE}])))',
                            f"p{round(q * 100)}",
                        )
                        for q in (0.1, 0.9)
                    ),
                ],
                minimum=0,
                maximum=1,
                span=6,
            )
        )
        .with_panel(
            distribution_panel(
                "Brightness distribution (time range)",
                "Images per brightness bucket; the monitoring DAG compares these shares with "
                "the baseline's by PSI.",
                "tire_input_brightness",
                'job=~"$job"',
                span=6,
            )
        )
        .with_panel(
            timeseries_panel(
                "Input contrast",
                "Standard deviation of the images' grayscale levels, with the 10th and 90th "
                "percentiles.",
                [
                    Q(
                        f'sum(rate(tire_input_contrast_sum{{job=~"$job"}}[{RATE}])) / '
                        f'sum(rate(tire_input_contrast_count{{job=~"$job"}}[{RATE}]))',
                        "mean",
                    ),
                    *(
                        Q(
                            f"histogram_quantile({q}, sum by (le) "
                            f'(rate(tire_input_contrast_bucket{{job=~"$job"}}[{RATE}])))',
                            f"p{round(q * 100)}",
                        )
                        for q in (0.1, 0.9)
                    ),
                ],
                minimum=0,
                span=6,
            )
        )
        .with_panel(
            distribution_panel(
                "Contrast distribution (time range)",
                "Images per contrast bucket over the time range.",
                "tire_input_contrast",
                'job=~"$job"',
                span=6,
            )
        )
    )
    return _numbered(board.build())


DAG = 'dag_id=~"$dag_id"'
# Fractions only: the promoted model's loss is no percentage.
PROMOTED = 'tire_pipeline_promoted_test_metric{metric=~"accuracy|precision|recall|f1|roc_auc"}'


def runs(metric: str) -> str:
    """1 for each DAG whose ``metric`` (a run's end time) changed in the step, else 0; a series
    that appeared in the step counts too (``changes()`` would miss a DAG's first run, and a
    change between two windows)."""
    now = f"max by (dag_id) ({metric}{{{DAG}}})"
    before = f"max by (dag_id) ({metric}{{{DAG}}} offset {INTERVAL})"
    return f"({now} != bool {before}) or (({now} unless {before}) * 0 + 1)"


def pipeline() -> dm.Dashboard:
    """Runs and failures per DAG, time since the last success, training, what was promoted."""
    success = f"max by (dag_id) (tire_pipeline_last_success_timestamp_seconds{{{DAG}}})"
    failure = f"max by (dag_id) (tire_pipeline_last_failure_timestamp_seconds{{{DAG}}})"
    board = (
        _dashboard(
            "tire-pipeline",
            "Tire pipeline",
            "The Airflow DAGs' batch-job metrics, pushed to the Pushgateway: runs and failures, "
            "time since the last success, training durations and the test metrics of the "
            "model promoted.",
        )
        .with_variable(
            query_variable(
                "dag_id",
                "DAG",
                'label_values(push_time_seconds{job="tire-pipeline"}, dag_id)',
                include_all=True,
            )
        )
        .with_row(dashboard.Row("Now"))
        .with_panel(
            stat_panel(
                "Last run",
                "Whether each DAG's latest outcome is a failure (TirePipelineFailed).",
                [
                    Q(
                        f"({failure} > bool on (dag_id) {success})"
                        f" or on (dag_id) (0 * {success})"
                        f" or on (dag_id) (0 * {failure} + 1)",
                        "{{dag_id}}",
                        instant=True,
                    )
                ],
                steps=((None, GREEN), (1, RED)),
                mappings={"0": ("succeeded", GREEN), "1": ("failed", RED)},
                text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
                span=6,
                height=8,
            )
        )
        .with_panel(
            stat_panel(
                "Since the last success",
                f"Time since each DAG last succeeded; TireNoSuccessfulRun fires after "
                f"{NO_SUCCESS_SECONDS // 86400} days for tire_training_pipeline.",
                [Q(f"time() - {success}", "{{dag_id}}", instant=True)],
                unit="dtdurations",
                steps=((None, GREEN), (NO_SUCCESS_SECONDS, RED)),
                text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
                span=6,
                height=8,
            )
        )
        .with_panel(
            stat_panel(
                "Model version promoted",
                "The registry version the training pipeline last promoted to production.",
                [Q("max(tire_pipeline_promoted_model_version)", instant=True)],
                steps=((None, BLUE),),
                decimals=0,
                height=8,
            )
        )
        .with_panel(
            bars_panel(
                "Test metrics of the model promoted",
                "The last promoted model's metrics on its test split.",
                [Q(f"max by (metric) ({PROMOTED})", "{{metric}}", instant=True)],
                unit="percentunit",
            )
        )
        .with_row(dashboard.Row("Runs over time"))
        .with_panel(
            timeseries_panel(
                "Runs by outcome",
                "Runs that ended in each interval: a DAG's last-success or last-failure time "
                "that changed, or appeared, since the interval before.",
                [
                    Q(runs("tire_pipeline_last_success_timestamp_seconds"), "succeeded {{dag_id}}"),
                    Q(runs("tire_pipeline_last_failure_timestamp_seconds"), "failed {{dag_id}}"),
                ],
                bars=True,
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Time since the last success",
                "Grows until a run succeeds; the dashed line is TireNoSuccessfulRun's limit.",
                [Q(f"time() - {success}", "{{dag_id}}")],
                unit="dtdurations",
                threshold=(NO_SUCCESS_SECONDS, RED),
                span=8,
            )
        )
        .with_panel(
            timeseries_panel(
                "Dataset versions processed and failed",
                "Versions the lake holds as processed, and as given up on, at each push.",
                [
                    Q("max(tire_pipeline_versions_processed)", "processed"),
                    Q("max(tire_pipeline_versions_failed)", "failed"),
                ],
                span=8,
            )
        )
        .with_row(dashboard.Row("Training"))
        .with_panel(
            timeseries_panel(
                "Training duration by model type",
                "Wall time of the last training run of each model type.",
                [
                    Q(
                        "max by (model_type) (tire_pipeline_training_duration_seconds)",
                        "{{model_type}}",
                    )
                ],
                unit="s",
                span=12,
            )
        )
        .with_panel(
            timeseries_panel(
                "Test metrics of the model promoted, over time",
                "Each promotion moves these to the new production model's test metrics.",
                [Q(f"max by (metric) ({PROMOTED})", "{{metric}}")],
                unit="percentunit",
                maximum=1,
                span=12,
            )
        )
    )
    return _numbered(board.build())


DASHBOARDS = {
    "tire-serving": serving,
    "tire-model-quality": model_quality,
    "tire-pipeline": pipeline,
}


# --- output ----------------------------------------------------------------------------------


def render(board: dm.Dashboard) -> str:
    """The dashboard as Grafana's JSON model, byte-stable between runs."""
    return json.dumps(board, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": render(build()) for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the Grafana dashboards' JSON files.")
    parser.add_argument("--check", action="store_true", help="fail when a file is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder of the JSON files")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = args.output / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        sys.stdout.write(f"wrote {path}\n")
    if stale:
        sys.stdout.write(f"out of date (run python {Path(__file__).name}): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
