"""One source for every default: the DAG params, the CLI and the README derive from the models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamValidationError
from typer.testing import CliRunner

from tirelib.cli import app, main
from tirelib.config import (
    HYPERPARAMETERS,
    MAX_SWEEP_JOBS,
    SWEEP_ID_TAG,
    SWEEP_INDEX_TAG,
    PipelineParams,
    SweepMember,
    Thresholds,
    TrainConfig,
    dag_params,
    defaults_table,
    expand_jobs,
    parse_pipeline_params,
    resolve_config,
    split_job,
    sweep_id,
)
from tirelib.errors import ConfigurationError
from tirelib.models import ALIASES, list_models
from tirelib.serve.batching import DynamicBatcher
from tirelib.serve.config import ServeConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BOUNDS = {  # pydantic's constraint, its attribute, the JSON-schema keyword
    annotated_types.Ge: ("ge", "minimum"),
    annotated_types.Gt: ("gt", "exclusiveMinimum"),
    annotated_types.Le: ("le", "maximum"),
    annotated_types.Lt: ("lt", "exclusiveMaximum"),
}
WORDS = {word for _, word in BOUNDS.values()}


def _bounds(model: type, name: str) -> dict[str, float]:
    """The field's bounds as the model declares them (ge, gt, le, lt), in JSON-schema words."""
    out = {}
    for item in model.model_fields[name].metadata:
        for kind, (attribute, word) in BOUNDS.items():
            if isinstance(item, kind):
                out[word] = getattr(item, attribute)
    return out


# --- DAG params ----------------------------------------------------------------------------


def test_every_param_has_a_description_and_a_valid_default() -> None:
    for name, kwargs in dag_params().items():
        assert kwargs["description"], name
        param = Param(**kwargs)
        assert param.resolve() == kwargs["default"], name


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_hyperparameter_params_equal_the_models_fields(name: str) -> None:
    kwargs = dag_params()[name]
    field = TrainConfig.model_fields[name]
    assert kwargs["default"] == field.default
    assert kwargs["description"] == field.description
    for word, value in _bounds(TrainConfig, name).items():
        assert kwargs[word] == value, (name, word)
    schema_words = WORDS & set(kwargs)
    assert schema_words == set(_bounds(TrainConfig, name)), name


def test_enums_come_from_the_models() -> None:
    params = dag_params()
    assert params["optimizer_type"]["enum"] == ["adam", "adamw", "sgd", "rmsprop"]
    assert params["scheduler"]["enum"] == ["none", "cosine", "onecycle", "step", "plateau"]
    assert params["metric"]["enum"] == ["loss", "accuracy", "precision", "recall", "f1"]
    assert params["model_types"]["items"]["enum"] == [*list_models(), *ALIASES]
    assert params["model_types"]["default"] == [TrainConfig.model_fields["model_type"].default]


def test_settings_replace_the_form_defaults_only() -> None:
    params = dag_params(epochs=3, min_accuracy=0.7, min_f1=None)
    assert params["epochs"]["default"] == 3
    assert params["epochs"]["maximum"] == dag_params()["epochs"]["maximum"]
    assert params["thresholds"]["default"] == {"accuracy": 0.7, "f1": 0.75, "margin": 0.0}


def test_thresholds_param_refuses_unknown_keys_and_values_out_of_range() -> None:
    param = Param(**dag_params()["thresholds"])
    assert param.resolve({"accuracy": 0.9, "f1": None, "margin": 0.01})["accuracy"] == 0.9
    with pytest.raises(ParamValidationError, match="acuracy"):
        Param(**dag_params()["thresholds"]).resolve({"acuracy": 0.9})
    with pytest.raises(ParamValidationError, match=r"1\.5"):
        Param(**dag_params()["thresholds"]).resolve({"accuracy": 1.5})
    schema = dag_params()["thresholds"]
    assert set(schema["properties"]) == set(Thresholds.model_fields)
    for name, prop in schema["properties"].items():
        assert prop["default"] == Thresholds.model_fields[name].default
        for word, value in _bounds(Thresholds, name).items():
            assert prop[word] == value, (name, word)


