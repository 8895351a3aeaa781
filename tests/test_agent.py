"""fleet has no host agent any more (issue 8; docs/design.md "No host agent"): after a run, the
only listeners on a host are sshd and the processes fleet deployed, and an inventory that still
sets `agent:` is refused before any host is contacted."""

import glob
import os
import re

from tests.conftest import inference_inventory, run_fleet, write_inventory


def listeners(lab, host):
    """{port: pid} of every TCP listener in the host's network namespace."""
    found = {}
    for line in lab.exec(host, "netstat", "-tnlp").splitlines():
        match = re.match(r"tcp6?\s+\d+\s+\d+\s+\S+:(\d+)\s+\S+\s+LISTEN\s+(\d+)/", line)
        if match:
            found[int(match[1])] = int(match[2])
    return found


def test_no_listener_of_fleet_is_left_on_a_host(lab, tmp_path):
    path = write_inventory(tmp_path, inference_inventory(lab))
    for command in ("deploy", "deploy", "status"):
        result = run_fleet(command, "inference", "-i", path)
        assert result.returncode == 0, result.stdout + result.stderr
    for host in lab.hosts:
        deployed = {int(open(p).read()) for p in glob.glob(os.path.join(host.srv, "fleet", "run", "*.pid"))}
        strangers = {port: pid for port, pid in listeners(lab, host.name).items()
                     if port != 22 and pid not in deployed}
        assert strangers == {}, f"{host.name}: listeners not deployed by the inventory: {strangers}"
    stop = run_fleet("stop", "inference", "-i", path)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def test_the_agent_key_is_refused(lab, tmp_path):
    data = inference_inventory(lab)
    data["hosts"]["h1"]["agent"] = False
    path = write_inventory(tmp_path, data)
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 2
    line = next(n for n, l in enumerate(open(path).read().splitlines(), 1) if l.strip().startswith("agent:"))
    assert f"{path}:{line}: hosts.h1.agent: unknown key" in result.stderr
