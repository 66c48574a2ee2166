"""`lantern endpoint show`, `lantern deploy add/update/remove`, `lantern traffic set/mirror`, `lantern keys
regenerate` and `lantern rollout`: the management API from a terminal. Each waits until the change took effect."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import click
import yaml
from rich.table import Table

from registry.console import console, stdout, user_errors
from serving.client.manage_client import DEFAULT_URL, ManageClient
from serving.environment import ADMIN_ENV, URL_ENV

TOP_LEVEL = {"model", "settings", "device", "backend", "max_batch_size", "max_latency_ms", "request_settings",
             "readiness_probe", "liveness_probe"}


def connection(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--url` and `--admin-key` options, turned into a `client` argument."""
    func = click.option("--admin-key", envvar=ADMIN_ENV, default=None, show_envvar=True,
                        help="The endpoint's admin key.")(func)
    func = click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True, show_envvar=True,
                        help="The running endpoint.")(func)
    return func


@contextlib.contextmanager
def waiting(description: str) -> Iterator[Callable[[str], None]]:
    """A spinner whose text follows the wait's progress."""
    with console.status(f"{description} ...") as status:
        yield lambda text: status.update(f"{description}: {text}")


def applied(client: ManageClient, result: dict[str, Any], description: str) -> dict[str, Any]:
    """`result` (a change's answer) once every worker has applied its revision."""
    with waiting(description) as progress:
        client.wait_applied(result["revision"], progress=progress)
    return result


def parse_nested_fields(values: tuple[str, ...], what: str) -> dict[str, Any]:
    """`k=v` pairs (YAML values: numbers, booleans, strings); dotted keys make nested mappings."""
    result: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        target = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(value) if value else ""
    return result


def deployment_fields(assignments: tuple[str, ...]) -> dict[str, Any]:
    """`--set` values: deployment fields (`device=cuda`, `request_settings.request_timeout_ms=90000`), anything
    else a settings override (`valid_crop_size=224`)."""
    fields = parse_nested_fields(assignments, "--set")
    settings = {k: fields.pop(k) for k in list(fields) if k not in TOP_LEVEL}
    if settings:
        fields.setdefault("settings", {}).update(settings)
    return fields


def parse_split(values: tuple[str, ...], what: str) -> dict[str, int]:
    split = {}
    for item in values:
        name, sep, percent = item.partition("=")
        if not sep or not percent.strip().isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=PERCENT (a whole number)", param_hint=what)
        split[name.strip()] = int(percent)
    return split


def show_endpoint(view: dict[str, Any]) -> None:
    table = Table(title=f"endpoint {view['name']} - revision {view['revision']} ({view['last_change']})")
    for column in ("deployment", "state", "traffic", "mirror", "model version", "gen", "runs on", "requests", "failed",
                   "p99 ms"):
        table.add_column(column)
    for d in view["deployments"]:
        counters = d["counters"]
        state = d["state"] + (f" ({d['reason']})" if d["reason"] else "")
        runs_on = ", ".join(sorted({w["backend"] for w in d["workers"].values() if w.get("backend")})) or "-"
        sharing = sorted({other for w in d["workers"].values() for other in w.get("shares_model_with", [])})
        if sharing:
            runs_on += f" (model shared with {', '.join(sharing)})"
        table.add_row(d["name"], state, f"{d['traffic']} %", f"{d['mirror_traffic']} %", d["model_version"] or "-",
                      str(d["generation"]), runs_on, str(counters["requests"]), str(counters["failed"]),
                      "-" if counters["p99_ms"] is None else f"{counters['p99_ms']:.0f}")
    stdout.print(table)
    workers = ", ".join(worker_label(w) for w in view["workers"])
    stdout.print(f"workers: {workers}; every worker applied the latest revision: {view['applied']}")
    database = view.get("state_database") or {"reachable": True}
    if not database["reachable"]:
        stdout.print(f"[yellow]![/yellow] the state database does not answer ({database.get('problem')}): this is "
                     f"the answering worker's view (revision {database.get('serving_revision')}); it serves on, and "
                     "changes are refused until the database is back")
    gpus = {gpu["device"]: gpu for worker in view["workers"] for gpu in worker.get("gpu_memory", [])}
    for device, gpu in sorted(gpus.items()):
        torch_held = sum(g["torch_reserved_bytes"] for w in view["workers"] for g in w.get("gpu_memory", [])
                         if g["device"] == device)
        stdout.print(f"GPU {device}: {gpu['used_bytes'] / 2**30:.1f} of {gpu['total_bytes'] / 2**30:.1f} GiB in use "
                     f"by every process on it ({torch_held / 2**30:.1f} GiB in the workers' torch)")


