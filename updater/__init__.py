"""The update trust anchor: bundles, signatures, encryption, the dual-slot store.

Never imports edgeserve: the server depends on this package, not the other way.
"""
