"""Model updates in the server: the slot store, hot swap, health watch, HTTP and CLI.

The `updater` package is the trust anchor (bundles, keys, slots); this package wires
it to the registry and the web layer.
"""
