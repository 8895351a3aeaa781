"""Where a host runs systemd, fleet's backends run as systemd units: on real namespace hosts whose
PID 1 is the machine's own systemd 252 (tests/hostlab.py, HostLab(systemd=True)), inference on
h0 and h1 behind Envoy on h0, fleet logging in as a /bin/sh user with `become: true` (sudo to
root). The unit is installed and enabled; a
backend killed with kill -9 is restarted by systemd with no fleet command, and `fleet status`
shows it; a host that reboots starts it again; `fleet stop` stops and disables it; a deploy that
changes nothing touches nothing. Envoy stays under fleet's supervisor (hot_restart:
its epochs are the supervisor's job). The same login without become cannot install units: its processes run under fleet's
supervisor. See docs/operations.md, "systemd units"."""

import json
import os
import re

import pytest
import yaml

from fleet import systemd
from tests.conftest import inference_inventory, run_fleet, write_inventory
from tests.hostlab import HostLab
from tests.load import Load
from tests.test_supervision_hosts import BACK_WITHIN_SECONDS, run_file, status_json, wait_for

BACKENDS = ("h0", "h1")
UNIT = systemd.unit_name("/srv/fleet", "inference")


@pytest.fixture(scope="module")
def lab():
    with HostLab(2, systemd=True, plain_user=True, sudo=True) as lab:
        yield lab


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    data = inference_inventory(lab)
    for host in data["hosts"].values():
        host["become"] = True
    return write_inventory(tmp_path_factory.mktemp("systemd"), data)


@pytest.fixture(scope="module")
def deployed(lab, inventory):
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    return inventory


def main_pid(lab, host):
    return int(lab.systemctl(host, "show", "-P", "MainPID", UNIT)[1].strip() or 0)


def serving(lab, host, old=None):
    """The backend's pid (of the host's PID namespace) once a new one named by its pid file is
    systemd's main pid, carries FLEET_PROC and listens on 7073; else None."""
    def check():
        text = run_file(lab, host, "inference", "pid")
        pid = int(text) if text and text.isdigit() else None
        if pid in (None, old) or pid != main_pid(lab, host):
            return None
        environ = lab.exec(host, "cat", f"/proc/{pid}/environ", check=False)
        listening = lab.exec(host, "ss", "-Htlnp", "sport", "= :7073", check=False)
        if "FLEET_PROC=/srv/fleet/inference" not in environ.split("\0") or f"pid={pid}," not in listening:
            return None
        return pid
    return check


