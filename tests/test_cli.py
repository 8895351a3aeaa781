"""The command line's habits: --version, options only where they mean something, completion of
service and host names from the inventory. No host is contacted here."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, inference_inventory, run_fleet, write_inventory


class _NoLab:
    """Two inventory hosts that are never contacted (every case here fails or completes before)."""

    known_hosts = "/dev/null"

    def inventory_hosts(self):
        return {name: {"address": address, "known_hosts": "/dev/null"}
                for name, address in (("h0", "192.0.2.10"), ("h1", "192.0.2.11"), ("spare", "192.0.2.12"))}


@pytest.fixture
def inventory(tmp_path):
    return write_inventory(tmp_path, inference_inventory(_NoLab()))


def test_version():
    result = run_fleet("--version")
    assert result.returncode == 0 and result.stdout.strip() == "fleet 0.1.0"


@pytest.mark.parametrize("command", [["status", "inference", "--wait-lock", "5"], ["status", "inference", "--break-lock"],
                                     ["smoke"], ["deploy", "inference", "--users", "1"]])
def test_options_only_on_the_commands_that_use_them(command, inventory):
    result = run_fleet(*command, "-i", inventory)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ")


def test_limit_selecting_no_host_names_the_service_hosts(inventory):
    result = run_fleet("deploy", "inference", "--limit", "spare", "-i", inventory)
    assert result.returncode == 2
    assert "--limit spare selects no host of inference (its hosts: h0, h1)" in result.stderr


def complete(line, inventory):
    """What bash completion offers for `line` (argcomplete's protocol, its output sent to a file)."""
    out = os.path.join(os.path.dirname(inventory), "completions")
    env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE=line, COMP_POINT=str(len(line)),
               COMP_TYPE="9", _ARGCOMPLETE_STDOUT_FILENAME=out, FLEET_INVENTORY=inventory)
    subprocess.run([sys.executable, "-m", "fleet.cli"], env=env, cwd=REPO, timeout=60, capture_output=True)
    with open(out) as f:
        return sorted(w.strip() for w in f.read().split("\n") if w.strip())


def test_completion_offers_commands_services_and_hosts(inventory):
    assert complete("fleet ", inventory) == ["--help", "--version", "-h", "completion", "deploy", "init", "logs",
                                             "releases", "rollback", "status", "stop"]
    offered = complete("fleet deploy ", inventory)
    assert [w for w in offered if not w.startswith("-")] == ["all", "inference"] and "--check" in offered
    assert complete("fleet status in", inventory) == ["inference"]
    assert complete("fleet stop inference --limit h", inventory) == ["h0", "h1"]
    assert complete("fleet stop inference --limit h0,", inventory) == ["h0,h0", "h0,h1", "h0,spare"]


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(shell):
    result = run_fleet("completion", shell)
    assert result.returncode == 0 and "_ARGCOMPLETE" in result.stdout and "fleet" in result.stdout
    if shell == "bash":
        assert subprocess.run(["bash", "-n"], input=result.stdout, text=True, timeout=30).returncode == 0
