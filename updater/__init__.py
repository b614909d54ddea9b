"""The update trust anchor: bundles, signatures, encryption, the dual-slot store. Never imports edgeserve."""
