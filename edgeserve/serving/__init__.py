"""The data plane: one way through for every inference, whatever the transport
(`pipeline.DataPlane`), and the declared-shape checks it makes before decoding."""
