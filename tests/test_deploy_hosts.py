"""`fleet deploy inference` end to end on real SSH hosts (network namespaces running sshd),
with the real Envoy and real gRPC calls through it."""

import json
import os
import re

import grpc
import pytest
import yaml

from friesian_services import model
from friesian_services.inference import encode_instances
from friesian_services.proto import ranking_pb2, ranking_pb2_grpc
from tests.conftest import inference_inventory, kill_unsupervised, run_fleet, write_inventory


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    return write_inventory(tmp_path_factory.mktemp("inv"), inference_inventory(lab))


def listeners(lab, host):
    """(port, program) pairs from netstat run directly in the host's namespace, not through fleet;
    python3, python3.11 and a virtualenv's python all count as "python"."""
    out = lab.exec(host, "netstat", "-tnlp")
    return {(int(m.group(1)), re.sub(r"^python.*", "python", m.group(2)))
            for m in re.finditer(r":(\d+)\s+\S+\s+LISTEN\s+\d+/(\S+)", out)}


def admin_clusters(lab):
    out = lab.envoy_admin("h0", "/clusters")
    stats = {}
    for line in out.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "inference_service" and parts[2] in ("rq_total", "health_flags"):
            stats.setdefault(parts[1], {})[parts[2]] = parts[3]
    return stats


def pids(lab):
    return {h.name: sorted(open(p).read().strip() for p in _pidfiles(h.srv)) for h in lab.hosts}


def _pidfiles(srv):
    run = os.path.join(srv, "fleet", "run")
    return [os.path.join(run, f) for f in os.listdir(run) if f.endswith(".pid")] if os.path.isdir(run) else []


def test_cold_deploy_starts_backends_and_envoy(lab, inventory):
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 backends healthy in Envoy" in result.stdout
    assert "grpc.health.v1 through 10.213." in result.stdout and "SERVING" in result.stdout
    assert {(7073, "python"), (8083, "envoy")} == listeners(lab, "h0") - {(22, "sshd:")}  # admin: no TCP port
    assert (7073, "python") in listeners(lab, "h1")
    assert not any(port == 8083 for port, _ in listeners(lab, "h1"))


def test_grpc_through_envoy_reaches_both_backends(lab, inventory):
    before = admin_clusters(lab)
    rows = [[0.05 * i] * 8 for i in range(10)]
    expected = [model.RankingModel(model.generate()).score(r) for r in rows]
    with grpc.insecure_channel(f"{lab.host('h0').address}:8083") as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        for _ in range(20):
            reply = stub.doPredict(ranking_pb2.Content(encodedStr=encode_instances(rows)), timeout=10)
            assert json.loads(reply.predictStr) == pytest.approx(expected, abs=1e-12)
    after = admin_clusters(lab)
    for host in lab.hosts:
        endpoint = f"{host.address}:7073"
        assert after[endpoint]["health_flags"] == "healthy"
        served = int(after[endpoint]["rq_total"]) - int(before[endpoint]["rq_total"])
        assert served >= 5, f"{endpoint} served {served} of 20 calls"


def test_second_deploy_changes_nothing_and_says_so(lab, inventory):
    before = pids(lab)
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no changes" in result.stdout
    assert not re.search(r"^h\d .* changed$", result.stdout, re.M)  # no step reported as changed
    assert re.search(r"│ h0 +│ 7 +│ 0 +│ 0 +│ 2/2", result.stdout)  # 6 tasks and the supervisor
    assert pids(lab) == before


def test_check_shows_the_diff_and_touches_nothing(lab, inventory, tmp_path):
    changed = open(inventory).read().replace("      port: 8083", "      port: 8083\n      vars:\n"
                                             "        health_check_interval: 3s")
    path = tmp_path / "inventory.yaml"
    path.write_text(changed)
    cds = os.path.join(lab.host("h0").srv, "fleet", "envoy", "inference", "cds.yaml")
    before = open(cds).read()
    result = run_fleet("deploy", "inference", "--check", "-i", str(path))
    assert result.returncode == 3, result.stdout + result.stderr  # changes pending
    assert re.search(r"^-\s+interval: 2s$", result.stdout, re.M) and re.search(r"^\+\s+interval: 3s$", result.stdout, re.M)
    assert "h1: no changes" in result.stdout
    assert open(cds).read() == before


