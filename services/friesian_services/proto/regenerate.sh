#!/bin/sh
# Regenerates the *_pb2 modules from the .proto files; run from anywhere after editing a .proto.
# Needs grpcio-tools (pip install -e 'services[dev]').
cd "$(dirname "$0")/../.." && python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. friesian_services/proto/*.proto
