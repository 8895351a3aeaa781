"""Graceful stop of fleet's Python services, with real gRPC: serve() in a real process, a
test-only servicer (a call that sleeps as long as it is asked) registered beside the health
service, and SIGTERM sent as a supervisor or systemd sends it."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import yaml

from fleet.services.proto import health_pb2, health_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Serves test.Slow/Sleep: the request is a number of seconds as text, the answer "done:<request>".
SLOW_SERVER = """
import sys, time, grpc
from fleet.services import server

def sleep(request, context):
    time.sleep(float(request.decode()))
    return b"done:" + request

handler = grpc.method_handlers_generic_handler("test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})
server.serve(server.load_config(sys.argv[1]), lambda s: s.add_generic_rpc_handlers((handler,)), ["test.Slow"])
"""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    def __init__(self, tmp_path, tag, **config):
        path = tmp_path / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(dict(config, bindAddress="127.0.0.1")))
        self.log = tmp_path / f"{tag}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(path)], cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{config['servicePort']}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.sleep = self.channel.unary_unary("/test.Slow/Sleep")

    def status(self):
        return self.health.Check(health_pb2.HealthCheckRequest(service="test.Slow"), timeout=2).status

    def wait_serving(self, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            # Its own line first: with reusePort, another instance may answer on the same port.
            if self.output().startswith("serving "):
                try:
                    if self.status() == SERVING:
                        return
                except grpc.RpcError:
                    pass
            assert time.monotonic() < deadline, f"not serving after {timeout}s: {self.output()}"
            time.sleep(0.1)

    def output(self):
        return self.log.read_text()

    def close(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def instances(tmp_path):
    started = []

    def start(tag, **config):
        instance = Instance(tmp_path, tag, **config)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.close()


def test_sigterm_drains_then_finishes_calls_in_flight(instances):
    server = instances("a", servicePort=free_port(), drainSeconds=3, graceSeconds=20)
    server.wait_serving()
    in_flight = [server.sleep.future(b"4", timeout=60) for _ in range(4)]
    time.sleep(0.5)  # let the calls reach the server before the signal
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while server.status() != NOT_SERVING:
        assert time.monotonic() < deadline, "health never went NOT_SERVING after SIGTERM"
        time.sleep(0.05)
    # Envoy has not noticed yet: a call arriving while draining is still served.
    assert server.sleep(b"0", timeout=10) == b"done:0"
    assert [call.result() for call in in_flight] == [b"done:4"] * 4
    assert server.proc.wait(timeout=30) == 0
    lines = server.output().splitlines()
    assert lines[1:] == ["draining: health NOT_SERVING, still serving for 3s",
                         "stopping: finishing calls in flight for up to 20s", "stopped"]


def test_a_second_signal_cuts_the_drain_short(instances):
    server = instances("a", servicePort=free_port(), drainSeconds=600)
    server.wait_serving()
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while "draining" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert server.output().splitlines()[-1] == "stopped"


def test_with_reuse_port_a_second_instance_binds_the_same_port(instances):
    port = free_port()
    old = instances("old", servicePort=port, reusePort=True, drainSeconds=0)
    old.wait_serving()
    new = instances("new", servicePort=port, reusePort=True, drainSeconds=0)
    new.wait_serving()
    assert old.proc.poll() is None
    # The old one goes; calls on the port keep being answered, by the new one.
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(timeout=30) == 0
    fresh = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        assert fresh.unary_unary("/test.Slow/Sleep")(b"0", timeout=10) == b"done:0"
    finally:
        fresh.close()


def test_without_reuse_port_a_taken_port_fails_the_second_instance(instances):
    port = free_port()
    first = instances("first", servicePort=port)
    first.wait_serving()
    second = instances("second", servicePort=port)
    assert second.proc.wait(timeout=30) != 0
    assert f"cannot listen on 127.0.0.1:{port}" in second.output()


@pytest.mark.parametrize("config, message", [
    ({"drainSeconds": "soon"}, "config key drainSeconds: expected seconds between 0 and 3600, got 'soon'"),
    ({"graceSeconds": -1}, "config key graceSeconds: expected seconds between 0 and 3600, got -1"),
    ({"reusePort": "yes"}, "config key reusePort: expected true or false, got 'yes'"),
])
def test_bad_drain_settings_are_refused_before_binding(instances, config, message):
    server = instances("bad", servicePort=free_port(), **config)
    assert server.proc.wait(timeout=30) != 0
    assert server.output().strip().splitlines()[-1] == message
