"""The inference service as a host runs it (`python -m friesian_services inference -c CONFIG`): a real
gRPC server in its own process, and a real client."""

import json
import socket
import subprocess
import sys

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from friesian_services import model
from friesian_services.inference import encode_instances
from friesian_services.proto import ranking_pb2, ranking_pb2_grpc

SERVICE = [sys.executable, "-m", "friesian_services"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    config = tmp_path_factory.mktemp("inference") / "config.yaml"
    config.write_text(f"servicePort: {port}\nbindAddress: 127.0.0.1\nmodelParallelism: 2\n")
    proc = subprocess.Popen([*SERVICE, "inference", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=15)
        yield channel, port
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_scores_match_the_model(server):
    channel, _ = server
    rows = [[0.1 * i for i in range(8)], [1.0] * 8, [-0.5] * 8]
    reply = ranking_pb2_grpc.RankingStub(channel).doPredict(ranking_pb2.Content(encodedStr=encode_instances(rows)))
    expected = [model.RankingModel(model.generate()).score(r) for r in rows]
    assert json.loads(reply.predictStr) == pytest.approx(expected, abs=1e-12)
    assert len(set(expected)) == 3  # the model discriminates between inputs


def test_bad_input_is_invalid_argument(server):
    channel, _ = server
    stub = ranking_pb2_grpc.RankingStub(channel)
    for encoded in ("not base64!", encode_instances([[1.0, 2.0]])):
        with pytest.raises(grpc.RpcError) as info:
            stub.doPredict(ranking_pb2.Content(encodedStr=encoded))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_and_reset(server):
    channel, _ = server
    stub = ranking_pb2_grpc.RankingStub(channel)
    stub.resetMetrics(empty_pb2.Empty())
    for _ in range(3):
        stub.doPredict(ranking_pb2.Content(encodedStr=encode_instances([[0.0] * 8])))
    metrics = json.loads(stub.getMetrics(empty_pb2.Empty()).str)
    assert [(m["name"], m["count"]) for m in metrics] == [("doPredict", 3)]
    stub.resetMetrics(empty_pb2.Empty())
    assert json.loads(stub.getMetrics(empty_pb2.Empty()).str) == []


def test_health(server):
    channel, _ = server
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "ranking.Ranking"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope.Nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_taken_port_fails_to_start(server, tmp_path):
    _, port = server
    config = tmp_path / "config.yaml"
    config.write_text(f"servicePort: {port}\nbindAddress: 127.0.0.1\n")
    proc = subprocess.run([*SERVICE, "inference", "-c", str(config)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
