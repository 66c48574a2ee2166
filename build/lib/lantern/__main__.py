"""`python -m lantern ...`: the `lantern` command where its console script is not installed (a `--target` install)."""

from lantern.cli import main

main(prog_name="lantern")
