"""The `lantern` command: one sub-command group per package, each imported only when it is run (torch and MLflow
take seconds to import; `lantern traffic set` needs neither)."""

from __future__ import annotations

import importlib
from typing import Any

import click

COMMANDS = {
    "register": "registry.cli:register",
    "models": "registry.cli:models",
    "data": "training.cli:data",
    "train": "training.cli:train_group",
    "demo": "lantern.demo:demo",
    "explain": "lantern.explain_cli:explain_command",
    "serve": "serving.cli:serve",
    "endpoint": "serving.cli:endpoint_group",
    "deploy": "serving.client.manage_cli:deploy_group",
    "traffic": "serving.client.manage_cli:traffic_group",
    "keys": "serving.client.manage_cli:keys_group",
    "rollout": "serving.client.manage_cli:rollout_command",
}
HELP = {
    "register": "Check a checkpoint (weights fit, ONNX parity) and register it as a model version.",
    "models": "List, inspect, alias and re-configure registered models.",
    "data": "Make datasets.",
    "train": "Train (or resume, or extend) a session; make a model version from a checkpoint.",
    "demo": "Make the shapes data, train the demo model, and register it.",
    "explain": "Explain a registered model's prediction on an image.",
    "serve": "Serve the endpoint described by ENDPOINT_YAML with BentoML.",
    "endpoint": "The endpoint's keys and state.",
    "deploy": "Add, update and remove deployments of the running endpoint.",
    "traffic": "Set the live traffic split and the mirrored share.",
    "keys": "Regenerate the endpoint's keys.",
    "rollout": "Roll a model version out as a new deployment, step by step, with automatic rollback.",
}


class LazyGroup(click.Group):
    """Sub-commands imported on use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if cmd_name == "endpoint":
            from serving.client.manage_cli import endpoint_show

            command.add_command(endpoint_show)
        return command

    def format_commands(self, ctx: click.Context, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lantern")
def main() -> None:
    """Lantern: deploy image models as managed endpoints and explain their predictions."""
