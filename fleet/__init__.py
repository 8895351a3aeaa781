"""fleet: deploys a gRPC serving stack over SSH and fronts every service with Envoy."""

__version__ = "0.1.0"
