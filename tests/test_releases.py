"""Releases and logs without namespace hosts: manifests built from the real roles and read back,
prune selection, drift, and the host scripts (record, list, prune, log tail and follow) run under
dash on a local root with a hostile name, and checked by shellcheck."""

import base64
import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

from fleet import commands, connection, desired, facts, plan, releases, runner
from fleet.errors import UsageError
from fleet.inventory import Host
from fleet.releases import Listing, Release
from tests.conftest import inference_inventory, load_inventory, project, write_inventory
from tests.test_host_scripts import HOSTILE_DIR, HOSTILE_VALUE

SERVICES = ["inference"]


class Lab:
    """Two host names for inventory_hosts(), enough to compile inference (h0: backend + Envoy)."""

    hosts = []

    @staticmethod
    def inventory_hosts(root="/srv/fleet"):
        return {name: {"address": f"10.0.0.{i + 1}", "root": root} for i, name in enumerate(("h0", "h1"))}


@pytest.fixture
def states(tmp_path):
    data = inference_inventory(Lab, vars={"modelPath": {"secret": "s3cret-model"}})
    inv = load_inventory(write_inventory(tmp_path, data))
    return inv, desired.compile_services(inv, list(inv.services.values()), project())


def test_keep_releases_is_five_unless_the_inventory_says_otherwise(tmp_path):
    data = inference_inventory(Lab)
    assert load_inventory(write_inventory(tmp_path, data)).services["inference"].keep_releases == 5
    data["keep_releases"] = 3
    assert load_inventory(write_inventory(tmp_path, data)).services["inference"].keep_releases == 3
    data["services"]["inference"]["keep_releases"] = 8  # per service wins
    assert load_inventory(write_inventory(tmp_path, data)).services["inference"].keep_releases == 8


@pytest.mark.parametrize("where, value", [((), 0), ((), "5"), (("services", "inference"), True),
                                          (("services", "inference"), 101)])
def test_a_bad_keep_releases_names_its_key(tmp_path, where, value):
    data = inference_inventory(Lab)
    target = data
    for key in where:
        target = target[key]
    target["keep_releases"] = value
    with pytest.raises(UsageError) as info:
        load_inventory(write_inventory(tmp_path, data))
    assert info.value.key == ".".join(where + ("keep_releases",)) and "1-100" in info.value.message
    assert info.value.line is not None


def test_a_manifest_holds_the_services_files_processes_and_tasks_and_reads_back(states):
    inv, compiled = states
    state = compiled["h0"]  # a backend and the Envoy in front
    doc, copies = releases.manifest(state, "inference", SERVICES, "1764290000-42", "2026-11-28T01:00:00Z",
                                    "ops@laptop", "/p/inventory.yaml")
    parsed = releases.parse_manifest(releases.encode(doc))
    assert "\n" not in releases.encode(doc)
    assert parsed == doc
    assert [a["path"].rsplit("/", 1)[1] for a in doc["artifacts"]] == ["friesian-services.pyz", "envoy"]
    assert {p["name"] for p in doc["processes"]} == {"inference", "envoy-inference"}
    assert [path for path, _ in copies] == [f["path"] for f in doc["files"]]
    # Back as a HostState from the stored copies: exactly what was deployed.
    contents = {copy: next(f.content for f in state.files if f.path == path) for path, copy in copies}
    back = releases.host_state(state.host, parsed, contents)
    assert back.tasks == state.tasks
    # Artifacts by their paths alone (the host has them), but the supervisor with its source: a
    # rollback sends it if the host lacks it.
    assert sorted(back.files, key=lambda f: f.path) == sorted(
        [f if f.task == desired.SUPERVISOR_TASK else dataclasses.replace(f, source=None) for f in state.files],
        key=lambda f: f.path)
    assert back.processes == state.processes
    config = next(f for f in back.files if f.path.endswith("config.yaml"))
    assert config.secret and config.mode == 0o600


