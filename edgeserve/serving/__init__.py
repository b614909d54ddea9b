"""The data plane: one way through for every inference, whatever the transport
(`pipeline.DataPlane`), the declared-shape checks it makes before decoding
(`checks.py`) and what a classifier predicted (`prediction.py`)."""
