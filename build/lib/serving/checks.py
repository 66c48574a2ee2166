"""Checks of deployments against the registry: run before the server starts, and before the management API adds or
updates a deployment."""

from __future__ import annotations

from registry.errors import LanternError
from registry.resolve import download_version
from registry.settings import with_overrides
from registry.store import open_client
from serving.config import ConfigError, DeploymentConfig, EndpointConfig


def check_deployment(deployment: DeploymentConfig, tracking_uri: str | None = None) -> str:
    """The version `deployment.model` resolves to; a LanternError when it does not resolve or its settings overrides
    are not valid for the version's task."""
    downloaded = download_version(open_client(tracking_uri), deployment.model)
    files = downloaded.files
    spec = files.read_spec()
    with_overrides(files.read_settings(spec.task), spec.task, deployment.settings)
    return f"models:/{downloaded.version.name}/{downloaded.version.version} ({spec.arch}, {spec.task})"


def check_against_registry(config: EndpointConfig, tracking_uri: str | None = None) -> list[str]:
    """One line per deployment: its resolved version; a ConfigError names every model that does not resolve and
    every settings override the version's task does not accept."""
    problems, lines = [], []
    for deployment in config.deployments:
        try:
            lines.append(f"{deployment.name}: {deployment.model} -> {check_deployment(deployment, tracking_uri)}")
        except LanternError as error:
            problems.append(f"deployment {deployment.name}: {error}")
    if problems:
        raise ConfigError("; ".join(problems))
    return lines
