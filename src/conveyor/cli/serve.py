"""``conveyor serve``: run the HTTP service (REST, JSON-RPC, events) under uvicorn.

Binds 127.0.0.1 by default. Listening on any other address needs a bearer token
(``$CONVEYOR_TOKEN`` or ``--token``): without one the command refuses to start. With ``--workers N``
it also runs N in-process workers for the tasks registered in ``--app MODULE:APP``.
"""

from __future__ import annotations

import gc
import logging
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from conveyor.brokers import open_broker
from conveyor.cli.common import CliState
from conveyor.client import Conveyor
from conveyor.errors import ConfigurationError, MissingDependencyError

if TYPE_CHECKING:
    from fastapi import FastAPI

LOG_LEVELS = ("debug", "info", "warning", "error")


def _run_server(api: FastAPI, **options: Any) -> None:
    """Run uvicorn; a shutdown signal first ends the event streams.

    uvicorn waits for open connections before it runs the lifespan shutdown, and an SSE or
    WebSocket stream never closes by itself: without this hook the first Ctrl-C would hang until
    ``timeout_graceful_shutdown``.
    """
    import uvicorn

    hub = api.state.service.hub

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            # Everything built so far (FastAPI, pydantic, the app) lives as long as the process:
            # out of the collector's reach, full collections under load scan only request
            # garbage. They took tens of ms before, which showed in the enqueue p99.
            gc.freeze()

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # A signal handler may run between any two bytecodes: hand the close to the loop.
            hub.close_threadsafe()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(api, **options)).run()


@click.command()
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="Broker URL (default: the root --broker, $CONVEYOR_URL, or sqlite:///conveyor.db).",
)
@click.option("--app", "app_spec", metavar="MODULE:APP", help="Your Conveyor app (its tasks).")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="In-process workers (they run the tasks of --app).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to bind."
)
@click.option(
    "--token",
    envvar="CONVEYOR_TOKEN",
    show_envvar=True,
    help="Bearer token required on every route but /health (required beyond loopback).",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0),
    default=100.0,
    show_default=True,
    metavar="PER_S",
    help="Requests per second per client address; 0 turns the limit off.",
)
@click.option(
    "--rate-burst",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Requests a client may make at once before --rate-limit applies.",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=0),
    default=128,
    show_default=True,
    help="Requests handled at once; more get 503 + Retry-After at once. 0 turns the bound off.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Log level (server and conveyor).",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="One log line per request (tokens in query strings are never logged).",
)
def serve(
    broker_url: str | None,
    app_spec: str | None,
    workers: int,
    host: str,
    port: int,
    token: str | None,
    rate_limit: float,
    rate_burst: int,
    max_in_flight: int,
    log_level: str,
    access_log: bool,
) -> None:
    """Run the HTTP service: REST, JSON-RPC 2.0, live events, /health and /metrics."""
    try:
        import uvicorn  # noqa: F401

        from conveyor.service import ServiceSettings, create_app
        from conveyor.service.security import require_token
    except ImportError:
        raise MissingDependencyError(
            "conveyor serve needs fastapi and uvicorn; pip install 'conveyor[server]'"
        ) from None

    require_token(host, token)
    if workers and not app_spec:
        raise click.UsageError("--workers needs --app MODULE:APP, the app whose tasks they run")
    state = click.get_current_context().find_object(CliState)
    url = broker_url
    if url is None and state is not None and (state.broker_from_command_line or not app_spec):
        url = state.broker_url
    app = _load(app_spec, url)
    settings = ServiceSettings(
        token=token,
        rate_limit_per_s=rate_limit or None,
        rate_burst=rate_burst,
        max_in_flight=max_in_flight or None,
    )
    api = create_app(app, workers=workers, settings=settings)
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _run_server(
        api,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # The standard loop, even when uvloop is installed: with uvloop the enqueue p99 was 5x
        # higher in bench/http.py (36 ms vs 7 ms at 8 connections) for 10 % more throughput.
        loop="asyncio",
        timeout_graceful_shutdown=10,  # the backstop if a client holds a connection open
        log_config=None,  # keep the logging configured above
    )


def _load(app_spec: str | None, url: str | None) -> Conveyor:
    if app_spec is None:
        return Conveyor(url)  # None: $CONVEYOR_URL or the SQLite default
    from conveyor.cli.worker import load_app

    app = load_app(app_spec)
    if url is not None and url != app.url:
        # An explicit --broker wins over the URL the module built its app with; the app is not
        # connected yet, so swapping its broker is safe.
        app.broker = open_broker(url)
        app.url = url
    return app


def main() -> None:
    """``python -m conveyor.cli.serve``: the command on its own (until it is wired into the CLI)."""
    try:
        serve.main(prog_name="conveyor serve", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except ConfigurationError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
