"""Checks of an endpoint configuration against the registry, run before the server starts."""

from __future__ import annotations

from registry.errors import LanternError
from registry.resolve import download_version
from registry.settings import with_overrides
from registry.store import open_client
from serving.config import ConfigError, EndpointConfig


def check_against_registry(config: EndpointConfig, tracking_uri: str | None = None) -> list[str]:
    """One line per deployment: its resolved version; a ConfigError names every model that does not resolve and
    every settings override the version's task does not accept."""
    client = open_client(tracking_uri)
    problems, lines = [], []
    for deployment in config.deployments:
        try:
            downloaded = download_version(client, deployment.model)
            files = downloaded.files
            spec = files.read_spec()
            with_overrides(files.read_settings(spec.task), spec.task, deployment.settings)
            lines.append(f"{deployment.name}: {deployment.model} -> models:/{downloaded.version.name}/"
                         f"{downloaded.version.version} ({spec.arch}, {spec.task})")
        except LanternError as error:
            problems.append(f"deployment {deployment.name}: {error}")
    if problems:
        raise ConfigError("; ".join(problems))
    return lines