def worker_label(worker: dict[str, Any]) -> str:
    """'host-a/1234 (rev 5, 983 MiB)': a worker (HOST/PID), the state revision it applied and its memory (when it
    published it)."""
    memory = f", {worker['memory_bytes'] / 2**20:.0f} MiB" if worker.get("memory_bytes") else ""
    return f"{worker['worker']} (rev {worker['revision']}{memory})"


# lantern endpoint show ------------------------------------------------------------------------------------------------

@click.command("show")
@connection
@click.option("--json", "as_json", is_flag=True, help="Print the management API's JSON.")
@user_errors
def endpoint_show(url: str, admin_key: str | None, as_json: bool) -> None:
    """Deployments (state in every worker, model version, traffic, live counters), traffic and mirror."""
    view = ManageClient(url, admin_key).endpoint()
    if as_json:
        stdout.print_json(json.dumps(view))
    else:
        show_endpoint(view)


# lantern deploy -------------------------------------------------------------------------------------------------------

@click.group("deploy")
def deploy_group() -> None:
    """Add, update and remove deployments of the running endpoint."""


@deploy_group.command("add")
@click.argument("name")
@click.argument("model_uri")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A settings override (valid_crop_size=224) or deployment field (device=cuda, "
                   "request_settings.request_timeout_ms=90000); repeatable.")
@click.option("--no-wait", is_flag=True, help="Return once the change is accepted.")
@connection
@user_errors
def deploy_add(name: str, model_uri: str, assignments: tuple[str, ...], no_wait: bool, url: str,
               admin_key: str | None) -> None:
    """Add deployment NAME serving MODEL_URI with 0 % traffic, and wait until it is ready in every worker."""
    client = ManageClient(url, admin_key)
    view = client.add({"name": name, "model": model_uri, **deployment_fields(assignments)})
    console.print(f"[green]✓[/green] added deployment {name} ({model_uri}) with 0 % traffic")
    if not no_wait:
        with waiting(f"loading {name}") as progress:
            view = client.wait_ready(name, progress=progress)
        console.print(f"[green]✓[/green] {name} is ready in every worker: {view['model_version']}")


@deploy_group.command("update")
@click.argument("name")
@click.option("--model", "model_uri", default=None,
              help="Serve this model version instead (an alias: the version it names now).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A settings override or deployment field (as for `deploy add`); repeatable.")
@click.option("--no-wait", is_flag=True, help="Return once the change is accepted.")
@connection
@user_errors
def deploy_update(name: str, model_uri: str | None, assignments: tuple[str, ...], no_wait: bool, url: str,
                  admin_key: str | None) -> None:
    """Update deployment NAME; the new generation is readied, then swapped in, while the current one serves."""
    patch = deployment_fields(assignments)
    if model_uri:
        patch["model"] = model_uri
    if not patch:
        raise click.UsageError("nothing to update: give --model and/or --set KEY=VALUE")
    client = ManageClient(url, admin_key)
    before = client.deployment(name)["generation"]
    view = client.update(name, patch)
    if view["generation"] == before:  # the version and settings it has already: no new generation
        console.print(f"[green]✓[/green] deployment {name} unchanged: generation {before} already serves "
                      f"{view['model_version']} with these settings")
        return
    console.print(f"[green]✓[/green] deployment {name} updated to generation {view['generation']}")
    if not no_wait:
        with waiting(f"readying {name} generation {view['generation']}") as progress:
            view = client.wait_ready(name, progress=progress)
        console.print(f"[green]✓[/green] {name} serves generation {view['generation']} in every worker: "
                      f"{view['model_version']}")


@deploy_group.command("remove")
@click.argument("name")
@connection
@user_errors
def deploy_remove(name: str, url: str, admin_key: str | None) -> None:
    """Remove deployment NAME (refused while it has live or mirrored traffic)."""
    client = ManageClient(url, admin_key)
    applied(client, client.remove(name), f"removing {name}")
    console.print(f"[green]✓[/green] removed deployment {name} from every worker")


# lantern traffic ------------------------------------------------------------------------------------------------------

@click.group("traffic")
def traffic_group() -> None:
    """Set the live traffic split and the mirrored share."""


