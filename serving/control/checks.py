"""Checks run before the server starts (its address, its deployments against the registry), and before the
management API adds or updates a deployment."""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

from registry.errors import LanternError
from registry.references import version_uri
from registry.resolve import download_version, resolve_version
from registry.settings import with_overrides
from registry.store import open_client
from serving.config import ConfigError, DeploymentConfig, EndpointConfig


@dataclass(frozen=True)
class CheckedModel:
    """The registered version a deployment serves, as checked against the registry."""

    version: str  # models:/NAME/N
    arch: str
    task: str

    def describe(self) -> str:
        return f"{self.version} ({self.arch}, {self.task})"


def check_deployment(deployment: DeploymentConfig, tracking_uri: str | None = None,
                     version: str | None = None) -> CheckedModel:
    """The version the deployment serves: `version` when it was pinned to one, else the one `deployment.model` names
    now; a LanternError when it does not resolve or its settings overrides are not valid for the version's task."""
    downloaded = download_version(open_client(tracking_uri), version or deployment.model)
    files = downloaded.files
    spec = files.read_spec()
    with_overrides(files.read_settings(spec.task), spec.task, deployment.settings)
    return CheckedModel(downloaded.uri, spec.arch, spec.task)


def pinned_version(model: str, tracking_uri: str | None = None) -> str | None:
    """`models:/NAME/N` of the version a deployment's `model` names now (an alias resolved), None when it names none:
    the deployment then fails to load, saying why."""
    try:
        version = resolve_version(open_client(tracking_uri), model)
    except LanternError:
        return None
    return version_uri(version.name, version.version)


def version_task(version: str, tracking_uri: str | None = None) -> str:
    """The task of a registered version (`models:/NAME/N`; its files are cached once downloaded)."""
    return download_version(open_client(tracking_uri), version).files.read_spec().task


def mixed_tasks_problem(tasks: dict[str, str], split: str) -> str | None:
    """Why deployments of these tasks (by name) cannot share `split`: they answer in different formats."""
    by_task: dict[str, list[str]] = {}
    for name, task in sorted(tasks.items()):
        by_task.setdefault(task, []).append(name)
    if len(by_task) < 2:
        return None
    named = "; ".join(f"{', '.join(names)} serve {task}" for task, names in by_task.items())
    return (f"{split} goes to deployments of one task, which answer in one format: {named}. Pin a request to a "
            "deployment (x-lantern-deployment) to reach one of another task")


def check_against_registry(config: EndpointConfig, tracking_uri: str | None = None,
                           versions: dict[str, str | None] | None = None) -> list[str]:
    """One line per deployment: its version (`versions`: those the deployments were pinned to); a ConfigError names
    every model that does not resolve, every settings override the version's task does not accept, and a traffic
    split over deployments of different tasks."""
    problems, lines, tasks = [], [], {}
    for deployment in config.deployments:
        version = (versions or {}).get(deployment.name)
        try:
            checked = check_deployment(deployment, tracking_uri, version)
            lines.append(f"{deployment.name}: {deployment.model} -> {checked.describe()}"
                         f"{pin_note(deployment, version, tracking_uri)}")
            tasks[deployment.name] = checked.task
        except LanternError as error:
            problems.append(f"deployment {deployment.name}: {error}")
    split = {name for shares in (config.traffic, config.mirror_traffic) for name, percent in shares.items() if percent}
    mixed = mixed_tasks_problem({name: task for name, task in tasks.items() if name in split},
                                "the traffic (live and mirrored)")
    if mixed:
        problems.append(mixed)
    if problems:
        raise ConfigError("; ".join(problems))
    return lines


def pin_note(deployment: DeploymentConfig, version: str | None, tracking_uri: str | None) -> str:
    """What to say of a deployment pinned to `version` by its alias: when, and whether the alias has moved since."""
    if version is None or version == deployment.model:
        return ""
    now = pinned_version(deployment.model, tracking_uri)
    if now in (None, version):
        return " (its alias as resolved when the deployment was made or last given its model)"
    return (f" (its alias names {now} now: `lantern deploy update {deployment.name} --model {deployment.model}` "
            "moves it there)")


def check_listen_address(host: str, port: int) -> None:
    """A LanternError naming the problem when the server could not listen on `host`:`port` (a port in use, an address
    this machine does not have), said before BentoML starts (it would end with a traceback)."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise LanternError(f"cannot listen on {host}: {error.strerror} (--host takes an address of this machine, "
                           "such as 127.0.0.1, or 0.0.0.0 for every one)") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as error:
            hint = ("another server listens there; stop it or choose another --port" if error.errno == errno.EADDRINUSE
                    else "choose another --host or --port")
            raise LanternError(f"cannot listen on {host}:{port}: {error.strerror} ({hint})") from None


def check_tls_files(certfile: str | None, keyfile: str | None) -> None:
    """A LanternError unless the TLS certificate chain loads with its key (from `keyfile`, or from `certfile` itself
    when it holds both): a wrong pair or a passphrase-protected key would otherwise end every worker with a
    traceback. Nothing to check without a certificate."""
    if certfile is None:
        if keyfile is not None:
            raise LanternError("--ssl-keyfile needs --ssl-certfile (the certificate chain, PEM)")
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=no_password)
    except (ssl.SSLError, OSError, ValueError) as error:
        key = f"key {keyfile}" if keyfile else "the key in it (no --ssl-keyfile)"
        raise LanternError(f"the TLS certificate {certfile} and {key} do not load together: {error} (PEM files, the "
                           "key unencrypted and matching the certificate)") from None


def no_password() -> str:
    """A passphrase-protected key would make the server prompt for one on its terminal: refuse it instead."""
    raise ValueError("the private key is encrypted")
