"""edgeserve.toml: one loader (`loader`) over the sections each package defines, and the
schema helpers they share (`schema`)."""
