"""Graceful stop of fleet's Python services, with real gRPC: serve() in a real process, a
test-only servicer (a call that sleeps as long as it is asked) registered beside the health
service, and SIGTERM sent as a supervisor or systemd sends it; and behind a real Envoy running
the config fleet renders, under load."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml

from fleet import artifacts, commands, desired
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.conftest import load_inventory, project, write_inventory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Serves test.Slow/Sleep: the request is a number of seconds as text, the answer "done:<request>".
SLOW_SERVER = """
import sys, time, grpc
from friesian_services import server

def sleep(request, context):
    time.sleep(float(request.decode()))
    return b"done:" + request

handler = grpc.method_handlers_generic_handler("test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})
server.serve(server.load_config(sys.argv[1]), lambda s: s.add_generic_rpc_handlers((handler,)), ["test.Slow"])
"""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port(*also_on):
    """A port free on 127.0.0.1 and on every address in `also_on`."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for address in also_on:
                with socket.socket() as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue


class Instance:
    def __init__(self, tmp_path, tag, **config):
        config.setdefault("bindAddress", "127.0.0.1")
        path = tmp_path / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"{tag}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(path)], cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"{config['bindAddress']}:{config['servicePort']}")
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


class Load:
    """Clients calling through Envoy on long-lived channels until stopped; counts answers."""

    def __init__(self, address, channels=4):
        self.ok, self.failed, self.errors = 0, 0, []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(address,)) for _ in range(channels)]
        for thread in self.threads:
            thread.start()

    def run(self, address):
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary("/test.Slow/Sleep")
            while not self.done.is_set():
                try:
                    call(b"0.02", timeout=30)
                    with self.lock:
                        self.ok += 1
                except grpc.RpcError as e:
                    with self.lock:
                        self.failed += 1
                        self.errors.append(f"{e.code()}: {e.details()}")

    def stop(self):
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=60)


class Envoy:
    """A real Envoy running the static config fleet renders (real templates) for a service whose
    backends are loopback hosts (node1 127.0.0.2, node2 127.0.0.3)."""

    def __init__(self, tmp_path, port, backends):
        self.port = free_port()
        # The rendered bootstrap puts Envoy's admin on a Unix socket under the ingress host's root.
        self.admin = tmp_path / backends[0] / "envoy" / "inference" / "admin.sock"
        self.admin.parent.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{self.port}"
        hosts = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
        inventory = {
            "defaults": {"connection": "local", "vars": {"bindAddress": "{{ host.address }}"}},
            "hosts": {name: {"address": hosts[name], "root": str(tmp_path / name)} for name in backends},
            "services": {"inference": {"port": port, "backends": list(backends),
                                       "ingress": {"host": backends[0], "port": self.port,
                                                   "listen_address": "127.0.0.1"}}},
        }
        inv = load_inventory(write_inventory(tmp_path, inventory))
        states = desired.compile_services(inv, list(inv.services.values()), project())
        (text,) = [text for state in states.values() for _, text in state.envoy_validations]
        config, self.log = tmp_path / "envoy.yaml", tmp_path / "envoy.log"
        config.write_text(text)
        binary = artifacts.resolve("builtin:envoy", ".").path
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([binary, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_answering(self, timeout=30):
        """Until a round of calls through Envoy is answered (every backend healthy)."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as probe:
            while True:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    if all(probe.unary_unary("/test.Slow/Sleep")(b"0", timeout=2) == b"done:0" for _ in range(4)):
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "Envoy never answered"
                time.sleep(0.2)

    def retries(self):
        get = commands.envoy_admin_get(sys.executable, str(self.admin), "/stats?filter=inference_service."
                                       "upstream_rq_retry$", 10)
        name, value = subprocess.run(["sh", "-c", get], capture_output=True, text=True, check=True).stdout.split()
        assert name == "cluster.inference_service.upstream_rq_retry:"
        return int(value)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def envoy(tmp_path):
    started = []

    def start(port, backends):
        front = Envoy(tmp_path, port, backends)
        started.append(front)
        return front

    yield start
    for front in started:
        front.close()


@pytest.fixture
def load():
    started = []

    def start(address):
        clients = Load(address)
        started.append(clients)
        return clients

    yield start
    for clients in started:
        clients.stop()


def test_sigterm_behind_envoy_under_load_fails_no_call(instances, envoy, load):
    """The default drain covers Envoy's health checks: a backend stopped while 4 clients call
    through Envoy costs them nothing, and needs no retry."""
    port = free_port("127.0.0.2", "127.0.0.3")
    stopped = instances("node1", servicePort=port, bindAddress="127.0.0.2")
    staying = instances("node2", servicePort=port, bindAddress="127.0.0.3")
    stopped.wait_serving()
    staying.wait_serving()
    front = envoy(port, ["node1", "node2"])
    front.wait_answering()
    clients = load(front.address)
    time.sleep(1)
    stopped.proc.send_signal(signal.SIGTERM)
    assert stopped.proc.wait(timeout=60) == 0
    before = clients.ok
    time.sleep(1)
    clients.stop()
    assert clients.failed == 0, clients.errors[:5]
    # Not even rescued by Envoy's retries (reset, unavailable): no call reached the backend after
    # it stopped accepting. Without the drain, a few calls are retried and some fail.
    assert front.retries() == 0
    assert clients.ok > before  # the remaining backend kept answering after the other exited
    assert "draining" in stopped.output()
