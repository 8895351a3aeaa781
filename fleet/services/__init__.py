"""The gRPC services fleet deploys; packed into one zipapp artifact that runs on target hosts.

Everything under this package must import with only the standard library, grpcio, protobuf
and the vendored PyYAML: it runs on hosts where fleet itself is not installed.
"""
