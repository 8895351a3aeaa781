"""How an inventory host is reached over SSH: ssh config, precedence, jumps (pure: no host is contacted)."""

import os
import subprocess
import sys

import pytest

from fleet.errors import UsageError
from tests.conftest import load_inventory

SERVICES = """
services:
  inference:
    port: 7073
    backends: [a]
    ingress: {host: a, port: 8083}
"""


def write(tmp_path, hosts, config=None, top=""):
    if config is not None:
        (tmp_path / "ssh_config").write_text(config)
    path = tmp_path / "inv.yaml"
    path.write_text(top + hosts + SERVICES)
    return str(path)


CONFIG = """
Host lab-*
  User alice
  IdentityFile ~/keys/lab
  IdentitiesOnly yes
  UserKnownHostsFile /etc/fleet/known_hosts
Host lab-a
  HostName 10.0.0.5
  Port 2222
  ProxyJump lab-bastion
Host lab-bastion
  HostName 192.0.2.1
  StrictHostKeyChecking accept-new
"""


def test_ssh_host_alias_takes_hostname_user_port_key_known_hosts_and_proxyjump(tmp_path):
    inv = load_inventory(write(tmp_path, "hosts:\n  a: {address: 10.0.0.5, ssh_host: lab-a}\n", CONFIG,
                               "ssh_config: ssh_config\n"))
    host = inv.hosts["a"]
    t = host.target
    assert (t.hostname, t.port, t.user, t.known_hosts) == ("10.0.0.5", 2222, "alice", "/etc/fleet/known_hosts")
    assert t.identity_files[0].endswith("/keys/lab") and not t.look_for_keys and not t.accept_new_host_keys
    assert (host.user, host.port) == ("alice", 2222)
    (bastion,) = host.jumps
    assert (bastion.hostname, bastion.port, bastion.user, bastion.accept_new_host_keys) == ("192.0.2.1", 22, "alice", True)
    assert host.address == "10.0.0.5"  # where Envoy reaches it: not the alias


def test_match_exec_in_the_ssh_config_runs_its_command(tmp_path, monkeypatch):
    """paramiko runs `Match exec` through invoke, which fleet imports only when it is used."""
    marker = tmp_path / "ran"
    config = (f"Match exec \"touch {marker}\"\n  User fromexec\n"
              "Match exec \"false\"\n  Port 2222\n")
    path = write(tmp_path, "hosts:\n  a: {address: 10.0.0.5}\n", config, "ssh_config: ssh_config\n")
    with open(os.devnull) as null:
        monkeypatch.setattr("sys.stdin", null)  # invoke forwards stdin; pytest's may not be read
        host = load_inventory(path).hosts["a"]
    assert marker.exists()
    assert (host.target.user, host.target.port) == ("fromexec", 22)


def test_invoke_is_not_imported_until_a_match_exec_needs_it():
    code = "import sys, fleet.cli; print(type(sys.modules['invoke']).__name__, 'unittest.mock' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["_ImportedOnUse", "False"]


def test_inventory_values_win_over_the_ssh_config(tmp_path):
    hosts = "defaults:\n  user: bob\nhosts:\n  a: {address: 10.0.0.5, ssh_host: lab-a, port: 22, key: k, jump: none}\n"
    host = load_inventory(write(tmp_path, hosts, CONFIG, "ssh_config: ssh_config\n")).hosts["a"]
    assert (host.target.user, host.target.port, host.jumps) == ("bob", 22, ())
    assert host.target.identity_files == (str(tmp_path / "k"),) and not host.target.look_for_keys


def test_jump_names_an_inventory_host_and_chains_follow_it(tmp_path):
    hosts = """hosts:
  outer: {address: 192.0.2.1, user: ops, jump: none}
  bastion: {address: 10.1.0.1, jump: outer}
  a: {address: 10.0.0.5, jump: "bastion,root@10.2.0.1:2200"}
"""
    inv = load_inventory(write(tmp_path, hosts))
    chain = inv.hosts["a"].jumps
    assert [(h.hostname, h.port, h.user) for h in chain] == [("192.0.2.1", 22, "ops"), ("10.1.0.1", 22, "root"),
                                                              ("10.2.0.1", 2200, "root")]
    assert inv.hosts["bastion"].jumps == chain[:1]


@pytest.mark.parametrize("hosts, config, where, message", [
    ("hosts:\n  a: {address: 10.0.0.5, jump: b}\n  b: {address: 10.0.0.6, jump: a}\n", None,
     "hosts.b.jump", "loops back to a"),
    ("hosts:\n  a: {address: 10.0.0.5, jump: 'u@@x'}\n", None, "hosts.a.jump", "is not [user@]host[:port]"),
    ("hosts:\n  a: {address: 10.0.0.5, ssh_host: x, ssh_config: missing}\n", None, "hosts.a.ssh_config",
     "cannot read ssh config"),
    ("ssh_config: missing\nhosts:\n  a: {address: 10.0.0.5}\n", None, "ssh_config", "cannot read ssh config"),
    ("defaults: {ssh_config: missing}\nhosts:\n  a: {address: 10.0.0.5}\n", None, "defaults.ssh_config",
     "cannot read ssh config"),
    ("hosts:\n  a: {address: 10.0.0.5, ssh_host: x, ssh_config: ssh_config}\n", "Host x\n  Port many\n",
     "hosts.a.ssh_host", "Port 'many' is not a number"),
    ("hosts:\n  a: {address: 10.0.0.5, ssh_host: x, ssh_config: ssh_config}\n", "Host x\n  ProxyJump x\n",
     "hosts.a.ssh_host", "loops back to x"),
    ("hosts:\n  a: {address: 10.0.0.5, become: yes please}\n", None, "hosts.a.become", "must be true or false"),
    ("hosts:\n  a: {address: 10.0.0.5, become: true, become_user: 'r; id'}\n", None, "hosts.a.become_user",
     "is not a user name"),
    ("hosts:\n  a: {address: 10.0.0.5, ssh_host: 'x y'}\n", None, "hosts.a.ssh_host", "is not a host name"),
])
def test_bad_ssh_settings_name_file_line_and_key(tmp_path, hosts, config, where, message):
    with pytest.raises(UsageError) as info:
        load_inventory(write(tmp_path, hosts, config))
    text = info.value.one_line()
    assert f": {where}: " in text and message in text and "inv.yaml:" in text, text