def test_check_without_changes_exits_0(lab, inventory):
    result = run_fleet("deploy", "inference", "--check", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "h0: no changes" in result.stdout and "h1: no changes" in result.stdout


def test_deploy_json_lists_every_host_and_step(lab, inventory):
    result = run_fleet("deploy", "inference", "--json", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)  # stdout holds the document and nothing else
    assert document["ok"] is True and document["exit_code"] == 0 and document["errors"] == []
    hosts = {h["host"]: h for h in document["hosts"]}
    assert set(hosts) == {"h0", "h1"}
    assert [s["step"] for s in hosts["h1"]["steps"]] == [
        "inference.inference.artifact", "inference.inference.config", "inference.inference.process",
        "fleet.supervisor"]
    assert [s["step"] for s in hosts["h0"]["steps"]][3:] == [
        "inference.envoy.binary", "inference.envoy.config", "inference.envoy.process", "fleet.supervisor"]
    assert all(s["status"] == "ok" for h in hosts.values() for s in h["steps"])
    assert hosts["h0"]["changes"] == {"send": [], "restarts": [], "diffs": []}
    assert {(p["process"], p["port"], p["ok"]) for p in hosts["h0"]["ports"]} == {
        ("inference", 7073, True), ("envoy-inference", 8083, True)}
    assert "facts" in hosts["h0"]["timings"] and "total" in document["timings"]
    (check,) = document["checks"]
    assert check["service"] == "inference" and check["ok"] and "2/2 backends healthy" in check["detail"]


def test_check_json_shows_pending_changes(lab, inventory, tmp_path):
    changed = open(inventory).read().replace("port: 8083", "port: 8083\n      vars:\n"
                                             "        health_check_interval: 3s")
    path = tmp_path / "inventory.yaml"
    path.write_text(changed)
    result = run_fleet("deploy", "inference", "--check", "--json", "-i", str(path))
    assert result.returncode == 3, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["changed"] is True and document["exit_code"] == 3
    h0 = next(h for h in document["hosts"] if h["host"] == "h0")
    assert {s["path"].rsplit("/", 1)[1] for s in h0["changes"]["send"]} == {"cds.yaml"}
    assert "+    interval: 3s" in h0["changes"]["diffs"][0]["diff"]


def test_status_with_limit_does_not_report_the_left_out_ingress(lab, inventory):
    result = run_fleet("status", "inference", "--limit", "h1", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not checked: ingress host h0 left out by --limit" in result.stdout
    assert "not reached" not in result.stdout and "unreachable" not in result.stdout
    document = json.loads(run_fleet("status", "inference", "--limit", "h1", "--json", "-i", inventory).stdout)
    assert [h["host"] for h in document["hosts"]] == ["h1"] and document["ok"] is True
    assert document["envoy"]["inference"]["not_checked"].startswith("not checked")


def test_limit_selecting_no_host_of_the_service_is_bad_input(lab, inventory, tmp_path):
    data = yaml.safe_load(open(inventory))
    data["hosts"]["spare"] = dict(data["hosts"]["h1"], root="/srv/spare")  # defined, but serves nothing
    path = write_inventory(tmp_path, data)
    for command in (["deploy", "inference"], ["status", "inference"], ["stop", "inference"]):
        result = run_fleet(*command, "--limit", "spare", "-i", path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--limit spare selects no host of inference (its hosts: h0, h1)" in result.stderr
        assert result.stdout == ""


def test_envoy_takes_new_config_without_restart(lab, inventory, tmp_path):
    changed = open(inventory).read().replace("      port: 8083", "      port: 8083\n      vars:\n"
                                             "        health_check_interval: 3s")
    path = tmp_path / "inventory.yaml"
    path.write_text(changed)
    envoy_pid = open(os.path.join(lab.host("h0").srv, "fleet", "run", "envoy-inference.pid")).read()
    result = run_fleet("deploy", "inference", "-i", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inference.envoy.config             changed" in result.stdout
    assert open(os.path.join(lab.host("h0").srv, "fleet", "run", "envoy-inference.pid")).read() == envoy_pid
    dump = lab.envoy_admin("h0", "/config_dump?resource=dynamic_active_clusters")
    assert '"interval": "3s"' in dump
    assert run_fleet("deploy", "inference", "-i", inventory).returncode == 0  # back to the module's inventory


def test_terminal_view_ends_with_what_changed_on_each_host(lab, inventory, tmp_path, monkeypatch):
    changed = open(inventory).read().replace("port: 8083", "port: 8083\n      vars:\n"
                                             "        health_check_interval: 4s")
    path = tmp_path / "inventory.yaml"
    path.write_text(changed)
    # A terminal as rich sees one, without cursor movement: the live view's last frame only.
    for name, value in (("TTY_COMPATIBLE", "1"), ("TTY_INTERACTIVE", "0"), ("COLUMNS", "200")):
        monkeypatch.setenv(name, value)
    result = run_fleet("deploy", "inference", "-i", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stdout)
    assert re.search(r"^ h0 +inference\.envoy\.config +\d+ +1 +0 *$", text, re.M), text
    assert re.search(r"^ h1 +no changes ", text, re.M) and re.search(r"hosts done .* 2/2", text)
    monkeypatch.delenv("TTY_COMPATIBLE")
    assert run_fleet("deploy", "inference", "-i", inventory).returncode == 0  # back to the module's inventory


def test_status_shows_processes_and_envoy_view(lab, inventory):
    result = run_fleet("status", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("running") == 3
    for host in lab.hosts:
        assert re.search(rf"{re.escape(host.address)}:7073 +│ healthy", result.stdout)


def test_limit_touches_only_the_named_host(lab, inventory):
    for host in ("h0", "h1"):
        kill_unsupervised(lab, host, "inference")
    result = run_fleet("deploy", "inference", "--limit", "h1", "-i", inventory)
    assert "inference.inference.process        changed" in result.stdout
    assert "h0 " not in result.stdout.replace("h0:", "")
    assert (7073, "python") in listeners(lab, "h1")
    assert (7073, "python") not in listeners(lab, "h0")
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (7073, "python") in listeners(lab, "h0")


def test_status_exits_1_when_a_backend_is_down(lab, inventory):
    kill_unsupervised(lab, "h1", "inference")
    result = run_fleet("status", "inference", "--json", "-i", inventory)
    assert result.returncode == 1, result.stdout + result.stderr
    document = json.loads(result.stdout)
    h1 = next(h for h in document["hosts"] if h["host"] == "h1")
    assert h1["ok"] is False and h1["processes"][0]["state"] == "dead"
    assert run_fleet("deploy", "inference", "-i", inventory).returncode == 0


def test_unknown_host_key_is_refused(lab, inventory, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    text = open(inventory).read().replace(lab.known_hosts, str(empty))
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    result = run_fleet("status", "inference", "-i", str(path))
    assert result.returncode == 1
    assert "unknown host key" in result.stdout


def test_stop_stops_everything(lab, inventory):
    result = run_fleet("stop", "inference", "--json", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    steps = {h["host"]: {s["step"]: s["status"] for s in h["steps"]} for h in document["hosts"]}
    assert steps == {"h0": {"stop envoy-inference": "changed", "stop inference": "changed"},
                     "h1": {"stop inference": "changed"}}
    for host in ("h0", "h1"):
        assert not {p for p, _ in listeners(lab, host)} & {7073, 8083}
    result = run_fleet("status", "inference", "-i", inventory)
    assert result.returncode == 1 and result.stdout.count("│ stopped ") == 3
