"""The gRPC server: sessions, cross-session batching, the engine that steps the model."""
