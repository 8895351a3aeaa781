"""Hosts as operators have them: a bastion, and private hosts on a network this machine cannot
reach (a bridge with no address here, a blackhole route for its subnet); every login is a
/bin/sh user who becomes root with sudo; an ssh config names them all (aliases, User,
IdentityFile, UserKnownHostsFile, ProxyJump). The hosts' Python is Debian's /usr/bin/python3,
without grpcio: fleet builds their venv (venv: true) from wheels it fetches for their platform."""

import os
import re
import socket
import subprocess
import sys

import grpc
import pytest

from fleet import connection
from friesian_services.inference import encode_instances
from friesian_services.proto import ranking_pb2, ranking_pb2_grpc
from tests.conftest import REPO, load_inventory, run_fleet, write_inventory
from tests.hostlab import BastionLab


@pytest.fixture(scope="module")
def lab():
    with BastionLab(private=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    data = {"ssh_config": lab.ssh_config, "hosts": lab.inventory_hosts(), "services": {"inference": {
        "port": 7073, "backends": ["p0", "p1"], "ingress": {"host": "h0", "port": 8083}}}}
    return write_inventory(tmp_path_factory.mktemp("inv"), data)


def owners(lab, host, port):
    """User names owning the processes that listen on port, seen inside the host's namespace."""
    out = lab.exec(host, "ss", "-Htlnp", f"sport = :{port}")
    pids = set(re.findall(r"pid=(\d+)", out))
    return {lab.exec(host, "ps", "-o", "user=", "-p", pid).strip() for pid in pids}


def test_private_hosts_are_unreachable_from_here(lab):
    with pytest.raises(OSError):
        socket.create_connection((lab.host("p0").address, 22), timeout=2).close()


def test_deploy_through_the_bastion_as_a_sudo_login(lab, inventory):
    assert subprocess.run(["/usr/bin/python3", "-c", "import grpc"], capture_output=True).returncode != 0
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 backends healthy in Envoy" in result.stdout
    for host in ("p0", "p1"):
        assert owners(lab, host, 7073) == {"root"}
        srv = lab.host(host).srv
        # The backend runs with the venv fleet built from /usr/bin/python3 and pushed wheels.
        with open(os.path.join(srv, "fleet", "run", "inference.cmd")) as f:
            assert f.read().startswith("/srv/fleet/venv/bin/python ")
        wheels = os.listdir(os.path.join(srv, "fleet", "wheels"))
        assert any(re.fullmatch(r"[0-9a-f]{16}-grpcio-.*manylinux.*\.whl", w) for w in wheels), wheels
    assert owners(lab, "h0", 8083) == {"root"}


def test_20_calls_through_envoy_on_the_bastion_answer(lab, inventory):
    with grpc.insecure_channel(f"{lab.host('h0').address}:8083") as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        for _ in range(20):
            reply = stub.doPredict(ranking_pb2.Content(encodedStr=encode_instances([[0.2] * 8])), timeout=10)
            assert reply.predictStr


def test_second_deploy_changes_nothing(lab, inventory):
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no changes" in result.stdout


def test_hosts_behind_one_bastion_share_one_connection_to_it(lab, inventory):
    inv = load_inventory(inventory)
    before = _sshd_sessions(lab)
    conns = [connection.connect(inv.hosts[name]) for name in ("p0", "p1")]
    try:
        for conn in conns:
            channel = conn.client.get_transport().open_session()
            channel.exec_command("true")
            assert channel.recv_exit_status() == 0
        # One new connection on the bastion for both private hosts.
        assert _sshd_sessions(lab) - before == 1
    finally:
        for conn in conns:
            conn.close()


def _sshd_sessions(lab):
    """Established TCP connections to the bastion's sshd, seen inside its namespace."""
    out = lab.exec("h0", "ss", "-Htn", "state", "established", "sport", "= :22")
    return len([l for l in out.splitlines() if l.strip()])


def test_a_root_the_login_cannot_write_names_the_key_to_change(lab, tmp_path):
    hosts = lab.inventory_hosts(root="/opt/fleet-not-writable")
    hosts["p0"]["become"] = False
    data = {"ssh_config": lab.ssh_config, "hosts": {"p0": hosts["p0"]}, "services": {"inference": {
        "port": 7073, "backends": ["p0"], "ingress": {"host": "p0", "port": 8083}}}}
    result = run_fleet("deploy", "inference", "-i", write_inventory(tmp_path, data))
    assert result.returncode == 1
    assert (f"root /opt/fleet-not-writable is not writable by {lab.user}: set root: to a directory {lab.user} "
            "can write, or become: true") in result.stdout
    assert not os.path.exists("/opt/fleet-not-writable")


def test_sudo_that_wants_a_password_is_one_line_naming_the_way_out(lab, tmp_path):
    with open(lab.sudoers, "w") as f:
        f.write(f"{lab.user} ALL=(ALL) ALL\n")
    try:
        data = {"ssh_config": lab.ssh_config, "hosts": {"p1": dict(lab.inventory_hosts()["p1"])},
                "services": {
            "inference": {"port": 7073, "backends": ["p1"], "ingress": {"host": "p1", "port": 8083}}}}
        result = run_fleet("status", "inference", "-i", write_inventory(tmp_path, data))
    finally:
        with open(lab.sudoers, "w") as f:
            f.write(f"{lab.user} ALL=(ALL) NOPASSWD: ALL\n")
    assert result.returncode == 1
    assert (f"sudo on p1 wants a password: set up NOPASSWD for {lab.user} or pass --ask-become-pass"
            in result.stdout + result.stderr)


def one_host_inventory(lab, tmp_path, name, **keys):
    """inference on host `name` alone (its Envoy too)."""
    data = {"ssh_config": lab.ssh_config, "hosts": {name: dict(lab.inventory_hosts()[name], **keys)},
            "services": {"inference": {"port": 7073, "backends": [name],
                                       "ingress": {"host": name, "port": 8083}}}}
    return write_inventory(tmp_path, data)


def fleet_with_input(text, *args):
    """fleet without a terminal (its own session), `text` on its stdin: where getpass reads then."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], input=text, capture_output=True, text=True,
                          timeout=120, cwd=REPO, start_new_session=True)


def test_ask_become_pass_feeds_sudo_and_never_shows_the_password(lab, tmp_path):
    password = "pw-" + "x7Q" * 4
    subprocess.run(["chpasswd"], input=f"{lab.user}:{password}\n", text=True, check=True)
    with open(lab.sudoers, "w") as f:
        f.write(f"{lab.user} ALL=(ALL) ALL\n")
    path = one_host_inventory(lab, tmp_path, "p1")
    try:
        good = fleet_with_input(password + "\n", "status", "inference", "--ask-become-pass", "-i", path)
        wrong = fleet_with_input("not-it\n", "status", "inference", "--ask-become-pass", "-i", path)
    finally:
        with open(lab.sudoers, "w") as f:
            f.write(f"{lab.user} ALL=(ALL) NOPASSWD: ALL\n")
        subprocess.run(["usermod", "-p", "*", lab.user], check=True)
    # The session ran as root through sudo: it sees the backend the first deploy started.
    assert re.search(r"│ p1 +│ inference +│ running", good.stdout), good.stdout + good.stderr
    assert "sudo on p1 refused the become password" in wrong.stdout, wrong.stdout + wrong.stderr
    for result in (good, wrong):
        assert password not in result.stdout + result.stderr
    assert password not in lab.sshd_log("p1") + lab.sshd_log("h0")


def test_preflight_names_what_a_host_lacks_before_anything_changes(lab, tmp_path):
    path = one_host_inventory(lab, tmp_path, "p0", python="/nonexistent/python3", root="/srv/fleet-preflight")
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 1
    assert "root on p0 lacks /nonexistent/python3 (preflight; nothing was changed)" in result.stdout
    assert not os.path.exists(os.path.join(lab.host("p0").srv, "fleet-preflight"))


def test_a_jump_chain_goes_through_every_hop(lab, tmp_path):
    """p1 through h0 and then p0: p1's sshd sees the connection come from p0."""
    hosts = {"p1": dict(lab.inventory_hosts()["p1"], jump="lab-h0,lab-p0")}
    data = {"ssh_config": lab.ssh_config, "hosts": hosts, "services": {"inference": {
        "port": 7073, "backends": ["p1"], "ingress": {"host": "p1", "port": 8083}}}}
    host = load_inventory(write_inventory(tmp_path, data)).hosts["p1"]
    assert [hop.hostname for hop in host.jumps] == [lab.host("h0").address, lab.host("p0").address]
    conn = connection.connect(host)
    try:
        transport = conn.client.get_transport()
        channel = transport.open_session()
        channel.exec_command("true")
        assert channel.recv_exit_status() == 0
        peers = lab.exec("p1", "ss", "-Htn", "state", "established", "sport", "= :22")
        assert f"{lab.host('p0').address}:" in peers
        # Every hop, and the connection inside them, encrypts with AES-GCM (connection.PREFERRED_CIPHERS).
        assert (transport.local_cipher, transport.remote_cipher) == ("aes128-gcm@openssh.com",) * 2
        chains = [connection._JUMPS._chains[host.jumps[:i]] for i in (1, 2)]
        assert [c.client.get_transport().local_cipher for c in chains] == ["aes128-gcm@openssh.com"] * 2
    finally:
        conn.close()
