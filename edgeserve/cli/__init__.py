"""The `edgeserve` command: the click group (`group`), the options every command shares
(`options`) and `bench`. Command modules (`<package>/cli.py`) import `options`, never the
group, so each imports alone."""