def test_sweep_param_names_only_hyperparameters() -> None:
    param = Param(**dag_params()["sweep"])
    assert param.resolve({"learning_rate": [0.001, 0.01]}) == {"learning_rate": [0.001, 0.01]}
    with pytest.raises(ParamValidationError):
        Param(**dag_params()["sweep"]).resolve({"model_type": ["cnn"]})
    with pytest.raises(ParamValidationError):
        Param(**dag_params()["sweep"]).resolve({"epochs": []})


# --- the run's conf ------------------------------------------------------------------------


def test_an_unknown_conf_key_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"epoch=3: unknown key; allowed: ") as error:
        parse_pipeline_params({"dataset_version": "v1", "epoch": 3})
    for name in ("epochs", "model_types", "thresholds", "sweep"):
        assert name in str(error.value)


def test_a_misspelled_threshold_is_refused_before_any_work() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"thresholds\.acuracy=0\.9: unknown key; allowed: accuracy, f1, precision, recall",
    ):
        parse_pipeline_params({"thresholds": {"acuracy": 0.9}})
    with pytest.raises(ConfigurationError, match=r"thresholds\.f1=2"):
        parse_pipeline_params({"thresholds": {"f1": 2}})
    # The earlier capitalised names still work.
    assert parse_pipeline_params({"thresholds": {"Accuracy": 0.9}}).thresholds.accuracy == 0.9


def test_the_form_defaults_parse() -> None:
    values = {name: kwargs["default"] for name, kwargs in dag_params().items()}
    params = parse_pipeline_params(values)
    assert params == PipelineParams()


# --- sweeps --------------------------------------------------------------------------------


def test_a_sweep_expands_into_the_product_of_model_types_and_values() -> None:
    params = parse_pipeline_params(
        {
            "model_types": ["cnn", "tinyvgg"],
            "epochs": 2,
            "sweep": {"learning_rate": [0.01, 0.001], "batch_size": [16, 32, 16]},
        }
    )
    jobs = expand_jobs(params, "v1")
    assert len(jobs) == 2 * 2 * 2  # the repeated 16 trains once
    combos = {(j["model_type"], j["learning_rate"], j["batch_size"]) for j in jobs}
    assert len(combos) == len(jobs)
    assert {j["epochs"] for j in jobs} == {2}
    assert {j["sweep"]["id"] for j in jobs} == {sweep_id(params, "v1")}
    assert [j["sweep"]["index"] for j in jobs] == list(range(len(jobs)))
    assert {j["sweep"]["size"] for j in jobs} == {len(jobs)}
    config, member = split_job(jobs[3])
    assert isinstance(config, TrainConfig)
    assert member is not None
    assert member.tags()[SWEEP_ID_TAG] == sweep_id(params, "v1")
    assert member.tags()[SWEEP_INDEX_TAG] == "3"


def test_the_sweep_id_is_stable_and_tells_sweeps_apart() -> None:
    a = parse_pipeline_params({"sweep": {"seed": [1, 2]}})
    assert sweep_id(a, "v1") == sweep_id(parse_pipeline_params({"sweep": {"seed": [1, 2]}}), "v1")
    assert sweep_id(a, "v1") != sweep_id(a, "v2")
    assert sweep_id(a, "v1") != sweep_id(parse_pipeline_params({"sweep": {"seed": [1, 3]}}), "v1")


def test_without_a_sweep_jobs_carry_no_sweep() -> None:
    jobs = expand_jobs(parse_pipeline_params({"model_types": ["cnn", "efficientnet"]}), "v1")
    assert [j["model_type"] for j in jobs] == ["cnn", "efficientnet_b0"]
    assert all("sweep" not in job for job in jobs)
    assert split_job(jobs[0])[1] is None


