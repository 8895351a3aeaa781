"""Releases, rollback, logs and drift on namespace hosts (issue 9): inference on h1-h3 behind
Envoy on h0, one backend at a time; the rollback runs under four long-lived client channels
through Envoy and must lose no call. The tests build on each other, in order."""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import yaml

from fleet import artifacts, desired
from tests.conftest import REPO, run_fleet, write_inventory
from tests.load import Load

LAB_HOSTS = 4  # h0: Envoy; h1-h3: backends
BACKENDS = ("h1", "h2", "h3")
RUN = {}  # what earlier tests of this module left for later ones
# The supervisor's directory under ROOT/artifacts: in use on every host that runs a process.
SUPERVISOR_DIR = artifacts.file_sha256(desired.SUPERVISOR_SOURCE)[:16]


def inventory(lab, artifact=None, **vars):
    service = {"port": 7073, "backends": list(BACKENDS), "ingress": {"host": "h0", "port": 8083},
               "rollout": {"batch": 1}, "vars": dict(vars, **({"artifact": str(artifact)} if artifact else {}))}
    return {"hosts": lab.inventory_hosts(), "services": {"inference": service}}


def fleet_ok(*args):
    result = run_fleet(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def releases_json(path):
    return {h["host"]: h for h in json.loads(fleet_ok("releases", "inference", "-i", path, "--json").stdout)["hosts"]}


def host_file(lab, host, *parts):
    return os.path.join(lab.host(host).srv, "fleet", *parts)


def config(lab, host):
    with open(host_file(lab, host, "services", "inference", "config.yaml")) as f:
        return yaml.safe_load(f)


def pid(lab, host):
    with open(host_file(lab, host, "run", "inference.pid")) as f:
        return int(f.read())


def test_each_deploy_that_changes_something_records_a_release_on_every_host(lab, tmp_path_factory):
    directory = tmp_path_factory.mktemp("releases")
    RUN["v1"] = write_inventory(directory, inventory(lab, modelParallelism=1), "v1.yaml")
    RUN["v2"] = write_inventory(directory, inventory(lab, modelParallelism=2), "v2.yaml")
    fleet_ok("deploy", "inference", "-i", RUN["v1"])
    fleet_ok("deploy", "inference", "-i", RUN["v2"])
    unchanged = fleet_ok("deploy", "inference", "-i", RUN["v2"])
    assert "no changes" in unchanged.stdout  # and so no new release:
    found = releases_json(RUN["v2"])
    assert sorted(found) == ["h0", "h1", "h2", "h3"]
    ids = [r["id"] for r in found["h1"]["releases"]]
    assert len(ids) == 2
    for host, listed in found.items():
        # One id per deploy on every host of the service, newest first, the newest current.
        assert [r["id"] for r in listed["releases"]] == ids and listed["current"] == ids[0], listed
        assert listed["releases"][0]["current"] and not listed["releases"][1]["current"]
        assert all(r["who"] and r["time"] and r["inventory"].endswith(".yaml") for r in listed["releases"])
    assert found["h1"]["releases"][0]["inventory"].endswith("v2.yaml")
    assert [p["name"] for p in found["h0"]["releases"][0]["processes"]] == ["envoy-inference"]
    RUN["v1 id"], RUN["v2 id"] = ids[1], ids[0]
    text = fleet_ok("releases", "inference", "-i", RUN["v2"]).stdout
    print(text)
    assert text.count(RUN["v2 id"]) == 4 and text.count("current") == 4, text
    # The stored config of a release is private to fleet's user, like the live one.
    copy = host_file(lab, "h1", "releases", "inference", RUN["v1 id"], "files", "0")
    assert os.stat(copy).st_mode & 0o077 == 0 and yaml.safe_load(open(copy))["modelParallelism"] == 1


def test_rollback_under_load_loses_nothing_and_status_then_shows_the_drift(lab):
    before = {h: pid(lab, h) for h in BACKENDS}
    with Load(f"{lab.host('h0').address}:8083") as load:
        result = run_fleet("rollback", "inference", "-i", RUN["v2"])
    print(f"\nrollback: {load}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.sent > 50 and load.failed == 0, load
    assert f"h1: inference back to release {RUN['v1 id']}" in result.stdout
    for host in BACKENDS:
        assert config(lab, host)["modelParallelism"] == 1 and pid(lab, host) != before[host]
    # Rolled one backend at a time, each drained first, as a deploy does.
    assert result.stdout.count("back in rotation, healthy in Envoy") == 3, result.stdout
    # The rollback is a release of its own, running what the first one ran.
    found = releases_json(RUN["v2"])["h1"]["releases"]
    assert len(found) == 3 and found[0]["current"] and found[0]["identity"] == found[2]["identity"] != \
        found[1]["identity"]
    # The inventory still says v2: every backend drifts from it, and status says so with exit 1.
    status = run_fleet("status", "inference", "-i", RUN["v2"], "--json")
    assert status.returncode == 1, status.stdout + status.stderr
    document = json.loads(status.stdout)
    assert document["drifted"] and document["ok"]  # healthy, but not what the inventory says
    processes = {(h["host"], p["name"]): p for h in document["hosts"] for p in h["processes"]}
    for host in BACKENDS:
        assert processes[(host, "inference")]["release"] == found[0]["id"]
        assert any("config.yaml differs" in why for why in processes[(host, "inference")]["drift"])
    assert processes[("h0", "envoy-inference")]["drift"] == []
    text = run_fleet("status", "inference", "-i", RUN["v2"]).stdout
    print(text)
    assert "drifted" in text
    assert fleet_ok("status", "inference", "-i", RUN["v1"]).returncode == 0  # v1 is what runs


def test_a_rollback_to_a_release_a_host_lacks_changes_nothing(lab):
    before = {h: pid(lab, h) for h in BACKENDS}
    result = run_fleet("rollback", "inference", "--to", "1-1", "-i", RUN["v2"])
    assert result.returncode == 1
    assert "h1: no release 1-1 of inference (releases there: " in result.stdout, result.stdout
    assert "nothing was changed on any host" in result.stderr
    assert {h: pid(lab, h) for h in BACKENDS} == before
    assert run_fleet("rollback", "inference", "--to", "v1; rm -rf /", "-i", RUN["v2"]).returncode == 2


def test_logs_show_the_last_lines_of_every_backend_prefixed_by_host(lab):
    result = fleet_ok("logs", "inference", "-n", "5", "-i", RUN["v2"])
    for host in BACKENDS:
        lines = [l for l in result.stdout.splitlines() if l.startswith(f"{host} inference | ")]
        assert 1 <= len(lines) <= 5, result.stdout
    envoy = fleet_ok("logs", "inference", "--envoy", "--host", "h0", "-i", RUN["v2"])
    assert all(l.startswith("h0 envoy-inference | ") for l in envoy.stdout.splitlines())
    assert run_fleet("logs", "inference", "--host", "h9", "-i", RUN["v2"]).returncode == 2


def test_logs_follow_shows_a_line_written_after_it_started_until_sigint(lab):
    follower = subprocess.Popen([sys.executable, "-m", "fleet.cli", "logs", "inference", "-f", "-n", "1", "-i",
                                 RUN["v2"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in follower.stdout], daemon=True).start()

    def wait_for(wanted, timeout=60):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if wanted(seen):
                return seen
        raise AssertionError(f"not seen within {timeout}s; saw: {seen}")

    try:
        wait_for(lambda seen: {l.split()[0] for l in seen} >= set(BACKENDS))  # the tails: following now
        marker = f"written after logs -f started {time.time()}"
        with open(host_file(lab, "h2", "log", "inference.log"), "a") as f:
            f.write(marker + "\n")
        wait_for(lambda seen: f"h2 inference | {marker}\n" in seen)
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 130
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_only_the_kept_releases_remain_and_unused_artifacts_are_pruned(lab, tmp_path):
    base = artifacts.resolve("builtin:services", ".").path
    for n in range(6):  # each a new services artifact: a new content-addressed directory per backend
        artifact = tmp_path / f"services-{n}.pyz"
        shutil.copy(base, artifact)
        with zipfile.ZipFile(artifact, "a") as zf:
            zf.writestr("RELEASE", f"variant {n}\n")
        fleet_ok("deploy", "inference", "-i", write_inventory(tmp_path, inventory(lab, artifact, modelParallelism=2)))
    found = releases_json(RUN["v2"])
    for host in ("h0",) + BACKENDS:
        kept = found[host]["releases"]
        assert len(kept) == 5 and kept[0]["current"], found[host]
        assert sorted(os.listdir(host_file(lab, host, "releases", "inference"))) == sorted(
            [r["id"] for r in kept] + ["current"])
        named = {a["path"].split("/artifacts/")[1].split("/")[0] for r in kept for a in r["artifacts"]}
        assert set(os.listdir(host_file(lab, host, "artifacts"))) == named | {SUPERVISOR_DIR}
    # h1 ran 8 services artifacts (the built-in one, 6 variants); the 5 kept releases name 5 of them,
    # beside them the supervisor every process runs under.
    assert len(os.listdir(host_file(lab, "h1", "artifacts"))) == 5 + 1
