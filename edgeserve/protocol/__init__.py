"""Open Inference Protocol (KServe V2): codecs and endpoints."""
