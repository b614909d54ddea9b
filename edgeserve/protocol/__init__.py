"""Open Inference Protocol (KServe V2) codecs: JSON and binary tensors, gRPC messages,
limits, strict integers. Pure: no web framework, no transport, no registry."""
