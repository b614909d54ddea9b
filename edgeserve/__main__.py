"""`python -m edgeserve` runs the CLI."""

from edgeserve.cli import main

main()