@traffic_group.command("set")
@click.argument("split", nargs=-1, required=True, metavar="NAME=PERCENT...")
@connection
@user_errors
def traffic_set(split: tuple[str, ...], url: str, admin_key: str | None) -> None:
    """Set the live split, e.g. `blue=90 green=10` (deployments left out get 0 %)."""
    client = ManageClient(url, admin_key)
    result = applied(client, client.set_traffic(parse_split(split, "split")), "applying the traffic split")
    console.print("[green]✓[/green] traffic " + ", ".join(f"{n}={p}" for n, p in result["traffic"].items())
                  + " in every worker")


@traffic_group.command("mirror")
@click.argument("split", nargs=-1, metavar="NAME=PERCENT")
@click.option("--off", is_flag=True, help="Stop mirroring.")
@connection
@user_errors
def traffic_mirror(split: tuple[str, ...], off: bool, url: str, admin_key: str | None) -> None:
    """Copy a share of live requests to a deployment with no live traffic, e.g. `green=20` (at most 50)."""
    if bool(split) == off:
        raise click.UsageError("give NAME=PERCENT, or --off")
    client = ManageClient(url, admin_key)
    result = applied(client, client.set_mirror({} if off else parse_split(split, "split")), "applying the mirror")
    mirrored = ", ".join(f"{n}={p}" for n, p in result["mirror_traffic"].items() if p) or "off"
    console.print(f"[green]✓[/green] mirror traffic {mirrored} in every worker")


# lantern keys ---------------------------------------------------------------------------------------------------------

@click.group("keys")
def keys_group() -> None:
    """The endpoint's keys."""


@keys_group.command("regenerate")
@click.argument("kind", type=click.Choice(["primary", "secondary", "admin"]))
@connection
@user_errors
def keys_regenerate(kind: str, url: str, admin_key: str | None) -> None:
    """Replace a key; the new key is printed once (on stdout), the old one stops working in every worker."""
    client = ManageClient(url, admin_key)
    result = applied(client, client.regenerate(kind), f"applying the new {kind} key")
    console.print(f"[green]✓[/green] new {kind} key in force in every worker")
    if result.get("stored_in") is None:
        console.print("[yellow]![/yellow] the server's keys come from its environment: put this key there (the "
                      "Secret); the old one no longer works")
    click.echo(result["key"])


# lantern rollout ------------------------------------------------------------------------------------------------------

@click.command("rollout")
@click.argument("name")
@click.argument("model_uri")
@click.option("--steps", default="10,50,100", show_default=True, help="Percents of live traffic, in order.")
@click.option("--interval", default="30s", show_default=True, help="How long each step is watched (30s, 2m).")
@click.option("--max-error-rate", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="Roll back when NAME's failed share (408, 424, 5xx) over a step is higher.")
@click.option("--max-p99-ms", default=1000.0, show_default=True, type=click.FloatRange(min=1),
              help="Roll back when NAME's p99 latency over a step is higher.")
@click.option("--min-requests", default=20, show_default=True, type=click.IntRange(min=1),
              help="Judge a step only once NAME answered this many requests in it.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="A settings override or deployment field (as for `deploy add`); repeatable.")
@connection
@user_errors
def rollout_command(name: str, model_uri: str, steps: str, interval: str, max_error_rate: float, max_p99_ms: float,
                    min_requests: int, assignments: tuple[str, ...], url: str, admin_key: str | None) -> None:
    """Roll MODEL_URI out as a new deployment NAME: add it, wait until ready, shift live traffic to it step by step,
    and roll the traffic back when its error rate or p99 latency goes past a threshold."""
    from serving.client.rollout import RolloutFailed, Thresholds, parse_duration, parse_steps, rollout

    client = ManageClient(url, admin_key)
    config = {"name": name, "model": model_uri, **deployment_fields(assignments)}
    report = lambda text: console.print(f"[green]✓[/green] {text}")  # noqa: E731
    try:
        with waiting(f"rolling out {name}") as progress:
            split = rollout(client, config, parse_steps(steps), parse_duration(interval),
                            Thresholds(max_error_rate, max_p99_ms, min_requests), report, progress)
    except RolloutFailed as error:
        console.print(f"[red]Rolled back:[/red] {error}")
        raise click.exceptions.Exit(1) from None
    console.print(f"[green]✓[/green] rollout of {name} done: " + ", ".join(f"{n}={p}" for n, p in split.items()))

