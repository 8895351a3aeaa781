"""The embedded default inventory (local connection, loopback "hosts") deploys and answers.

Run on its own ports and state directory so it never meets an operator's own local deploy."""

import os
import signal

import grpc
import pytest
import yaml

from fleet.services.inference import encode_instances
from fleet.services.proto import ranking_pb2, ranking_pb2_grpc
from tests.conftest import REPO, run_fleet


@pytest.fixture
def local_inventory(tmp_path):
    with open(os.path.join(REPO, "inventory", "local.yaml")) as f:
        data = yaml.safe_load(f)
    for name, host in data["hosts"].items():
        host["root"] = str(tmp_path / name)
    service = data["services"]["inference"]
    service["port"] = 17073
    service["ingress"].update(port=18083, admin_port=19090)
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(data))
    yield str(path)
    run_fleet("stop", "inference", "-i", str(path))
    for name in data["hosts"]:  # whatever stop could not reach, by the pids fleet recorded
        run = tmp_path / name / "run"
        for pidfile in run.glob("*.pid") if run.is_dir() else []:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_local_default_deploys_and_answers_through_envoy(local_inventory):
    result = run_fleet("deploy", "inference", "-i", local_inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 backends healthy in Envoy" in result.stdout
    with grpc.insecure_channel("127.0.0.1:18083") as channel:
        reply = ranking_pb2_grpc.RankingStub(channel).doPredict(
            ranking_pb2.Content(encodedStr=encode_instances([[0.5] * 8])), timeout=10)
    assert reply.predictStr.startswith("[0.")
    again = run_fleet("deploy", "inference", "-i", local_inventory)
    assert again.returncode == 0 and "no changes" in again.stdout
