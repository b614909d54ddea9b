"""edgeserve: a model-serving appliance for small CPU boxes."""

__version__ = "0.1.0"
