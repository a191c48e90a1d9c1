"""``tirelib serve``: the model server (TensorFlow Serving's REST API and the v2 protocol)."""

from __future__ import annotations

from typing import Annotated

import typer

from tirelib.settings import get_settings


def serve(
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="models:/<name>@<alias> (followed) or models:/<name>/<version> (pinned); "
            "default: models:/<TIRE_MODEL_NAME>@production."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [8501, TF Serving's REST port].")] = None,
    name: Annotated[str | None, typer.Option(help="Model name in the URLs [tire].")] = None,
    poll_interval: Annotated[
        float | None, typer.Option(help="Seconds between checks of the alias [5].")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Most images in one forward pass [32].")
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="Longest wait for a batch to fill, ms [10].")
    ] = None,
    max_instances: Annotated[
        int | None, typer.Option(help="Most images in one request [256].")
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="Largest request body, bytes [64 MiB].")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch intra-op threads [every CPU].")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [auto].")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the production model; swap in a new version when the alias moves.

    Every option also reads TIRE_SERVE_<OPTION> (TIRE_SERVE_PORT, TIRE_SERVE_MODEL_URI, …).
    """
    import uvicorn

    from tirelib.serve import create_app, load_serve_config

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
        num_threads=threads,
        device=device,
    )
    app = create_app(config, get_settings())
    typer.echo(f"serving on http://{config.host}:{config.port}/v1/models/{config.name}")
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_config=None,  # keep the logging the CLI set up
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=30,
    )
