"""pagewire services: thin gRPC/HTTP layers over pagewire (shared/)."""