def test_a_stored_copy_that_changed_or_is_missing_is_refused(states):
    _, compiled = states
    doc, copies = releases.manifest(compiled["h1"], "inference", SERVICES, "1-1", "t", "w", "i")
    with pytest.raises(releases.ReleaseError, match="stored copy of .*config.yaml is missing"):
        releases.host_state(compiled["h1"].host, doc, {})
    with pytest.raises(releases.ReleaseError, match="does not match its sha256"):
        releases.host_state(compiled["h1"].host, doc, {copy: b"edited" for _, copy in copies})


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("processes"), "processes missing"),
    (lambda d: d.update(format=2), "format 2"),
    (lambda d: d.update(id="1-1; rm -rf /"), "not a release id"),
    (lambda d: d["processes"][0].update(start_timeout=True), "start_timeout missing or not a int"),
    (lambda d: d["files"][0].update(copy=None), "copy missing"),
])
def test_a_manifest_fleet_did_not_write_is_refused(states, change, message):
    _, compiled = states
    doc, _ = releases.manifest(compiled["h1"], "inference", SERVICES, "1-1", "t", "w", "i")
    change(doc)
    with pytest.raises(releases.ReleaseError, match=message):
        releases.parse_manifest(releases.encode(doc))


def test_a_shared_file_is_part_of_every_service_that_needs_it(states):
    _, compiled = states
    state = compiled["h0"]
    binary = next(f for f in state.files if f.path.endswith("/envoy"))
    # As when another service's Envoy on this host put the binary there first.
    shared = [dataclasses.replace(f, task="other.envoy.binary") if f is binary else f for f in state.files]
    files, _, tasks = releases.parts(dataclasses.replace(state, files=shared), "inference", ["inference", "other"])
    assert binary.path in [f.path for f in files] and tasks[0] == "other.envoy.binary"


def test_service_of_takes_the_longest_name():
    assert releases.service_of("my.svc.role.config", ["my", "my.svc"]) == "my.svc"
    assert releases.service_of("feature_2tower.envoy.process", ["feature", "feature_2tower"]) == "feature_2tower"
    assert releases.service_of("connect", ["feature"]) is None


def release(service, release_id, artifacts=()):
    return Release(service, release_id, {"artifacts": [{"path": f"/r/artifacts/{a}/x"} for a in artifacts]})


def test_prune_keeps_the_newest_and_the_current_and_every_artifact_still_named():
    ids = [f"{1000 + i}-7" for i in range(8)]
    listing = Listing(
        releases={"inference": [release("inference", i, [f"{n:016x}"]) for n, i in enumerate(ids)],
                  "feature": [release("feature", "5-5", ["f" * 16])]},
        current={"inference": ids[1]},  # rolled back to an old one
        artifacts={f"{n:016x}": False for n in range(8)} | {"f" * 16: False, "e" * 16: False, "d" * 16: True,
                                                          "c" * 16: False})
    gone, unused = releases.prune_selection(listing, {"inference": 3}, "/r", ["/r/artifacts/" + "c" * 16 + "/y"])
    assert gone == [("inference", i) for i in (ids[4], ids[3], ids[2], ids[0])]
    # Kept: the 3 newest and the current one; another service's; in use by a process; desired now.
    assert unused == [f"{n:016x}" for n in (0, 2, 3, 4)] + ["e" * 16]


def test_prune_orders_ids_by_time_not_by_text():
    listing = Listing(releases={"s": [release("s", "999-1"), release("s", "1000-1")]}, current={"s": "1000-1"})
    assert releases.prune_selection(listing, {"s": 1}, "/r", [])[0] == [("s", "999-1")]


def test_an_unreadable_release_keeps_every_artifact():
    listing = Listing(releases={"s": [Release("s", "1-1", None, "unreadable")]}, artifacts={"a" * 16: False})
    assert releases.prune_selection(listing, {"s": 5}, "/r", []) == ([], [])


def test_previous_is_the_release_before_the_current_one():
    listing = Listing(releases={"s": [release("s", i) for i in ("1-1", "2-1", "3-1")]}, current={"s": "2-1"})
    assert releases.previous(listing, "s") == "1-1"
    assert releases.previous(dataclasses.replace(listing, current={"s": "1-1"}), "s") is None
    assert releases.previous(Listing(), "s") is None


