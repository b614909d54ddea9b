"""`python -m edgeserve` runs the CLI."""

from edgeserve.cli.group import main

main()
