"""The Grafana dashboards as code (``docker/grafana/dashboards.py``) and their provisioning.

- the committed JSON is exactly what the generator writes (nobody edits it by hand);
- every panel has a query and names a data source that is provisioned, by uid;
- every metric a panel reads is exported by the server, in the metrics contract or recorded by
  a rule, with labels it has; the thresholds drawn are the alerts' own;
- Grafana's file provider reads the folder compose mounts the JSON files into.
Whether each query returns data from a real Prometheus is
``tests/integration/test_grafana_dashboards.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.unit.test_prometheus_rules import alert_rules, all_rules, unknown_labels, unknown_metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
COMPOSE = ROOT / "docker" / "compose.yaml"


def load_module(name: str) -> ModuleType:
    """A script of docker/grafana/ as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"tire_grafana_{name}", GRAFANA / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_module("dashboards")


@pytest.fixture(scope="module")
def reader() -> ModuleType:
    return load_module("render")


@pytest.fixture(scope="module")
def boards(generator: ModuleType) -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in generator.generate().items()}


def targets(board: dict[str, Any], reader: ModuleType) -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel["title"], target)
        for panel in reader.panels(board)
        for target in panel.get("targets", [])
    ]


def datasource_uids() -> set[str]:
    found: set[str] = set()
    for path in (GRAFANA / "provisioning" / "datasources").glob("*.yaml"):
        found.update(ds["uid"] for ds in yaml.safe_load(path.read_text())["datasources"])
    return found


def test_the_committed_json_is_what_the_generator_writes(generator: ModuleType) -> None:
    expected = generator.generate()
    committed = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert (
        set(committed)
        == set(expected)
        == {
            "tire-serving.json",
            "tire-model-quality.json",
            "tire-pipeline.json",
        }
    )
    stale = [name for name, text in expected.items() if committed[name] != text]
    assert not stale, f"regenerate with `python docker/grafana/dashboards.py`: {stale}"
    assert generator.main(["--check"]) == 0


def test_the_check_finds_a_file_edited_by_hand(generator: ModuleType, tmp_path: Path) -> None:
    assert generator.main(["--output", str(tmp_path)]) == 0
    path = tmp_path / "tire-serving.json"
    path.write_text(path.read_text().replace("Replicas up", "Replicas upp"))
    assert generator.main(["--check", "--output", str(tmp_path)]) == 1


def test_every_panel_has_a_query_and_a_provisioned_data_source(
    boards: dict[str, dict[str, Any]], generator: ModuleType, reader: ModuleType
) -> None:
    uids = datasource_uids()
    assert generator.DATASOURCE_UID in uids
    for name, board in boards.items():
        panels = list(reader.panels(board))
        assert len(panels) >= 8, name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        assert len({board["uid"] for board in boards.values()}) == len(boards)
        for panel in panels:
            where = f"{name}: {panel['title']}"
            assert panel["datasource"]["uid"] in uids, where
            assert panel.get("targets"), f"{where} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] in uids, where
            x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
            assert x >= 0 and x + w <= 24, f"{where} leaves the 24-column grid"
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] in uids, f"{name}: ${variable['name']}"


def test_every_metric_a_panel_reads_is_exported_recorded_or_in_the_contract(
    boards: dict[str, dict[str, Any]], reader: ModuleType
) -> None:
    queries = [
        {"expr": target["expr"]}
        for board in boards.values()
        for _, target in targets(board, reader)
    ] + [
        {"expr": variable["query"]}
        for board in boards.values()
        for variable in board["templating"]["list"]
    ]
    # Recorded names count as known only when a rule records them; the rules themselves are known.
    assert unknown_metrics(all_rules() + queries) == set()
    assert unknown_labels(queries) == set()
    misspelt = [{"expr": "sum(rate(tire_prediction_total[5m]))"}]
    assert unknown_metrics(all_rules() + misspelt) == {"tire_prediction_total"}


def test_the_thresholds_drawn_are_the_alerts_own(generator: ModuleType) -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}

    def number(alert: str, pattern: str) -> float:
        found = re.search(pattern, exprs[alert])
        assert found, f"{alert}: {pattern!r} not in {exprs[alert]!r}"
        return float(found.group(1))

    assert number("TireServer5xxRatioHigh", r">\s*([\d.]+)") == generator.ERROR_RATIO_SLO
    assert number("TireServerLatencyP99High", r">\s*([\d.]+)") == generator.LATENCY_P99_SLO
    assert number("TirePredictionMixDrift", r"\)\s*>\s*([\d.]+)") == generator.MIX_DRIFT_POINTS
    assert number("TireConfidenceDrop", r"-\s*([\d.]+)\)") == generator.CONFIDENCE_DROP
    assert number("TireLiveAccuracyDrop", r"<\s*([\d.]+)") == generator.ACCURACY_FLOOR
    assert number("TireLiveAccuracyDrop", r">=\s*(\d+)") == generator.MIN_LABELS
    assert number("TireNoSuccessfulRun", r">\s*(\d+)\s*\*\s*86400") * 86400 == (
        generator.NO_SUCCESS_SECONDS
    )
    recorded = {rule.get("record"): rule["expr"] for rule in all_rules()}
    p99 = recorded["job:tire_inference_request_duration_seconds:p99_5m"]
    assert f'endpoint=~"{generator.INFERENCE_ROUTES}"' in p99


def test_grafana_reads_the_folder_compose_mounts_the_dashboards_into() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tire.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    image = grafana["image"]
    major = int(image.rsplit(":", 1)[1].split(".")[0])
    # The SDK's dashboard schema (41) is Grafana 11.6's; later Grafanas migrate it on load.
    assert major >= 11, image
