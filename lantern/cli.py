"""The `lantern` command: one sub-command group per package."""

from __future__ import annotations

import click

from lantern.demo import demo
from lantern.explain_cli import explain_command
from registry.cli import models, register
from serving.cli import endpoint_group, serve
from serving.manage_cli import deploy_group, endpoint_show, keys_group, rollout_command, traffic_group
from training.cli import data, train_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lantern")
def main() -> None:
    """Lantern: deploy image models as managed endpoints and explain their predictions."""


main.add_command(register)
main.add_command(models)
main.add_command(data)
main.add_command(train_group, name="train")
main.add_command(demo)
main.add_command(explain_command)
main.add_command(serve)
main.add_command(endpoint_group)
endpoint_group.add_command(endpoint_show)
main.add_command(deploy_group)
main.add_command(traffic_group)
main.add_command(keys_group)
main.add_command(rollout_command)