def test_drift_names_the_files_and_fingerprint_that_differ(states):
    _, compiled = states
    state = compiled["h1"]
    config = next(f for f in state.files if f.path.endswith("config.yaml"))
    process = state.processes[0]
    report = facts.Report(present={f.path: True for f in state.files},
                          contents={f.path: f.content for f in state.files if f.content is not None},
                          procs={process.name: facts.ProcState(process.name, 42, True, process.fingerprint)})
    assert releases.drift(plan.plan_host(state, report)) == {}
    report.contents[config.path] = b"modelParallelism: 1\n"
    report.procs[process.name] = facts.ProcState(process.name, 42, True, "older")
    assert releases.drift(plan.plan_host(state, report)) == {
        "inference": ["command or files changed (fingerprint)", f"{config.path} differs"]}
    report.procs[process.name] = facts.ProcState(process.name, None, False, None)  # dead: status says so
    assert releases.drift(plan.plan_host(state, report)) == {"inference": [f"{config.path} differs"]}


def test_a_log_stream_gives_whole_lines_across_reads_and_rotations():
    stream = facts.LogStream()
    chunk = facts.LogChunk
    assert stream.take(chunk("p", "10", 9, b"one\ntw")) == ["one"]
    assert stream.take(chunk("p", "10", 12, b"o\nth")) == ["two"]
    assert stream.take(chunk("p", "11", 4, b"new\n")) == ["th", "new"]  # rotated: the cut line ends
    assert (stream.inode, stream.offset) == ("11", 4) and stream.rest() == []


# -- the host scripts, run under dash on a local root -------------------------------------------

@pytest.fixture
def session(tmp_path):
    root = str(tmp_path / HOSTILE_DIR / "root")
    conn = connection.LocalConnection(shell="dash")
    shell = conn.start_session(commands.session(root, "test-holder"), 60)
    yield root, Steps(shell)
    shell.close()
    conn.close()


class Steps:
    """The session, with the deadline every step here gets (60 s: generous, never the limit)."""

    def __init__(self, shell):
        self.shell = shell

    def run(self, script, **options):
        return self.shell.run(script, 60, "step", **options)


def test_records_list_and_prune_on_a_host(session):
    root, shell = session
    os.makedirs(os.path.join(root, "services"))
    config = os.path.join(root, "services", HOSTILE_VALUE.replace("/", "_").replace("\n", "_"))
    artifact_dirs = [f"{n:016x}" for n in range(7)]
    for n, name in enumerate(artifact_dirs):
        os.makedirs(os.path.join(root, "artifacts", name))
        with open(config, "w") as f:
            f.write(f"version {n}\n")
        doc = {"format": 1, "id": f"{100 + n}-1", "service": "svc", "time": "t", "who": HOSTILE_VALUE,
               "inventory": "i", "tasks": [], "files": [], "processes": [],
               "artifacts": [{"task": "t", "path": f"{root}/artifacts/{name}/a", "sha256": "0", "mode": 420}]}
        result = shell.run(commands.record_release("svc", doc["id"], releases.encode(doc), [(config, "files/0")]))
        assert result.exit_code == 0 and f"@@recorded svc {doc['id']}" in result.output, result.output
    # Nothing changed: no new release where there is one.
    assert "@@recorded" not in shell.run(commands.record_release("svc", "200-1", "{}", [], only_if_none=True)).output
    listing = releases.parse_listing(shell.run(commands.list_releases(artifacts=True)).output)
    assert listing.ids("svc") == [f"{100 + n}-1" for n in range(7)] and listing.current == {"svc": "106-1"}
    assert listing.find("svc", "100-1").manifest["who"] == HOSTILE_VALUE
    assert listing.artifacts == {name: False for name in artifact_dirs}
    copy = os.path.join(root, "releases", "svc", "106-1", "files", "0")
    assert open(copy).read() == "version 6\n" and os.stat(copy).st_mode & 0o077 == 0
    gone, unused = releases.prune_selection(listing, {"svc": 5}, root, [])
    assert gone == [("svc", "101-1"), ("svc", "100-1")] and unused == artifact_dirs[:2]
    pruned = releases.parse_listing(shell.run(commands.prune(gone, unused)).output).pruned
    assert pruned == ["releases/svc/101-1", "releases/svc/100-1", f"artifacts/{artifact_dirs[0]}",
                      f"artifacts/{artifact_dirs[1]}"]
    assert sorted(os.listdir(os.path.join(root, "artifacts"))) == artifact_dirs[2:]
    assert sorted(os.listdir(os.path.join(root, "releases", "svc"))) == ["102-1", "103-1", "104-1", "105-1",
                                                                          "106-1", "current"]
    # What a rollback reads back.
    report = facts.parse(shell.run(commands.read_release("svc", "102-1", ["files/0", "files/9"], [
        f"{root}/artifacts/{artifact_dirs[2]}", f"{root}/artifacts/{artifact_dirs[0]}"])).output)
    assert report.contents == {"files/0": b"version 2\n"}
    assert report.present == {"files/0": True, "files/9": False, f"{root}/artifacts/{artifact_dirs[2]}": True,
                              f"{root}/artifacts/{artifact_dirs[0]}": False}


