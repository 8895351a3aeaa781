"""Inventory validation: every bad input is one line naming file, line and key."""

import os

import pytest

from fleet.errors import UsageError
from tests.conftest import REPO, load_inventory

GOOD = """\
hosts:
  a:
    address: 10.0.0.1
  b:
    address: 10.0.0.2
    port: 2222
services:
  inference:
    port: 7073
    backends: [a, b]
    ingress:
      host: a
      port: 8083
"""


def write(tmp_path, text):
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    return str(path)


def error_for(tmp_path, text):
    with pytest.raises(UsageError) as info:
        load_inventory(write(tmp_path, text))
    return info.value


def test_good_inventory_loads_with_defaults(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD))
    a, b = inv.hosts["a"], inv.hosts["b"]
    assert (a.user, a.port, a.root, a.connection, a.python) == ("root", 22, "/opt/fleet", "ssh", "python3")
    assert b.port == 2222
    service = inv.service("inference")
    assert [(x.host, x.port) for x in service.backends] == [("a", 7073), ("b", 7073)]
    assert (service.ingress.port, service.ingress.listen_address) == (8083, "0.0.0.0")
    assert service.hosts() == ["a", "b"]


def test_shipped_inventories_load():
    for name in ("seed.yaml", "local.yaml"):
        inv = load_inventory(os.path.join(REPO, "inventory", name))
        assert "inference" in inv.services


@pytest.mark.parametrize("bad, line, key, words", [
    (GOOD.replace("port: 7073", "port: 70000"), 9, "services.inference.port", "not a port number"),
    (GOOD.replace("    port: 2222", "    prot: 2222"), 6, "hosts.b.prot", "unknown key"),
    (GOOD.replace("backends: [a, b]", "backends: [a, c]"), 10, "services.inference.backends.1", "'c' is not defined"),
    (GOOD.replace("      port: 8083\n", ""), 11, "services.inference.ingress", "missing required key 'port'"),
    (GOOD.replace("    address: 10.0.0.2\n", ""), 4, "hosts.b", "missing required key 'address'"),
    (GOOD.replace("  b:\n", "  a:\n"), 4, "hosts.a", "duplicate key 'a'"),
    (GOOD.replace("      port: 8083", "      port: 7073"), 13, "services.inference.ingress.port",
     "port 7073 on host a is already taken by inference backend"),
    # A single backend's twin takes port + 10000 (or rollout.surge_port) while it restarts.
    (GOOD.replace("backends: [a, b]", "backends: [a]").replace("port: 8083", "port: 17073"), 10,
     "services.inference.backends.0", "port 17073 on host a, the surge port of this single backend "
                                      "(rollout.surge_port), is already taken by inference Envoy listener on a"),
    (GOOD.replace("backends: [a, b]", "backends: [a]") + "    rollout:\n      surge_port: 8083\n", 15,
     "services.inference.rollout.surge_port", "port 8083 on host a, the surge port"),
    (GOOD.replace("backends: [a, b]", "backends: [a]") + "  other:\n    role: inference\n    port: 17073\n"
     "    backends: [a]\n    ingress:\n      host: b\n      port: 8084\n", 17, "services.other.backends.0",
     "port 17073 on host a is already taken by inference surge instance on a"),
    # Envoy's admin is a Unix socket since issue 8: the old key is refused, not ignored.
    (GOOD + "      admin_port: 9090\n", 14, "services.inference.ingress.admin_port", "unknown key"),
    (GOOD.replace("backends: [a, b]", "backends: [a, a]"), 10, "services.inference.backends.1", "listed twice"),
    (GOOD.replace("services:", "servces:"), 7, "servces", "unknown key"),
    (GOOD + "  bad: [unclosed\n", 15, None, "invalid YAML"),
])
def test_bad_inventory_names_file_line_and_key(tmp_path, bad, line, key, words):
    err = error_for(tmp_path, bad)
    assert err.line == line
    assert err.key == key
    assert words in err.message
    text = err.one_line()
    assert "\n" not in text and text.startswith(f"{tmp_path}/inv.yaml:{line}: ")


def test_a_surge_port_moved_off_a_clash_loads(tmp_path):
    text = (GOOD.replace("backends: [a, b]", "backends: [a]").replace("port: 8083", "port: 17073")
            + "    rollout:\n      surge_port: 17074\n")
    assert load_inventory(write(tmp_path, text)).services["inference"].rollout.surge_port == 17074


def test_unknown_service_and_limit(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD))
    with pytest.raises(UsageError, match="unknown service 'ranking'.*inference"):
        inv.service("ranking")
    assert inv.limit("b") == {"b"}
    assert inv.limit(None) == {"a", "b"}
    with pytest.raises(UsageError, match="unknown host"):
        inv.limit("a,zz")


def test_relative_paths_resolve_against_the_inventory(tmp_path):
    text = GOOD.replace("    address: 10.0.0.1\n", "    address: 10.0.0.1\n    key: keys/id\n    known_hosts: kh\n")
    inv = load_inventory(write(tmp_path, text))
    assert inv.hosts["a"].key == str(tmp_path / "keys" / "id")
    assert inv.hosts["a"].known_hosts == str(tmp_path / "kh")


def test_remote_root_must_be_absolute(tmp_path):
    err = error_for(tmp_path, GOOD.replace("    port: 2222", "    root: opt/fleet"))
    assert err.key == "hosts.b.root" and "absolute" in err.message
