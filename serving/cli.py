"""`lantern serve endpoint.yaml` and `lantern endpoint get-credentials`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from lantern.console import console, stdout, user_errors


@click.command("serve")
@click.argument("config_path", type=click.Path(dir_okay=False, exists=True), metavar="ENDPOINT_YAML")
@click.option("--port", default=3000, show_default=True, envvar="BENTOML_PORT")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes; each loads every deployment.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI.")
@user_errors
def serve(config_path: str, port: int, host: str, workers: int, tracking_uri: str | None) -> None:
    """Serve the endpoint described by ENDPOINT_YAML with BentoML (checks every model in the registry first)."""
    from registry.store import tracking_uri as resolve_uri
    from serving.auth import PRIMARY_ENV, credentials_path, scoring_keys
    from serving.checks import check_against_registry
    from serving.config import load_endpoint_config
    from serving.service import CONFIG_ENV, WORKERS_ENV

    config = load_endpoint_config(config_path)
    uri = resolve_uri(tracking_uri)
    for line in check_against_registry(config, uri):
        console.print(f"[green]✓[/green] {line}")
    if config.auth_mode == "key":
        keys = scoring_keys(config.name)
        where = f"${PRIMARY_ENV}" if keys.source == "environment" else str(credentials_path(config.name))
        console.print(f"Scoring keys: {where} (print them with `lantern endpoint get-credentials {config_path}`)")
    base = f"http://{host}:{port}"
    console.print(f"Endpoint [bold]{config.name}[/bold] on {base}: POST {base}/score, /predict, /explain; "
                  f"GET {base}/readyz, /metrics, /docs")
    env = {**os.environ, CONFIG_ENV: str(Path(config_path).resolve()), WORKERS_ENV: str(workers),
           "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:Lantern", "--port", str(port),
               "--host", host, "--arg", f"config={Path(config_path).resolve()}", "--arg", f"workers={workers}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


@click.group("endpoint")
def endpoint_group() -> None:
    """The endpoint's keys and state."""


@endpoint_group.command("get-credentials")
@click.argument("endpoint", metavar="ENDPOINT_YAML_OR_NAME")
@click.option("--key", "which", type=click.Choice(["primary", "secondary"]), default=None,
              help="Print only this key, bare (for KEY=$(...) in a shell).")
@user_errors
def get_credentials(endpoint: str, which: str | None) -> None:
    """Print the endpoint's two scoring keys as JSON (generated and stored on first use)."""
    from serving.auth import scoring_keys
    from serving.config import load_endpoint_config

    name = load_endpoint_config(endpoint).name if Path(endpoint).is_file() else endpoint
    keys = scoring_keys(name)
    if which:
        click.echo(getattr(keys, which))
        return
    stdout.print_json(json.dumps({"endpoint": name, "primary": keys.primary, "secondary": keys.secondary,
                                  "source": keys.source}))