def test_backends_run_as_enabled_units_and_envoy_under_the_supervisor(lab, deployed):
    for host in BACKENDS:
        assert lab.systemctl(host, "is-enabled", UNIT) == (0, "enabled\n"), host
        assert lab.systemctl(host, "is-active", UNIT) == (0, "active\n"), host
        assert serving(lab, host)(), host  # the pid file names the main pid, which is fleet's
        with open(os.path.join(lab.host(host).srv, "fleet", "units", "inference.service")) as f:
            assert lab.exec(host, "cat", f"/etc/systemd/system/{UNIT}") == f.read()
    assert run_file(lab, "h0", "envoy-inference", "sup")  # Envoy: fleet's supervisor
    code, out = lab.systemctl("h0", "list-units", "--all", "--plain", "--no-legend", "fleet-*")
    assert [line.split()[0] for line in out.splitlines()] == [UNIT]
    result, processes = status_json(deployed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(processes[(h, "inference")]["state"] == "running" for h in BACKENDS)
    assert {k: p["keeper"] for k, p in processes.items()} == {
        ("h0", "inference"): "systemd", ("h1", "inference"): "systemd", ("h0", "envoy-inference"): "fleet"}
    result = run_fleet("status", "inference", "-i", deployed)
    assert "h0 runs systemd; units keep inference, fleet's supervisor the rest" in " ".join(result.stdout.split())


def test_a_deploy_that_changes_nothing_touches_nothing(lab, deployed):
    pids = {h: main_pid(lab, h) for h in BACKENDS}
    result = run_fleet("deploy", "inference", "--json", "-i", deployed)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["changed"] is False
    assert all(h["changes"] == {"send": [], "restarts": [], "diffs": []} for h in document["hosts"])
    assert {h: main_pid(lab, h) for h in BACKENDS} == pids


def test_kill_9_is_restarted_by_systemd_and_status_shows_it(lab, deployed):
    old = serving(lab, "h1")()
    lab.exec("h1", "kill", "-9", str(old))
    pid, took = wait_for(serving(lab, "h1", old), BACK_WITHIN_SECONDS, "inference back on h1 under systemd")
    print(f"kill -9 -> serving again in {took:.2f}s")
    assert lab.systemctl("h1", "show", "-P", "NRestarts", UNIT)[1].strip() == "1"
    result, processes = status_json(deployed)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = processes[("h1", "inference")]
    assert (shown["state"], shown["pid"], shown["restarts"], shown["last_exit"]) == ("running", pid, 1, "SIGKILL")
    assert shown["supervised"] is True


def test_a_rebooted_host_starts_its_units_again(lab, deployed):
    lab.reboot("h1")
    _, took = wait_for(serving(lab, "h1"), BACK_WITHIN_SECONDS, "inference back on h1 after a reboot")
    print(f"reboot -> serving again in {took:.2f}s")
    result, processes = status_json(deployed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert processes[("h1", "inference")]["state"] == "running"


def test_fleet_stop_stops_and_disables_the_unit_and_deploy_brings_it_back(lab, deployed):
    result = run_fleet("stop", "inference", "-i", deployed)
    assert result.returncode == 0, result.stdout + result.stderr
    for host in BACKENDS:
        assert lab.systemctl(host, "is-active", UNIT)[1].strip() == "inactive", host
        assert lab.systemctl(host, "is-enabled", UNIT)[1].strip() == "disabled", host
        assert run_file(lab, host, "inference", "pid") is None, host
    _, processes = status_json(deployed)
    # A graceful stop: the service exits 0 on SIGTERM, which the unit's ExecStopPost= recorded.
    assert (processes[("h1", "inference")]["state"], processes[("h1", "inference")]["last_exit"]) == (
        "stopped", "exit:0")
    result = run_fleet("deploy", "inference", "-i", deployed)
    assert result.returncode == 0, result.stdout + result.stderr
    for host in BACKENDS:
        assert lab.systemctl(host, "is-enabled", UNIT) == (0, "enabled\n"), host
        assert serving(lab, host)(), host


def test_a_login_that_is_not_root_falls_back_to_fleets_supervisor(lab, deployed, tmp_path):
    """Units need root: the lab's user without become gets its processes kept by fleet's
    supervisor, on the same systemd hosts (its own root and ports beside the units above)."""
    data = inference_inventory(lab, port=7074, ingress={"host": "h0", "port": 8084})
    for host in data["hosts"].values():
        host["root"] = "/srv/fleet/plain"
    path = write_inventory(tmp_path, data)
    result = run_fleet("deploy", "inference", "-i", path)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        _, processes = status_json(path)
        assert {(k, p["state"], p["keeper"]) for k, p in processes.items()} == {
            (("h0", "inference"), "running", "fleet"), (("h1", "inference"), "running", "fleet"),
            (("h0", "envoy-inference"), "running", "fleet")}
        plain_unit = systemd.unit_name("/srv/fleet/plain", "inference")
        for host in BACKENDS:
            assert lab.systemctl(host, "is-enabled", plain_unit)[1].strip() != "enabled", host
            assert os.path.exists(os.path.join(lab.host(host).srv, "fleet", "plain", "run", "inference.sup"))
    finally:
        assert run_fleet("stop", "inference", "-i", path).returncode == 0


def test_a_version_that_does_not_start_gets_the_previous_unit_back(lab, deployed, tmp_path):
    """A broken artifact under systemd: the first batch fails, its previous unit file (with the
    previous command) is installed again and runs; the rollout stops there."""
    units = {h: lab.exec(h, "cat", f"/etc/systemd/system/{UNIT}") for h in BACKENDS}
    broken = tmp_path / "broken.pyz"
    broken.write_bytes(b"this is not a zip archive")
    data = yaml.safe_load(open(deployed))
    data["services"]["inference"]["vars"] = {"artifact": str(broken)}
    result = run_fleet("deploy", "inference", "-i", write_inventory(tmp_path, data))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SyntaxError: invalid syntax" in result.stdout  # the log tail: the unit's output
    assert "previous version restored and running" in result.stdout
    for host in BACKENDS:
        assert lab.exec(host, "cat", f"/etc/systemd/system/{UNIT}") == units[host], host
        assert lab.systemctl(host, "is-enabled", UNIT) == (0, "enabled\n"), host
        assert serving(lab, host)(), host
    again = run_fleet("deploy", "inference", "-i", deployed)
    assert again.returncode == 0 and "no changes" in again.stdout, again.stdout


def test_rolling_and_surge_changes_under_load_lose_nothing_with_units(lab, deployed, tmp_path):
    """Restarts through systemctl drain like the supervisor's: a change of both backends rolls
    one at a time under a load of 4 channels through Envoy, then a single backend (h1, after
    h0 is scaled in: its unit stopped and disabled) changes behind a surge instance, which runs
    as a unit of its own while it serves and is stopped and disabled afterwards."""
    def change(name, backends, parallelism):
        data = yaml.safe_load(open(deployed))
        data["services"]["inference"].update(backends=list(backends), rollout={"batch": 1},
                                             vars={"modelParallelism": parallelism})
        with Load(f"{lab.host('h0').address}:8083") as load:
            result = run_fleet("deploy", "inference", "-i", write_inventory(tmp_path, data, name))
        print(f"\n{name}: {load}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert load.sent > 50 and load.failed == 0, load
        return result

    before = {h: main_pid(lab, h) for h in BACKENDS}
    change("rolling.yaml", BACKENDS, 3)
    assert all(main_pid(lab, h) not in (0, before[h]) for h in BACKENDS)
    change("one.yaml", ["h1"], 3)
    assert lab.systemctl("h0", "is-enabled", UNIT)[1].strip() == "disabled"
    before = main_pid(lab, "h1")
    result = change("surge.yaml", ["h1"], 2)
    assert re.search(r"h1 +inference surge +ok +inference-surge stopped", result.stdout), result.stdout
    assert main_pid(lab, "h1") not in (0, before)
    surge = systemd.unit_name("/srv/fleet", "inference-surge")
    assert [lab.systemctl("h1", verb, surge)[1].strip() for verb in ("is-active", "is-enabled")] == [
        "inactive", "disabled"]


def test_envoy_hot_restarts_under_its_supervisor_on_a_systemd_host(lab, deployed, tmp_path):
    """Envoy is no unit: a change that needs a new Envoy is a hot restart by its supervisor, as on
    any host (the next epoch beside the running one), 0 failed calls under load."""
    data = yaml.safe_load(open(deployed))
    data["services"]["inference"]["ingress"]["vars"] = {"envoy_log_level": "info"}
    with Load(f"{lab.host('h0').address}:8083") as load:
        result = run_fleet("deploy", "inference", "-i", write_inventory(tmp_path, data))
    print(f"\nEnvoy hot restart on a systemd host: {load}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.sent > 50 and load.failed == 0, load
    state = dict(f.split("=", 1) for f in run_file(lab, "h0", "envoy-inference", "state").split())
    assert state["epoch"] == "1" and state["state"] == "running", state
    _, processes = status_json(deployed)
    assert processes[("h0", "envoy-inference")]["keeper"] == "fleet"