def test_a_release_that_cannot_be_written_leaves_the_current_one(session):
    root, shell = session
    assert shell.run(commands.record_release("svc", "1-1", "{}", [])).exit_code == 0
    result = shell.run(commands.record_release("svc", "2-1", "{}", [(f"{root}/gone", "files/0")]))
    assert result.exit_code == 1 and "@@fail release svc 2-1 could not be recorded" in result.output
    assert sorted(os.listdir(os.path.join(root, "releases", "svc"))) == ["1-1", "current"]
    assert releases.parse_listing(shell.run(commands.list_releases("svc")).output).current == {"svc": "1-1"}


def test_an_artifact_a_running_command_or_a_config_names_is_in_use(session):
    root, shell = session
    for name in ("a" * 16, "b" * 16, "c" * 16):
        os.makedirs(os.path.join(root, "artifacts", name))
    os.makedirs(os.path.join(root, "run"))
    os.makedirs(os.path.join(root, "services", "svc"))
    with open(os.path.join(root, "run", "svc.cmd"), "w") as f:
        f.write(f"python3 {root}/artifacts/{'a' * 16}/services.pyz inference\n")
    with open(os.path.join(root, "services", "svc", "config.yaml"), "w") as f:
        f.write(f"modelPath: {root}/artifacts/{'b' * 16}/model\n")
    assert releases.parse_listing(shell.run(commands.list_releases(artifacts=True)).output).artifacts == {
        "a" * 16: True, "b" * 16: True, "c" * 16: False}


def read_logs(shell, streams, script):
    lines = []
    for chunk in facts.parse_log_chunks(shell.run(script).output):
        lines += streams[chunk.name].take(chunk)
    return lines


def test_log_tail_reaches_into_rotated_files_and_follow_survives_a_rotation(session):
    root, shell = session
    log = os.path.join(root, "log", "svc.log")
    os.makedirs(os.path.dirname(log))
    with open(log + ".1", "w") as f:
        f.write("old 1\nold 2\n")
    with open(log, "w") as f:
        f.write("@@done 0\nnew 1\nhalf")  # a log line that looks like the protocol stays data
    streams = {"svc": facts.LogStream(), "absent": facts.LogStream()}
    assert read_logs(shell, streams, commands.log_tail(["svc", "absent"], 4)) == ["old 2", "@@done 0", "new 1"]
    follow = lambda: read_logs(shell, streams, commands.log_follow(  # noqa: E731
        [(name, s.inode, s.offset) for name, s in streams.items()]))
    assert follow() == []
    with open(log, "a") as f:
        f.write(" line\nnext\n")
    assert follow() == ["half line", "next"]
    with open(log, "a") as f:
        f.write("before rotation\n")
    os.rename(log, log + ".1")  # as the supervisor rotates
    with open(log, "w") as f:
        f.write("after rotation\n")
    with open(os.path.join(root, "log", "absent.log"), "w") as f:
        f.write("appeared\n")
    assert follow() == ["before rotation", "after rotation", "appeared"]
    assert read_logs(shell, streams, commands.log_tail(["svc"], 0)) == []


