"""``tirelib monitor``: the report printed, exit 1 when a threshold is crossed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tirelib import monitoring
from tirelib.cli import app
from tirelib.monitoring import DriftCheck, MonitoringReport, judge_accuracy

pytestmark = pytest.mark.unit


def _report(*, live_correct: int) -> MonitoringReport:
    report = MonitoringReport("tire-defect-classifier", "3", 3600)
    report.drift.append(DriftCheck("brightness", 400, 0.25, psi=0.02))
    report.accuracy = judge_accuracy(
        "3", 100, live_correct, offline=0.95, floor=0.8, max_drop=0.1, min_labels=50
    )
    return report


@pytest.mark.parametrize(("correct", "status", "verdict"), [(94, 0, "within"), (40, 1, "crossed")])
def test_monitor_prints_the_check_and_exits_1_on_a_crossed_threshold(
    monkeypatch: pytest.MonkeyPatch, correct: int, status: int, verdict: str
) -> None:
    monkeypatch.setattr(monitoring, "check", lambda settings: _report(live_correct=correct))
    result = CliRunner().invoke(app, ["monitor"])
    assert result.exit_code == status, result.output
    assert verdict in result.output
    assert "brightness: PSI 0.020" in result.output
    assert f"live accuracy of version 3: {correct / 100:.3f} on 100 labels" in result.output

    result = CliRunner().invoke(app, ["monitor", "--json"])
    assert result.exit_code == status
    summary = json.loads(result.output)
    assert summary["version"] == "3"
    assert summary["accuracy"]["below_floor"] is (status == 1)
