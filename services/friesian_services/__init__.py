"""The reference gRPC services fleet deploys (Friesian's wire API): packed into one zipapp of this
package's own code; its dependencies (grpcio, grpcio-health-checking, protobuf, PyYAML, redis)
come from the Python that runs it on the host."""
