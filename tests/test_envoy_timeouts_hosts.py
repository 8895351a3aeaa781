"""A hung backend does not hold calls (issue 8, finding 4, Envoy part): with one of two backends
stopped (SIGSTOP: it accepts connections but never answers), every call through Envoy is answered
by the other backend once the per-try timeout (role variable per_try_timeout) gives up on it."""

import os
import signal

import grpc
import pytest

from friesian_services.inference import encode_instances
from friesian_services.proto import ranking_pb2, ranking_pb2_grpc
from tests.conftest import run_fleet, write_inventory

LAB_HOSTS = 3


@pytest.fixture(scope="module")
def deployed(lab, tmp_path_factory):
    """inference on backends h1 and h2, its Envoy on h0."""
    inventory = {"hosts": lab.inventory_hosts(), "services": {"inference": {
        "port": 7073, "backends": ["h1", "h2"], "ingress": {"host": "h0", "port": 8083}}}}
    path = write_inventory(tmp_path_factory.mktemp("inv"), inventory)
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 backends healthy in Envoy" in result.stdout
    return path


def envoy_stat(lab, name):
    out = lab.envoy_admin("h0", f"/stats?filter=^{name}$")
    return int(out.split(":")[1]) if ":" in out else 0


def test_calls_pass_a_stopped_backend(lab, deployed):
    stat = "cluster.inference_service.upstream_rq_per_try_timeout"
    before = envoy_stat(lab, stat)
    pid = int(open(os.path.join(lab.host("h1").srv, "fleet", "run", "inference.pid")).read())
    os.kill(pid, signal.SIGSTOP)
    try:
        with grpc.insecure_channel(f"{lab.host('h0').address}:8083") as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)
            for _ in range(20):
                stub.doPredict(ranking_pb2.Content(encodedStr=encode_instances([[0.5] * 8])), timeout=10)
        assert envoy_stat(lab, stat) > before  # the stopped backend was tried, and given up on
    finally:
        os.kill(pid, signal.SIGCONT)
