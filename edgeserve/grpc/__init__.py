"""The gRPC transport: `inference.GRPCInferenceService` and its bidirectional stream."""
