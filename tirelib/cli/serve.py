"""``tirelib serve``: the model server (TensorFlow Serving's REST API and the v2 protocol)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tirelib.settings import get_settings


def _help(field: str) -> str:
    from tirelib.config import option_help
    from tirelib.serve.config import ServeConfig

    return option_help(ServeConfig, field)


# Every option defaults to None ("not given"): TIRE_SERVE_<FIELD>, else the default of
# tirelib.serve.config.ServeConfig, applies; help and defaults shown come from that model.
def serve(
    model_uri: Annotated[str | None, typer.Option(help=_help("model_uri"))] = None,
    host: Annotated[str | None, typer.Option(help=_help("host"))] = None,
    port: Annotated[int | None, typer.Option(help=_help("port"))] = None,
    name: Annotated[str | None, typer.Option(help=_help("name"))] = None,
    poll_interval: Annotated[float | None, typer.Option(help=_help("poll_interval_s"))] = None,
    max_batch_size: Annotated[int | None, typer.Option(help=_help("max_batch_size"))] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help=_help("max_wait_ms"))] = None,
    max_instances: Annotated[int | None, typer.Option(help=_help("max_instances"))] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help=_help("max_body_bytes"))] = None,
    image_budget_factor: Annotated[
        float | None, typer.Option(help=_help("image_budget_factor"))
    ] = None,
    min_image_budget: Annotated[int | None, typer.Option(help=_help("min_image_budget"))] = None,
    request_budget_images: Annotated[
        int | None, typer.Option(help=_help("request_budget_images"))
    ] = None,
    decode_budget_images: Annotated[
        int | None, typer.Option(help=_help("decode_budget_images"))
    ] = None,
    decode_queue_images: Annotated[
        int | None, typer.Option(help=_help("decode_queue_images"))
    ] = None,
    header_timeout: Annotated[float | None, typer.Option(help=_help("header_timeout_s"))] = None,
    max_header_bytes: Annotated[int | None, typer.Option(help=_help("max_header_bytes"))] = None,
    max_headers: Annotated[int | None, typer.Option(help=_help("max_headers"))] = None,
    threads: Annotated[int | None, typer.Option(help=_help("num_threads"))] = None,
    workers: Annotated[int | None, typer.Option(help=_help("workers"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
    backend: Annotated[str | None, typer.Option(help=_help("backend"))] = None,
    quantize: Annotated[str | None, typer.Option(help=_help("quantize"))] = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help=_help("max_accuracy_drop"))
    ] = None,
    capture_rate: Annotated[float | None, typer.Option(help=_help("capture_rate"))] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the production model; swap in a new version when the alias moves.

    Every option also reads TIRE_SERVE_<OPTION> (TIRE_SERVE_PORT, TIRE_SERVE_MODEL_URI, …).
    With --workers N, N processes share the port, each with its own model.
    """
    import uvicorn

    from tirelib.serve import load_serve_config

    config = load_serve_config(
        model_uri=model_uri,
        host=host,
        port=port,
        name=name,
        poll_interval_s=poll_interval,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_instances=max_instances,
        max_body_bytes=max_body_bytes,
        image_budget_factor=image_budget_factor,
        min_image_budget=min_image_budget,
        request_budget_images=request_budget_images,
        decode_budget_images=decode_budget_images,
        decode_queue_images=decode_queue_images,
        header_timeout_s=header_timeout,
        max_header_bytes=max_header_bytes,
        max_headers=max_headers,
        num_threads=threads,
        workers=workers,
        device=device,
        backend=backend,
        quantize=quantize,
        max_accuracy_drop=max_accuracy_drop,
        capture_rate=capture_rate,
    )
    settings = get_settings()  # bad settings fail here, not in every worker
    options: dict[str, Any] = {
        "access_log": access_log,
        "server_header": False,
        "timeout_graceful_shutdown": 30,
    }
    where = f"http://{config.host}:{config.port}/v1/models/{config.name}"
    if config.workers > 1:  # this process only watches them: it loads neither torch nor a model
        from tirelib.serve.workers import serve_workers

        typer.echo(f"serving on {where} with {config.workers} worker processes")
        serve_workers(config, **options)
        return
    from tirelib.serve import create_app
    from tirelib.serve.protocol import server_options

    app = create_app(config, settings)
    typer.echo(f"serving on {where}")
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_config=None,  # keep the logging the CLI set up
        **options,
        **server_options(config),  # h11 with a deadline and caps on request heads
    )
