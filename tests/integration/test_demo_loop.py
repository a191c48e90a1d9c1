"""The end of ``tirelib demo``: predictions on unseen tires and their feedback, against a real
model server (``tirelib serve`` on a free port, a small untrained model from a folder, so no
training and no MLflow); and the stack's model server component starting without a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.model_server import running_server, save_model_folder
from tirelib.cli import demo
from tirelib.errors import StackError
from tirelib.settings import Settings
from tirelib.stack import free_port, served_version, server_component, wait_serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = save_model_folder(tmp_path_factory.mktemp("demo-model") / "model")
    state = tmp_path_factory.mktemp("demo-server")
    with running_server(state, ["--model-uri", str(folder)]) as process:
        yield process.url


def feedback_counts(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tire_feedback_labels_total"
    )


def test_the_demo_sends_predictions_and_their_feedback(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_serving(server, "1", timeout=30)  # a model folder is served as version 1
    images = demo._live_images(tmp_path / "live", seed=7)
    assert len(images) == demo.LIVE_IMAGES
    assert {label for label, _ in images} == {"good", "defective"}
    before = feedback_counts(server)

    rows = demo.send_live_traffic(server, images[:3])

    assert [row["image"] for row in rows] == [path.name for _, path in images[:3]]
    assert all(row["predicted"] in {"good", "defective"} for row in rows)
    assert all(0.5 <= row["probability"] <= 1 for row in rows)
    assert all(re.fullmatch(r"\S+", row["request_id"]) for row in rows)
    assert len({row["request_id"] for row in rows}) == 3
    # The feedback route judged each one against its prediction and counted it.
    assert [row["feedback"] for row in rows] == [
        "correct" if row["predicted"] == row["label"] else "wrong" for row in rows
    ]
    assert feedback_counts(server) == before + 3
    out = capsys.readouterr().out
    assert out.count("true ") == 3 and "predictions right" in out


def test_waiting_for_a_version_the_server_does_not_serve_names_both(server: str) -> None:
    assert served_version(server) == "1"
    with pytest.raises(StackError, match=r"serves version 1, not version 2"):
        wait_serving(server, "2", timeout=0.5, interval=0.1)
    assert served_version(f"http://127.0.0.1:{free_port()}") is None


def test_the_stack_s_server_answers_before_anything_is_in_production(
    tracked_env: Settings,
) -> None:
    settings = tracked_env.model_copy(update={"serve_port": free_port()})
    component = server_component(settings)
    try:
        assert component.up()
        status = component.status()
        assert status.up and status.url == f"http://127.0.0.1:{settings.serve_port}"
        ready = httpx.get(f"{status.url}/readyz", timeout=10)
        assert ready.status_code == 503  # no production alias yet: waiting for one
        assert settings.model_name in ready.text
        assert served_version(status.url) is None
    finally:
        component.down()
    assert not component.status().running