def test_a_sweep_too_large_is_refused_with_its_size() -> None:
    values = list(range(1, 12))
    with pytest.raises(ConfigurationError, match=rf"33 training jobs .*at most {MAX_SWEEP_JOBS}"):
        parse_pipeline_params(
            {"model_types": ["cnn", "tinyvgg", "resnet18"], "sweep": {"seed": values}}
        )
    assert len(expand_jobs(parse_pipeline_params({"sweep": {"seed": values * 2}}), "v1")) == 11


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"model_type": ["cnn"]}, "cannot sweep 'model_type'; allowed: epochs"),
        ({"epochs": []}, "lists no values"),
        ({"learning_rate": [0.1, -1]}, "learning_rate=-1"),
    ],
)
def test_a_bad_sweep_is_refused_before_any_work(sweep: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        params = parse_pipeline_params({"sweep": sweep})
        expand_jobs(params, "v1")


def test_sweep_members_are_distinct_jobs() -> None:
    from tirelib.train import job_digest

    config = TrainConfig(dataset_version="v1")
    content = {("raw/v1/good/a.png", "0" * 64)}
    alone = job_digest(config, content)
    first = job_digest(config, content, SweepMember("abc", 0, 2))
    assert len({alone, first, job_digest(config, content, SweepMember("abc", 1, 2))}) == 3
    assert first == job_digest(config, content, SweepMember("abc", 0, 2))  # a retry finds it


# --- run files and the CLI -----------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """Replace training by a recorder of the config it was given."""
    import tirelib.train

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, settings: object, **_: object) -> object:
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(tirelib.train, "train", fake_train)
    return seen


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_run_file_is_read_and_options_override_it(
    tmp_path: Path, captured: list[TrainConfig], suffix: str
) -> None:
    values = {"dataset_version": "v1", "epochs": 20, "learning_rate": 0.01, "augment": False}
    path = tmp_path / f"run.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), "--epochs", "3"])
    (config,) = captured
    assert (config.epochs, config.learning_rate, config.augment) == (3, 0.01, False)
    assert config.batch_size == TrainConfig.model_fields["batch_size"].default


def test_the_earlier_spelling_still_trains(captured: list[TrainConfig]) -> None:
    with pytest.raises(SystemExit):
        main(
            ["Train", "--dataset_version", "split_1", "--model_type", "cnn", "--learning_rate=0.01"]
        )
    assert captured[0].dataset_version == "split_1"
    assert captured[0].learning_rate == 0.01


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset_version: v1\nepoch: 3\n", "epoch=3: unknown key; allowed: epochs"),
        ("dataset_version: v1\nbatch_size: 0\n", "batch_size=0: Input should be greater"),
        ("epochs: 3\n", "dataset_version: required"),
        ("- epochs\n", "must hold a mapping of field names"),
        ("epochs: [\n", "not valid YAML or JSON"),
    ],
)
def test_a_bad_run_file_is_refused_naming_the_key(
    tmp_path: Path,
    captured: list[TrainConfig],
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert captured == []


def test_a_missing_run_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read the run file"):
        resolve_config(tmp_path / "nope.yaml")


def _help(*args: str) -> str:
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_train_help_shows_the_models_defaults_and_ranges() -> None:
    text = _help("train")
    for name, field in TrainConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert field.description in text, name
        if field.default is not None and not field.is_required():
            assert f"(default: {_shown(field.default)})" in text, name
    assert "Range: > 0, <= 10. (default: 0.003)" in text  # learning_rate
    assert "One of: adam, adamw, sgd, rmsprop." in text


def test_serve_help_and_batcher_share_the_servers_defaults() -> None:
    text = _help("serve")
    wait = ServeConfig.model_fields["max_wait_ms"].default
    assert (
        f"Longest wait for a batch to fill, milliseconds. Range: >= 0, <= 1000. (default: {wait:g})"
        in text
    )
    batcher = DynamicBatcher(lambda model, batch: batch.numpy())
    assert batcher.max_wait_s * 1000 == pytest.approx(wait)
    assert batcher.max_batch_size == ServeConfig.model_fields["max_batch_size"].default


# --- the README ----------------------------------------------------------------------------

TABLES = {"TrainConfig": TrainConfig, "Thresholds": Thresholds, "ServeConfig": ServeConfig}


def test_the_readmes_tables_of_defaults_match_the_models() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = dict(
        re.findall(r"<!-- defaults: (\w+) -->\n(.*?)\n<!-- end defaults -->", readme, re.S)
    )
    assert set(blocks) == set(TABLES)
    assert f"more than {MAX_SWEEP_JOBS} jobs is refused" in readme
    assert f"`{json.dumps(dag_params()['thresholds']['default'])}` by default" in readme
    for name, model in TABLES.items():
        assert blocks[name] == defaults_table(model), (
            f"README's table of {name} is out of date; replace it with:\n{defaults_table(model)}"
        )