def test_a_follow_read_is_bounded(session):
    root, shell = session
    os.makedirs(os.path.join(root, "log"))
    with open(os.path.join(root, "log", "svc.log"), "w") as f:
        f.write("x" * (commands.LOG_CHUNK_BYTES * 2) + "\n")
    chunks = facts.parse_log_chunks(shell.run(commands.log_follow([("svc", "-", 0)])).output)
    assert [len(c.data) for c in chunks] == [commands.LOG_CHUNK_BYTES]
    assert chunks[0].next_offset == commands.LOG_CHUNK_BYTES


def scripts(root, value):
    doc = {"who": value}
    return {
        "record": commands.record_release("svc", "1-2", releases.encode(doc), [(f"{root}/{value}", "files/0")]),
        "record if none": commands.record_release("svc", "1-2", releases.encode(doc), [], only_if_none=True),
        "list": commands.list_releases(artifacts=True),
        "list one service": commands.list_releases("svc", manifests=False),
        "read": commands.read_release("svc", "1-2", ["files/0"], [f"{root}/artifacts/{value}"]),
        "prune": commands.prune([("svc", "1-2")], ["a" * 16]),
        "log tail": commands.log_tail(["svc", "envoy-svc"], 20),
        "log follow": commands.log_follow([("svc", "123", 5), ("envoy-svc", "-", 0)]),
    }


@pytest.mark.parametrize("name", list(scripts("/r", "v")))
def test_shellcheck_is_clean_on_the_release_and_log_scripts(name, tmp_path):
    path = tmp_path / "script.sh"
    for root, value, excluded in (("/srv/fleet", "v", ""), (f"/srv/{HOSTILE_DIR}", HOSTILE_VALUE,
                                                              "-e SC2016,SC1003,SC2089,SC2090")):
        path.write_text(commands.prelude(root) + scripts(root, value)[name])
        result = subprocess.run(["shellcheck", "-s", "sh", "-S", "style", *excluded.split(), str(path)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_listing_ignores_what_fleet_did_not_write():
    encoded = base64.b64encode(b"not json").decode()
    listing = releases.parse_listing("\n".join([
        "@@release svc 1-1", encoded, "@@end", "@@artifact ../.. unused", "@@artifact " + "b" * 16 + " unused"]))
    assert listing.find("svc", "1-1").manifest is None and "not JSON" in listing.find("svc", "1-1").error
    assert listing.artifacts == {"b" * 16: False}


def test_following_names_a_host_that_stops_answering_and_keeps_reading_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "LOG_STALL_SECONDS", 1)
    hosts = [Host(name=f"h{i}", address="127.0.0.1", connection="local", user="u", port=22, key=None,
                  known_hosts="/dev/null", root=str(tmp_path / f"h{i}"), python=sys.executable) for i in range(2)]
    for host in hosts:
        os.makedirs(os.path.join(host.root, "log"))
        with open(os.path.join(host.root, "log", "svc.log"), "w") as f:
            f.write("started\n")
    fleet = runner.Fleet(runner.Options(lock=False))
    targets = {host: ["svc"] for host in hosts}
    tails = runner.log_tails(fleet, targets, 5)
    assert [(t.host, t.lines) for t in tails] == [("h0", [("svc", "started")]), ("h1", [("svc", "started")])]
    seen = queue.Queue()
    follower = threading.Thread(target=runner.follow_logs, args=(fleet, targets, tails, lambda *line: seen.put(line)),
                                daemon=True)
    session = fleet.link(hosts[0])[0].connection.processes[0].pid
    os.killpg(session, signal.SIGSTOP)  # h0's session hangs: its reads never answer
    try:
        follower.start()
        with open(os.path.join(hosts[1].root, "log", "svc.log"), "a") as f:
            f.write("still read\n")
        lines = [seen.get(timeout=30) for _ in range(2)]
        assert sorted(lines) == [("h0", None, "not answering for 1s (still waiting for it)"),
                                 ("h1", "svc", "still read")]
    finally:
        os.killpg(session, signal.SIGCONT)
        fleet.abort()  # as Ctrl-C does: every connection dropped, the reads end
    follower.join(timeout=30)
    assert not follower.is_alive()
    ended = [seen.get(timeout=5) for _ in range(seen.qsize())]
    assert all(process is None and "stopped following" in why for _, process, why in ended), ended
