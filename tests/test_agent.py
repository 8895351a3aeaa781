"""fleet's host agent: after a run's first SSH command starts it, later runs reach the host
without any SSH command (no login shell); a wrong token runs nothing; a vanished agent costs
nothing but speed."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fleet import agent
from tests.conftest import inference_inventory, run_fleet, write_inventory


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    return write_inventory(tmp_path_factory.mktemp("agent"), inference_inventory(lab))


def ssh_commands(lab, host):
    return lab.sshd_log(host).count("Starting session: command")


def agent_pid(lab, host):
    with open(os.path.join(lab.host(host).srv, "fleet", ".agent", "pid")) as f:
        return int(f.read())


def test_later_runs_need_no_ssh_command(lab, inventory, tmp_path):
    assert run_fleet("deploy", "inference", "-i", inventory).returncode == 0
    first = {h.name: ssh_commands(lab, h.name) for h in lab.hosts}
    assert first == {"h0": 1, "h1": 1}  # the whole first run: one command per host
    for command in (("deploy", "inference"), ("status", "inference"), ("deploy", "inference")):
        assert run_fleet(*command, "-i", inventory).returncode == 0
    assert {h.name: ssh_commands(lab, h.name) for h in lab.hosts} == first


def test_a_wrong_token_runs_nothing(lab, inventory):
    port = int(open(os.path.join(lab.host("h1").srv, "fleet", ".agent", "port")).read())
    marker = os.path.join(lab.host("h1").srv, "pwned")
    script = b"touch /srv/pwned"
    probe = (f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
             f"s.sendall(b'fleet-agent-1 {'0' * 64} {len(script)}\\n' + {script!r})\n"
             "try: print(s.recv(100))\nexcept ConnectionResetError: print('reset')")
    assert lab.exec("h1", sys.executable, "-c", probe).strip() in ("b''", "reset")  # hung up, said nothing
    time.sleep(0.3)
    assert not os.path.exists(marker)


def test_a_vanished_agent_costs_one_ssh_command(lab, inventory):
    before = ssh_commands(lab, "h1")
    os.kill(agent_pid(lab, "h1"), signal.SIGKILL)
    assert run_fleet("deploy", "inference", "-i", inventory).returncode == 0
    assert ssh_commands(lab, "h1") == before + 1  # fell back to SSH, and started a new agent
    assert run_fleet("deploy", "inference", "-i", inventory).returncode == 0
    assert ssh_commands(lab, "h1") == before + 1


def test_hosts_can_opt_out(lab, inventory, tmp_path):
    text = open(inventory).read().replace("  h1:\n", "  h1:\n    agent: false\n")
    path = tmp_path / "no-agent.yaml"
    path.write_text(text)
    before = ssh_commands(lab, "h1")
    for _ in range(2):
        assert run_fleet("deploy", "inference", "-i", str(path)).returncode == 0
    assert ssh_commands(lab, "h1") == before + 2


def test_agent_exits_when_idle(tmp_path):
    os.makedirs(tmp_path / ".agent")
    proc = subprocess.Popen([sys.executable, agent.__file__, str(tmp_path), "0.5"], stdin=subprocess.PIPE)
    proc.stdin.write(b"a" * 64 + b"\n")
    proc.stdin.close()
    deadline = time.monotonic() + 5
    while not (tmp_path / ".agent" / "port").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    port = int((tmp_path / ".agent" / "port").read_text())
    socket.create_connection(("127.0.0.1", port)).close()
    assert proc.wait(timeout=5) == 0
    assert not (tmp_path / ".agent" / "port").exists()
