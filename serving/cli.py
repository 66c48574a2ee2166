"""`lantern serve endpoint.yaml` and `lantern endpoint get-credentials`."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import click

from registry.console import console, stdout, user_errors
from serving.http.draining import MAX_DRAIN_SECONDS


@click.command("serve")
@click.argument("config_path", type=click.Path(dir_okay=False, exists=True), metavar="ENDPOINT_YAML")
@click.option("--port", default=3000, show_default=True, envvar="BENTOML_PORT", type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes (instances); each loads every deployment and admits its own "
                   "max_concurrent_requests_per_instance.")
@click.option("--drain-seconds", default=0.0, show_default=True, type=click.FloatRange(0, MAX_DRAIN_SECONDS),
              help="On SIGTERM, report unready (/readyz 503) for this long while still answering, then stop "
                   "(for a load balancer to stop sending first); SIGINT stops at once.")
@click.option("--ssl-certfile", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Serve HTTPS with this certificate chain (PEM).")
@click.option("--ssl-keyfile", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The certificate's private key (PEM, unencrypted), unless --ssl-certfile holds it.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI.")
@click.option("--state-uri", envvar="LANTERN_STATE_URI", default=None,
              help="Database of the endpoint state (SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@db/lantern): "
                   "every host given the same one serves one endpoint. Default: SQLite under the Lantern home.")
@click.option("--reset-state", is_flag=True,
              help="Start over from ENDPOINT_YAML's deployments and traffic, dropping the persisted endpoint state.")
@user_errors
def serve(config_path: str, port: int, host: str, workers: int, drain_seconds: float, ssl_certfile: str | None,
          ssl_keyfile: str | None, tracking_uri: str | None, state_uri: str | None, reset_state: bool) -> None:
    """Serve the endpoint described by ENDPOINT_YAML with BentoML (checks every model in the registry first).

    The first start creates the endpoint's state from ENDPOINT_YAML; later starts restore the persisted state
    (deployments, traffic and mirror as the management API left them); limits and auth mode always come from the
    file."""
    from registry.errors import LanternError
    from registry.store import tracking_uri as resolve_uri
    from serving.config import CONFIG_ENV, WORKERS_ENV, load_endpoint_config
    from serving.control.auth import admin_key, credentials_path, scoring_keys
    from serving.control.checks import check_against_registry, check_listen_address, check_tls_files, pinned_version
    from serving.control.database import embedded
    from serving.control.state import StateStore, current_key_digests
    from serving.control.workers import host_id
    from serving.environment import ADMIN_ENV, HOST_ENV, PRIMARY_ENV, STATE_URI_ENV

    config = load_endpoint_config(config_path)
    uri = resolve_uri(tracking_uri)
    store = StateStore(config.name, state_uri)
    if reset_state or store.read() is None:
        for line in check_against_registry(config, uri):
            console.print(f"[green]✓[/green] {line}")
    check_listen_address(host, port)  # before a first start's state is written
    check_tls_files(ssl_certfile, ssl_keyfile)
    state, restored = store.prepare(config, pin=lambda model: pinned_version(model, uri), reset=reset_state)
    if restored:
        console.print(f"Endpoint state restored from {store.where} (revision {state.revision}: {state.last_change}); "
                      f"the deployments and traffic in {config_path} apply with --reset-state")
        try:
            for line in check_against_registry(state.endpoint_config(config), uri, state.versions()):
                console.print(f"[green]✓[/green] {line}")
        except LanternError as error:
            console.print(f"[yellow]![/yellow] {error} (those deployments will show as failed)")
    keys_file = str(credentials_path(config.name))
    if config.auth_mode == "key":
        where = f"${PRIMARY_ENV}" if scoring_keys(config.name).source == "environment" else keys_file
        console.print(f"Scoring keys: {where} (print them with `lantern endpoint get-credentials {config_path}`)")
    where = f"${ADMIN_ENV}" if admin_key(config.name).source == "environment" else keys_file
    console.print(f"Admin key (management API, `lantern deploy/traffic/keys`): {where}")
    if not embedded(store.uri) and state.keys != current_key_digests(config.name):
        console.print(f"[yellow]![/yellow] the shared state holds other keys than {keys_file}: this host accepts "
                      "the state's (those of the host that made or regenerated them); give every host the same keys "
                      f"through ${PRIMARY_ENV}, ${ADMIN_ENV}")
    base = f"{'https' if ssl_certfile else 'http'}://{host}:{port}"
    console.print(f"Endpoint [bold]{config.name}[/bold] on {base}: POST {base}/score, /predict, /explain; "
                  f"GET {base}/readyz, /metrics, /docs; try it in a browser at {base}/")
    # this run's workers, told apart from other runs' (hosts) in a shared state
    host_name = os.environ.get(HOST_ENV) or f"{host_id()}-{secrets.token_hex(3)}"
    env = {**os.environ, CONFIG_ENV: str(Path(config_path).resolve()), WORKERS_ENV: str(workers),
           "MLFLOW_TRACKING_URI": uri, STATE_URI_ENV: store.uri, HOST_ENV: host_name}
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:Lantern", "--port", str(port),
               "--host", host, "--arg", f"config={Path(config_path).resolve()}", "--arg", f"workers={workers}",
               "--arg", f"drain_seconds={drain_seconds:g}"]
    for name, path in (("ssl_certfile", ssl_certfile), ("ssl_keyfile", ssl_keyfile)):
        if path:
            command += ["--arg", f"{name}={Path(path).resolve()}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


@click.group("endpoint")
def endpoint_group() -> None:
    """The endpoint's keys and state."""


@endpoint_group.command("get-credentials")
@click.argument("endpoint", metavar="ENDPOINT_YAML_OR_NAME")
@click.option("--key", "which", type=click.Choice(["primary", "secondary", "admin"]), default=None,
              help="Print only this key, bare (for KEY=$(...) in a shell).")
@user_errors
def get_credentials(endpoint: str, which: str | None) -> None:
    """Print the endpoint's scoring keys and admin key as JSON (generated and stored on first use)."""
    from serving.config import load_endpoint_config
    from serving.control.auth import admin_key, scoring_keys

    name = load_endpoint_config(endpoint).name if Path(endpoint).is_file() else endpoint
    keys, admin = scoring_keys(name), admin_key(name)
    if which:
        click.echo(admin.key if which == "admin" else getattr(keys, which))
        return
    stdout.print_json(json.dumps({"endpoint": name, "primary": keys.primary, "secondary": keys.secondary,
                                  "source": keys.source, "admin": admin.key, "admin_source": admin.source}))
