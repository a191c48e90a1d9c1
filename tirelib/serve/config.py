"""The model server's own settings: ``TIRE_SERVE_*`` variables, overridden by ``tirelib serve``.

Where to find MLflow and Slack stays in :class:`tirelib.settings.Settings`; what is served, how it
is batched and which requests are refused lives here.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tirelib.errors import ConfigurationError
from tirelib.settings import Settings
from tirelib.urls import mask_credentials

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_WORKERS = 64


class ServeConfig(BaseSettings):
    """What the server serves and the limits it enforces (``TIRE_SERVE_<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix="TIRE_SERVE_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=8501, ge=1, le=65535, description="TensorFlow Serving's REST port.")
    name: str = Field(
        default="tire", pattern=NAME_PATTERN, description="Model name in the URLs (/v1/models/…)."
    )
    model_uri: str | None = Field(
        default=None,
        description=(
            "What to serve: models:/<name>@<alias> follows the alias, models:/<name>/<version> "
            "pins a version. Default: models:/<TIRE_MODEL_NAME>@production."
        ),
    )
    poll_interval_s: float = Field(
        default=5.0, gt=0, le=3600, description="Seconds between checks of the alias."
    )
    startup_timeout_s: float = Field(
        default=300.0, ge=0, description="How long startup waits for the first model."
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Most instances in one forward pass."
    )
    max_wait_ms: float = Field(
        default=10.0, ge=0, le=1000, description="Longest wait for a batch to fill, milliseconds."
    )
    max_body_bytes: int = Field(
        default=64 * 2**20, ge=1024, description="Largest request body accepted, bytes."
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a client has to send a request's line and headers; a slower one gets 408 "
            "and is disconnected."
        ),
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        le=512 * 1024,
        description="Largest request line and headers, bytes; a larger head gets 431.",
    )
    max_headers: int = Field(
        default=100, ge=1, le=10_000, description="Most header fields in a request; more get 431."
    )
    max_instances: int = Field(
        default=256, ge=1, le=100_000, description="Most images in one request."
    )
    max_image_side: int = Field(
        default=4096, ge=1, le=16384, description="Largest image height or width, pixels."
    )
    image_budget_factor: float = Field(
        default=64,
        ge=1,
        le=65536,
        description=(
            "Decoded pixels allowed in one image, in multiples of the model's input area "
            "(64 x 224 x 224 = 3.2 million); never below min_image_budget, never above "
            "max_image_side squared or 4096 x 4096. A large JPEG counts at the reduced size it "
            "decodes at (1/2, 1/4 or 1/8, still covering the input size)."
        ),
    )
    min_image_budget: int = Field(
        default=2048 * 2048,
        ge=1,
        description="Least pixel budget of one image, whatever the model's input (2048 x 2048).",
    )
    request_budget_images: int = Field(
        default=8,
        ge=1,
        le=1024,
        description=(
            "Decoded pixels allowed in one request, all its images together, in multiples of "
            "the per-image budget."
        ),
    )
    decode_budget_images: int = Field(
        default=4,
        ge=1,
        le=1024,
        description=(
            "Pixels decoded at once in the whole server, in multiples of the per-image budget; "
            "a request that does not fit waits its turn (a small one never waits)."
        ),
    )
    decode_queue_images: int = Field(
        default=32,
        ge=0,
        le=100_000,
        description=(
            "Pixels allowed to wait for decoding, in multiples of the per-image budget; "
            "beyond it a request is answered 503 with Retry-After."
        ),
    )
    num_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Torch intra-op threads of each worker; default: the CPUs shared among them.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description=(
            "Server processes sharing the port, each with its own model and reload; "
            "their metrics are summed."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the network runs; auto picks CUDA when present."
    )
    optimize: bool = Field(
        default=True,
        description="Rewrite the network for inference (batch norm folded, oneDNN layout).",
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        default="auto",
        description=(
            "What runs the network: onnxruntime needs the version's ONNX export to match "
            "PyTorch on its test images (else the version fails to load); auto uses it on the "
            "CPU when it matches, else torch."
        ),
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description=(
            "int8: serve the ONNX export quantized to int8 (onnxruntime's static quantization) "
            "when its accuracy on the test images drops by at most max_accuracy_drop."
        ),
    )
    max_accuracy_drop: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Accuracy an int8 model may lose against PyTorch on the test images.",
    )
    feedback_window_requests: int = Field(
        default=100_000,
        ge=1,
        description=(
            "Most recent predictions remembered for the feedback route (model version and "
            "predicted classes); the oldest is forgotten first."
        ),
    )
    feedback_ttl_seconds: float = Field(
        default=86_400,
        gt=0,
        le=7 * 86_400,
        description="How long a prediction accepts feedback, seconds; later its id is unknown.",
    )
    capture_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Share of prediction requests whose images are written to S3 "
            "(captures/<date>/…), each request sampled whole; 0 is off."
        ),
    )
    sink_flush_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="Seconds between writes of the feedback records gathered to S3.",
    )
    sink_queue_items: int = Field(
        default=10_000,
        ge=1,
        le=100_000,
        description=(
            "Captures and feedback bodies waiting to be written to S3; beyond it they are "
            "dropped and counted (tire_capture_dropped_total), the request never waits."
        ),
    )
    capture_queue_bytes: int = Field(
        default=256 * 2**20,
        ge=1,
        description="Captured image bytes waiting to be written to S3; beyond it, as above.",
    )

    @field_validator("quantize")
    @classmethod
    def _quantize_needs_onnxruntime(cls, value: str, info: ValidationInfo) -> str:
        if value != "none" and info.data.get("backend") == "torch":
            raise ValueError(
                f"quantize {value} runs on onnxruntime: it needs backend auto or onnxruntime, "
                "not torch"
            )
        return value

    def resolved_model_uri(self, settings: Settings) -> str:
        return self.model_uri or f"models:/{settings.model_name}@production"

    def resolved_threads(self) -> int:
        return self.num_threads or max(1, (os.cpu_count() or 1) // self.workers)


def load_serve_config(**overrides: object) -> ServeConfig:
    """Read ``TIRE_SERVE_*`` from the environment; ``overrides`` (not None) take precedence.

    Raises :class:`ConfigurationError` naming each bad value and what it allows.
    """
    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        return ServeConfig(**values)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = []
        for item in error.errors():
            field = str(item["loc"][0]) if item["loc"] else "?"
            line = f"TIRE_SERVE_{field.upper()}={item.get('input')!r}: {item['msg']}"
            lines.append(mask_credentials(line))
        raise ConfigurationError("invalid server settings:\n  " + "\n  ".join(lines)) from error
