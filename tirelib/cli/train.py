"""``tirelib train``, ``tirelib evaluate`` and ``tirelib models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tirelib.settings import get_settings


def models() -> None:
    """List the model architectures with their default input size and parameter count."""
    from tirelib.models import ALIASES, count_parameters, get_model, get_spec, list_models

    typer.echo(f"{'MODEL':<18} {'INPUT':>6} {'PARAMETERS':>12}  SOURCE")
    for name in list_models():
        spec = get_spec(name)
        params = count_parameters(get_model(name, num_classes=2))
        source = "torchvision" if spec.torchvision_name else "tirelib"
        typer.echo(f"{name:<18} {spec.image_size:>6} {params:>12,}  {source}")
    typer.echo("aliases: " + ", ".join(f"{alias} -> {name}" for alias, name in ALIASES.items()))


def _help(name: str) -> str:
    from tirelib.config import TrainConfig, option_help

    return option_help(TrainConfig, name)


# Every option defaults to None ("not given"): the run file's value, else the model's default,
# applies. Help, allowed values and defaults shown come from tirelib.config.TrainConfig.
def train(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML or JSON file of the same fields (dataset_version: v1, epochs: 20, ...); "
            "options given here override it.",
        ),
    ] = None,
    dataset_version: Annotated[str | None, typer.Option(help=_help("dataset_version"))] = None,
    model_type: Annotated[str | None, typer.Option(help=_help("model_type"))] = None,
    optimizer_type: Annotated[str | None, typer.Option(help=_help("optimizer_type"))] = None,
    epochs: Annotated[int | None, typer.Option(help=_help("epochs"))] = None,
    learning_rate: Annotated[float | None, typer.Option(help=_help("learning_rate"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_help("batch_size"))] = None,
    image_size: Annotated[int | None, typer.Option(help=_help("image_size"))] = None,
    seed: Annotated[int | None, typer.Option(help=_help("seed"))] = None,
    scheduler: Annotated[str | None, typer.Option(help=_help("scheduler"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=_help("weight_decay"))] = None,
    momentum: Annotated[float | None, typer.Option(help=_help("momentum"))] = None,
    pretrained: Annotated[bool | None, typer.Option(help=_help("pretrained"))] = None,
    augment: Annotated[bool | None, typer.Option(help=_help("augment"))] = None,
    augmentation: Annotated[str | None, typer.Option(help=_help("augmentation"))] = None,
    patience: Annotated[int | None, typer.Option(help=_help("patience"))] = None,
    min_delta: Annotated[
        float | None, typer.Option("--min-delta", "--delta", help=_help("min_delta"))
    ] = None,
    min_loss: Annotated[float | None, typer.Option(help=_help("min_loss"))] = None,
    min_accuracy: Annotated[float | None, typer.Option(help=_help("min_accuracy"))] = None,
    num_workers: Annotated[int | None, typer.Option(help=_help("num_workers"))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train one model on a dataset version, tracked as one MLflow run.

    Every value is checked before anything is downloaded or any run is opened.
    """
    from tirelib.config import resolve_config
    from tirelib.train import train as run_training

    config = resolve_config(
        config_file,
        dataset_version=dataset_version,
        model_type=model_type,
        optimizer_type=optimizer_type,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        image_size=image_size,
        seed=seed,
        scheduler=scheduler,
        weight_decay=weight_decay,
        momentum=momentum,
        pretrained=pretrained,
        augment=augment,
        augmentation=augmentation,
        patience=patience,
        min_delta=min_delta,
        min_loss=min_loss,
        min_accuracy=min_accuracy,
        num_workers=num_workers,
    )
    result = run_training(config, get_settings())
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=1))
        return
    metrics = result.test_metrics
    typer.echo(
        f"{result.model_type} on {result.dataset_version}: {result.stop_reason}; "
        f"best epoch {result.best_epoch}/{result.epochs_run}"
    )
    typer.echo(
        "test: " + ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in metrics.items())
    )
    typer.echo(f"run {result.run_id}  model {result.model_uri}")


def evaluate(
    run_id: Annotated[
        str | None, typer.Option(help="MLflow run of a trained model (or give --served).")
    ] = None,
    dataset_version: Annotated[
        str | None, typer.Option(help="Score on this version's test split (default: the run's).")
    ] = None,
    served: Annotated[
        str | None,
        typer.Option(help="Score the model behind this server URL instead (http://host:8501)."),
    ] = None,
    model: Annotated[str, typer.Option(help="With --served: the model name in its URLs.")] = "tire",
    batch_size: Annotated[int, typer.Option(help="With --served: images per request.")] = 100,
    plot: Annotated[
        Path | None,
        typer.Option(help="With --served: PNG of sample predictions [served-<version>.png]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Score a trained model on a test split; metrics, report and pictures go to its run.

    With --served, send the test split through a model server's REST API instead and print
    accuracy, the per-class table and the time per image (the earlier system's report).
    """
    from tirelib.errors import ConfigurationError
    from tirelib.reports import format_per_class_table

    if served is not None:
        if run_id is not None:
            raise ConfigurationError("give either --run-id or --served, not both")
        if dataset_version is None:
            raise ConfigurationError("--served needs --dataset-version")
        _evaluate_served(served, dataset_version, model, batch_size, plot, as_json)
        return
    if run_id is None:
        raise ConfigurationError("give --run-id (a training run) or --served (a server URL)")
    from tirelib.evaluate import evaluate_run

    evaluation = evaluate_run(run_id, get_settings(), dataset_version=dataset_version)
    if as_json:
        typer.echo(json.dumps(evaluation.summary(), indent=1))
        return
    typer.echo(f"{evaluation.model_uri} on {evaluation.dataset_version} (test split)")
    typer.echo(format_per_class_table(evaluation.metrics))
    flat = evaluation.flat("")
    typer.echo(", ".join(f"{k} {v:.4f}" for k, v in flat.items()))


def _evaluate_served(
    url: str, version: str, model: str, batch_size: int, plot: Path | None, as_json: bool
) -> None:
    from tirelib.reports import format_per_class_table
    from tirelib.serve.client import evaluate_served

    result = evaluate_served(
        url,
        version,
        get_settings(),
        model=model,
        batch_size=batch_size,
        plot_path=plot or Path(f"served-{version}.png"),
    )
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=1))
        return
    count = result.metrics.count
    typer.echo(f"{url} model {model} version {result.model_version} on {version} ({count} images)")
    typer.echo(f"accuracy: {result.metrics.accuracy:.4f}")
    typer.echo(format_per_class_table(result.metrics))
    typer.echo(f"average inference time per image: {result.ms_per_image:.2f} ms")
    typer.echo(f"sample predictions: {result.plot}")
