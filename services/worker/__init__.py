"""The worker service: the engine behind gRPC, in role prefill, decode or both."""
