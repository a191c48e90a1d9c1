"""Every default of a run, declared once: hyperparameters, registration thresholds, pipeline params.

The pydantic models here are the single source: ``tirelib train``'s options, the training DAG's
``Param`` schemas (defaults, bounds, enums, descriptions) and the README's tables derive from them.
A run file (``tirelib train --config run.yaml``) holds the same fields.

Imported at DAG-parse time, so it imports pydantic and tirelib's light modules only: no torch,
no mlflow, no Airflow (the DAG file wraps :func:`dag_params`' schemas in ``Param`` itself).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tirelib.errors import ConfigurationError
from tirelib.models import ALIASES, get_spec, list_models, resolve_name

log = logging.getLogger(__name__)

# Dataset version and label names: the data lake's folders, checked by tirelib.data too. A name
# is matched whole (re.fullmatch: with re.match, "$" also matches before a trailing newline) and
# its length is bounded, so every key raw/<version>/<label>/<file> stays within S3's 1,024
# bytes. The patterns carry the bounds, so the DAG's params and the README derive them.
MAX_VERSION_LENGTH = 128
MAX_LABEL_LENGTH = 64
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"
VERSION_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_VERSION_LENGTH - 1}}}$"
LABEL_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LABEL_LENGTH - 1}}}$"
DEFAULT_MODEL_TYPE = "cnn128"
Optimizer = Literal["adam", "adamw", "sgd", "rmsprop"]
Scheduler = Literal["none", "cosine", "onecycle", "step", "plateau"]
# The weight decay of adamw when none is given (decoupled from the gradient, unlike the others').
ADAMW_WEIGHT_DECAY = 0.05
# tirelib.preprocessing.train_transform's policies (AUGMENTATIONS there; a test keeps them equal).
Augmentation = Literal["dihedral", "crop"]
# The metrics that choose and gate a model (the earlier system's Stage/Produce argument).
GateMetric = Literal["loss", "accuracy", "precision", "recall", "f1"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
GATE_METRICS: tuple[str, ...] = get_args(GateMetric)
# A sweep larger than this is refused: each job is a training run on a worker slot.
MAX_SWEEP_JOBS = 32

SWEEP_ID_TAG = "tire.sweep_id"
SWEEP_INDEX_TAG = "tire.sweep_index"
SWEEP_SIZE_TAG = "tire.sweep_size"


def name_problem(value: str, what: str = "version") -> str | None:
    """Why ``value`` is not a valid version (``what="label"``: label) name; None when it is."""
    label = what == "label"
    if re.fullmatch(LABEL_PATTERN if label else VERSION_PATTERN, value):
        return None
    limit = MAX_LABEL_LENGTH if label else MAX_VERSION_LENGTH
    shown = repr(value) if len(value) <= 80 else f"{value[:40]!r}... ({len(value)} characters)"
    return f"invalid {what} name {shown}: use {NAME_RULE}, at most {limit} characters"


# --- hyperparameters -----------------------------------------------------------------------


class Hyperparameters(BaseModel):
    """How a model is trained, whatever it is trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Most epochs to train; early stopping may end sooner.",
    )
    learning_rate: float = Field(
        default=3e-3,
        gt=0,
        le=10,
        description="Learning rate: the peak of a one-cycle schedule, the start of the others.",
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="Images per batch.")
    optimizer_type: Optimizer = Field(default="adamw", description="Optimizer.")
    image_size: int | None = Field(
        default=None, ge=16, le=1024, description="Input side in pixels; empty: the model's own."
    )
    seed: int = Field(
        default=42, ge=0, description="Random seed; the same seed gives the same run on a CPU."
    )
    scheduler: Scheduler = Field(
        default="onecycle",
        description=(
            "Learning-rate schedule; onecycle warms up to learning_rate over the first 30% of "
            "the steps, then anneals (stepped per batch; the others per epoch)."
        ),
    )
    weight_decay: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "Weight decay; empty: 0.05 for adamw (decoupled), 0 for the others (where it is an "
            "L2 penalty)."
        ),
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="Momentum of sgd and rmsprop.")
    pretrained: bool = Field(
        default=False, description="Start from ImageNet weights (torchvision models only)."
    )
    augment: bool = Field(default=True, description="Train-time augmentation.")
    augmentation: Augmentation = Field(
        default="dihedral",
        description=(
            "Augmentation policy: dihedral (flips, quarter turns, small shifts, brightness and "
            "contrast) or crop (random resized crop, flips, rotation, colour jitter)."
        ),
    )
    patience: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Early stopping: epochs without improvement before stopping.",
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="Early stopping: least change that counts as improvement."
    )
    min_loss: float | None = Field(
        default=None, gt=0, description="Early stopping target: val_loss at most this."
    )
    min_accuracy: float | None = Field(
        default=None, gt=0, le=1, description="Early stopping target: val_accuracy at least this."
    )
    num_workers: int = Field(default=0, ge=0, le=64, description="DataLoader worker processes.")

    @field_validator("optimizer_type", "scheduler", "augmentation", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class TrainConfig(Hyperparameters):
    """Every hyperparameter of a training run, and what it trains on; logged as the run's params."""

    dataset_version: str = Field(
        description="Dataset version to train on (raw/<version>/ in the data lake).",
        json_schema_extra={"pattern": VERSION_PATTERN},
    )
    model_type: str = Field(
        default=DEFAULT_MODEL_TYPE, description="Architecture; `tirelib models` lists them."
    )

    @field_validator("dataset_version")
    @classmethod
    def _version(cls, value: str) -> str:
        problem = name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("model_type")
    @classmethod
    def _model(cls, value: str) -> str:
        try:
            return resolve_name(value)
        except ConfigurationError as error:
            raise ValueError(str(error)) from error

    @model_validator(mode="after")
    def _resolve_defaults(self) -> TrainConfig:
        if self.image_size is None:
            object.__setattr__(self, "image_size", get_spec(self.model_type).image_size)
        if self.weight_decay is None:
            decay = ADAMW_WEIGHT_DECAY if self.optimizer_type == "adamw" else 0.0
            object.__setattr__(self, "weight_decay", decay)
        return self

    @property
    def size(self) -> int:
        assert self.image_size is not None
        return self.image_size

    def mlflow_params(self) -> dict[str, Any]:
        return self.model_dump()


HYPERPARAMETERS: tuple[str, ...] = tuple(Hyperparameters.model_fields)
"""The fields a sweep may vary (every field of :class:`TrainConfig` but what it trains on)."""


def _validation_lines(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per error of ``model``'s validation: the key, the value, what is allowed."""
    lines = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        allowed = _allowed_keys(model, item["loc"][:-1])
        if item["type"] == "missing":
            lines.append(f"{name}: required")
        elif item["type"] == "extra_forbidden" and allowed:
            lines.append(
                f"{name}={_excerpt(item.get('input'))}: unknown key; allowed: {', '.join(allowed)}"
            )
        else:
            lines.append(f"{name}={_excerpt(item.get('input'))}: {message}")
    return lines


def _excerpt(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes a value, not a file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _allowed_keys(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The field names of the (nested) model at ``path``, e.g. ``("thresholds",)``."""
    for part in path:
        info = model.model_fields.get(str(part))
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def make_config(**values: Any) -> TrainConfig:
    """A :class:`TrainConfig`, or a ConfigurationError naming each bad value and what is allowed."""
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        lines = _validation_lines(error, TrainConfig)
        raise ConfigurationError(
            "invalid training configuration:\n  " + "\n  ".join(lines)
        ) from error


def load_config_file(path: Path) -> dict[str, Any]:
    """The fields of a run file (YAML, or JSON, which YAML reads too), unchecked.

    Raises :class:`ConfigurationError` for a missing or unreadable file, or one that is not a
    mapping of field names to values.
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(f"cannot read the run file {str(path)!r}: {error}") from error
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigurationError(f"{str(path)!r} is not valid YAML or JSON: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ConfigurationError(
            f"{str(path)!r} must hold a mapping of field names to values, "
            f"e.g. 'epochs: 20'; allowed fields: {', '.join(TrainConfig.model_fields)}"
        )
    return values


def resolve_config(file: Path | None = None, **flags: Any) -> TrainConfig:
    """The run file's fields, overridden by the flags that were given (not None), checked once."""
    values = load_config_file(file) if file is not None else {}
    given = {name: value for name, value in flags.items() if value is not None}
    if given:
        log.debug("options given on the command line override the run file: %s", sorted(given))
    return make_config(**{**values, **given})


# --- registration thresholds ---------------------------------------------------------------


class Thresholds(BaseModel):
    """What a model's test metrics must reach, and by how much it must beat the champion.

    ``accuracy`` ... ``roc_auc`` are floors (``>=``), ``loss`` is a ceiling (``<=``); ``None``
    switches a check off. ``margin`` is the least improvement over the production model in the
    chosen metric's own units; 0 means "at least as good". Keys may use the earlier names
    (``Accuracy``, ``F1``), as DAG params and JSON often do.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    accuracy: float | None = Field(default=0.80, ge=0, le=1, description="Floor on test accuracy.")
    f1: float | None = Field(
        default=0.75, ge=0, le=1, description="Floor on test F1 (defective class)."
    )
    precision: float | None = Field(
        default=None, ge=0, le=1, description="Floor on test precision."
    )
    recall: float | None = Field(default=None, ge=0, le=1, description="Floor on test recall.")
    roc_auc: float | None = Field(default=None, ge=0, le=1, description="Floor on test ROC-AUC.")
    loss: float | None = Field(default=None, gt=0, description="Ceiling on test loss.")
    margin: float = Field(
        default=0.0,
        ge=0,
        description="Least improvement over production in the chosen metric; 0: not worse.",
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out = {}
        for key, value in data.items():
            name = key.strip().lower() if isinstance(key, str) else key
            if isinstance(name, str) and name not in cls.model_fields:
                # tirelib.metrics imports numpy: only for a name that is not a field already.
                from tirelib.metrics import canonical_metric

                with contextlib.suppress(ConfigurationError):  # unknown keys: extra="forbid"
                    name = canonical_metric(name)
            out[name] = value
        return out

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> Thresholds:
        """Defaults, then ``values`` (DAG params, JSON), then the ``overrides`` that are not None.

        Raises :class:`ConfigurationError` naming each bad value and what is allowed.
        """
        data = {**(values or {}), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            from tirelib.metrics import METRIC_NAMES

            lines = [
                f"{'.'.join(map(str, item['loc'])) or 'thresholds'}={item.get('input')!r}: "
                f"{item['msg']}"
                for item in error.errors()
            ]
            raise ConfigurationError(
                "invalid thresholds:\n  " + "\n  ".join(lines) + f"\n  allowed keys: "
                f"{', '.join((*METRIC_NAMES, 'margin'))}"
            ) from error

    @classmethod
    def off(cls, margin: float = 0.0) -> Thresholds:
        """No floors at all: only the comparison with the champion counts."""
        from tirelib.metrics import METRIC_NAMES

        return cls(**dict.fromkeys(METRIC_NAMES), margin=margin)

    def limits(self) -> dict[str, float]:
        """The checks that are on: canonical metric name -> floor (ceiling for loss)."""
        from tirelib.metrics import METRIC_NAMES

        values = {name: getattr(self, name) for name in METRIC_NAMES}
        return {name: float(value) for name, value in values.items() if value is not None}

    def describe(self) -> str:
        text = ", ".join(
            f"{name} {'<=' if name == 'loss' else '>='} {value:g}"
            for name, value in self.limits().items()
        )
        return text or "no thresholds"


# --- the training pipeline's params --------------------------------------------------------

SweepValue = bool | int | float | str | None


class PipelineParams(Hyperparameters):
    """The params of a ``tire_training_pipeline`` run (its trigger form and its conf).

    Unknown keys are refused; every hyperparameter of :class:`TrainConfig` may be given, and
    ``sweep`` lists values per hyperparameter to train every combination.
    """

    dataset_version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="Version to process; empty: the version the sensor announced, or for a "
        "run started by hand the newest waiting one.",
    )
    model_types: list[str] = Field(
        default=[DEFAULT_MODEL_TYPE],
        min_length=1,
        description="Architectures to train, one mapped training task each.",
    )
    metric: GateMetric = Field(
        default="f1", description="The metric that chooses the best model and gates promotion."
    )
    thresholds: Thresholds = Field(
        default_factory=Thresholds,
        description="Floors a model must reach to be registered (null switches one off), and "
        "the margin by which it must beat production on the same test split.",
    )
    sweep: dict[str, list[SweepValue]] = Field(
        default_factory=dict,
        description="Hyperparameter sweep: values per field, e.g. "
        '{"learning_rate": [0.001, 0.01], "batch_size": [16, 32]}; every combination is '
        f"trained for each model type (at most {MAX_SWEEP_JOBS} jobs), each its own run.",
    )

    @field_validator("model_types")
    @classmethod
    def _models(cls, values: list[str]) -> list[str]:
        try:
            return list(dict.fromkeys(resolve_name(value) for value in values))
        except ConfigurationError as error:
            raise ValueError(str(error)) from error

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, sweep: dict[str, list[SweepValue]]) -> dict[str, list[SweepValue]]:
        unknown = sorted(set(sweep) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(
                f"cannot sweep {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(HYPERPARAMETERS)}"
            )
        empty = sorted(name for name, values in sweep.items() if not values)
        if empty:
            raise ValueError(f"sweep of {', '.join(map(repr, empty))} lists no values")
        # A value listed twice would train the same job twice.
        return {name: list(dict.fromkeys(values)) for name, values in sweep.items()}

    @model_validator(mode="after")
    def _bounded(self) -> PipelineParams:
        count = sweep_size(self)
        if count > MAX_SWEEP_JOBS:
            sizes = " x ".join(
                [f"{len(self.model_types)} model types"]
                + [f"{len(values)} {name}" for name, values in sorted(self.sweep.items())]
            )
            raise ValueError(
                f"the sweep expands into {count} training jobs ({sizes}); "
                f"at most {MAX_SWEEP_JOBS} are allowed: list fewer values"
            )
        return self


def sweep_size(params: PipelineParams) -> int:
    """How many training jobs ``params`` expand into."""
    count = len(params.model_types)
    for values in params.sweep.values():
        count *= len(values)
    return count


def parse_pipeline_params(params: Mapping[str, Any]) -> PipelineParams:
    """A run's params (conf merged over the form's defaults), checked before any work.

    Raises :class:`ConfigurationError` naming each unknown key or bad value with what is allowed.
    """
    try:
        return PipelineParams.model_validate(dict(params))
    except ValidationError as error:
        lines = _validation_lines(error, PipelineParams)
        raise ConfigurationError("invalid params of the run:\n  " + "\n  ".join(lines)) from error


@dataclass(frozen=True)
class SweepMember:
    """A training job's place in a sweep; its tags are part of the job's identity."""

    sweep_id: str
    index: int
    size: int

    def tags(self) -> dict[str, str]:
        return {
            SWEEP_ID_TAG: self.sweep_id,
            SWEEP_INDEX_TAG: str(self.index),
            SWEEP_SIZE_TAG: str(self.size),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.sweep_id, "index": self.index, "size": self.size}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> SweepMember | None:
        if not value:
            return None
        return cls(str(value["id"]), int(value["index"]), int(value["size"]))


def sweep_id(params: PipelineParams, version: str) -> str:
    """A stable id of a sweep: the same version, models and values give the same id, so a
    retried or re-run sweep finds its finished runs again."""
    content = params.model_dump(mode="json", exclude={"dataset_version", "metric", "thresholds"})
    text = json.dumps({"version": version, **content}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand_jobs(params: PipelineParams, version: str) -> list[dict[str, Any]]:
    """The run's training jobs: one per model type, times every combination of the sweep.

    Each job is a checked :class:`TrainConfig` as JSON; a sweep's jobs also carry ``sweep``
    (id, index, size), which tags their runs and keeps their identities apart.
    """
    base = params.model_dump(include=set(HYPERPARAMETERS))
    fields = sorted(params.sweep)
    combinations = list(itertools.product(*(params.sweep[name] for name in fields)))
    size = len(params.model_types) * len(combinations)
    ident = sweep_id(params, version) if fields else None
    jobs = []
    for index, (model_type, values) in enumerate(
        itertools.product(params.model_types, combinations)
    ):
        config = make_config(
            **{**base, **dict(zip(fields, values, strict=True))},
            dataset_version=version,
            model_type=model_type,
        )
        job = config.model_dump(mode="json")
        if ident is not None:
            job["sweep"] = SweepMember(ident, index, size).as_dict()
        jobs.append(job)
    return jobs


def split_job(job: Mapping[str, Any]) -> tuple[TrainConfig, SweepMember | None]:
    """A job of :func:`expand_jobs` as its checked config and its place in a sweep (if any)."""
    values = dict(job)
    member = SweepMember.from_dict(values.pop("sweep", None))
    return make_config(**values), member


# --- derived views: DAG params, CLI help, docs ---------------------------------------------


def field_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    """One field's JSON schema, flattened for a form: ``X | None`` becomes ``type: [X, null]``,
    nested models are inlined, titles are dropped (the form shows the key)."""
    schema = _json_schema(model)
    field = copy.deepcopy(schema["properties"][name])
    ref = field.pop("$ref", None)
    if ref is not None:
        nested = {**schema["$defs"][ref.rsplit("/", 1)[-1]]}
        nested.pop("description", None)
        field = {**nested, **field}
    return _flatten(field)


@functools.cache
def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    # Built once per model: the DAG file derives about twenty params at every parse.
    return model.model_json_schema()


def _flatten(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: value for key, value in schema.items() if key != "title"}
    options = out.pop("anyOf", None)
    if options is not None:
        kinds = [option for option in options if option.get("type") != "null"]
        if len(kinds) == 1 and len(options) == 2:
            kind = _flatten(kinds[0])
            out = {**kind, **out, "type": [kind["type"], "null"]}
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out["anyOf"] = options
    if "properties" in out:
        out["properties"] = {key: _flatten(value) for key, value in out["properties"].items()}
    return out


def param_kwargs(
    model: type[BaseModel], name: str, default: Any = None, **extra: Any
) -> dict[str, Any]:
    """Keyword arguments of an Airflow ``Param`` for ``model``'s field ``name``: its default,
    type, bounds, enum and description. ``default`` (not None) replaces the model's default."""
    schema = field_schema(model, name)
    description = schema.pop("description", None)
    if description is None:
        raise ValueError(f"{model.__name__}.{name} has no description")
    value = schema.pop("default", None)
    if default is not None:
        value = default
    elif name in model.model_fields and model.model_fields[name].default_factory is not None:
        value = model.model_fields[name].get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return {"default": value, "description": description, **schema, **extra}


# Shown first in the trigger form; the other hyperparameters sit in a section of their own.
FORM_HYPERPARAMETERS = ("epochs", "learning_rate", "batch_size", "optimizer_type", "seed")


def dag_params(
    *,
    epochs: int | None = None,
    min_accuracy: float | None = None,
    min_f1: float | None = None,
) -> dict[str, dict[str, Any]]:
    """The training DAG's params as ``Param`` keyword arguments, every one from the models.

    ``epochs``, ``min_accuracy`` and ``min_f1`` (when not None) replace the models' defaults in
    the form (``TIRE_PIPELINE_EPOCHS``, ``TIRE_MIN_ACCURACY``, ``TIRE_MIN_F1``).
    """
    model_names = [*list_models(), *ALIASES]
    thresholds = Thresholds.parse(accuracy=min_accuracy, f1=min_f1)
    params: dict[str, dict[str, Any]] = {
        # Airflow checks a Param with jsonschema, which searches with Python's re: there "$"
        # also matches before a final newline, which the lookahead refuses.
        "dataset_version": param_kwargs(
            PipelineParams, "dataset_version", pattern=f"{VERSION_PATTERN}(?!\\n)"
        ),
        "model_types": param_kwargs(
            PipelineParams,
            "model_types",
            items={"type": "string", "enum": model_names},
            uniqueItems=True,
        ),
    }
    for name in FORM_HYPERPARAMETERS:
        params[name] = param_kwargs(PipelineParams, name, epochs if name == "epochs" else None)
    params["metric"] = param_kwargs(PipelineParams, "metric")
    params["thresholds"] = param_kwargs(PipelineParams, "thresholds", thresholds)
    params["sweep"] = param_kwargs(
        PipelineParams,
        "sweep",
        propertyNames={"enum": list(HYPERPARAMETERS)},
        additionalProperties={
            "type": "array",
            "minItems": 1,
            "items": {"type": ["boolean", "integer", "number", "string", "null"]},
        },
    )
    for name in HYPERPARAMETERS:
        if name not in FORM_HYPERPARAMETERS:
            params[name] = param_kwargs(PipelineParams, name, section="Other hyperparameters")
    return params


def option_help(model: type[BaseModel], name: str) -> str:
    """A CLI option's help from ``model``'s field: description, allowed values, default."""
    info = model.model_fields[name]
    schema = field_schema(model, name)
    parts = [info.description or ""]
    if "enum" in schema:
        parts.append(f"One of: {', '.join(map(str, schema['enum']))}.")
    bounds = _bounds(schema)
    if bounds:
        parts.append(f"Range: {bounds}.")
    default = info.get_default(call_default_factory=True)
    # Parentheses, not brackets: Typer's help reads [...] as markup.
    if info.is_required():
        parts.append("(required)")
    elif default is not None:  # what None means is the description's to say
        parts.append(f"(default: {_show(default)})")
    return " ".join(part for part in parts if part)


def _bounds(schema: Mapping[str, Any]) -> str:
    low = (
        f">= {schema['minimum']:g}"
        if "minimum" in schema
        else f"> {schema['exclusiveMinimum']:g}"
        if "exclusiveMinimum" in schema
        else ""
    )
    high = (
        f"<= {schema['maximum']:g}"
        if "maximum" in schema
        else f"< {schema['exclusiveMaximum']:g}"
        if "exclusiveMaximum" in schema
        else ""
    )
    return ", ".join(part for part in (low, high) if part)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def defaults_table(model: type[BaseModel]) -> str:
    """A Markdown table of ``model``'s fields (required ones first): name, default, allowed
    values, meaning. The README's tables are these; a test keeps them equal."""
    rows = ["| field | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    fields = sorted(model.model_fields.items(), key=lambda item: not item[1].is_required())
    for name, info in fields:
        default = "required" if info.is_required() else f"`{_show(info.get_default())}`"
        meaning = (info.description or "").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{name}` | {default} | {_allowed(model, name)} | {meaning} |")
    return "\n".join(rows)


def _allowed(model: type[BaseModel], name: str) -> str:
    schema = field_schema(model, name)
    kinds = schema.get("type")
    nullable = isinstance(kinds, list) and "null" in kinds
    kind = next((k for k in kinds if k != "null"), None) if isinstance(kinds, list) else kinds
    if "enum" in schema:
        text = ", ".join(str(value) for value in schema["enum"] if value is not None)
    elif kind == "boolean":
        text = "true, false"
    elif "pattern" in schema:
        text = f"`{schema['pattern']}`"
    else:
        text = _bounds(schema) or {"string": "text", "integer": "integer"}.get(kind or "", "number")
    return f"{text} or none" if nullable else text


__all__ = [
    "DEFAULT_MODEL_TYPE",
    "GATE_METRICS",
    "HYPERPARAMETERS",
    "LABEL_PATTERN",
    "MAX_LABEL_LENGTH",
    "MAX_SWEEP_JOBS",
    "MAX_VERSION_LENGTH",
    "NAME_RULE",
    "OPTIMIZERS",
    "SCHEDULERS",
    "SWEEP_ID_TAG",
    "SWEEP_INDEX_TAG",
    "SWEEP_SIZE_TAG",
    "VERSION_PATTERN",
    "Hyperparameters",
    "PipelineParams",
    "SweepMember",
    "Thresholds",
    "TrainConfig",
    "dag_params",
    "defaults_table",
    "expand_jobs",
    "field_schema",
    "load_config_file",
    "make_config",
    "name_problem",
    "option_help",
    "param_kwargs",
    "parse_pipeline_params",
    "resolve_config",
    "split_job",
    "sweep_id",
]
