"""The generated host scripts, checked without hosts and without root: shellcheck on every one of
them, and real runs under dash (a local "host" under a temp root) with hostile names and values,
a full disk, and a switch whose connection dies while a bad version starts (docs/failure-modes.md,
"The host protocol")."""

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from fleet import commands, connection, facts, hostenv, plan, protocol
from fleet.desired import FileSpec, HostState, ProcessSpec, add_supervisor
from fleet.inventory import Host

STEP = 60  # seconds any step here may take before the session counts as stuck

# A root whose name would run commands if any script forgot to quote it.
HOSTILE_DIR = "my fleet $(touch PWNED) `touch PWNED2` 'q\" ;x"
HOSTILE_VALUE = "a'b\"c $(touch PWNED3) `id` ;|&\n--flag\\"


def host(root):
    return Host(name="h0", address="127.0.0.1", connection="local", user="u", port=22, key=None,
                known_hosts="/dev/null", root=root, python=sys.executable)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener(port, tag):
    """A command that listens on 127.0.0.1:port (tag only changes the fingerprint)."""
    return f"{sys.executable} -m http.server {port} --bind 127.0.0.1 # {tag}"


def state_for(root, config, command, ports, start_timeout=10, tag="v1"):
    state = HostState(host=host(root))
    path = os.path.join(root, "services", "svc", "config.yaml")
    state.files.append(FileSpec(task="svc.role.config", path=path, sha256=str(hash(config)), content=config,
                                mode=0o600, secret=True))
    state.processes.append(ProcessSpec(name="svc", task="svc.role.process", command=command, fingerprint=tag,
                                       ports=tuple(ports), start_timeout=start_timeout, files=(path,)))
    state.tasks += ["svc.role.config", "svc.role.process"]
    add_supervisor(state)
    return state


def all_scripts(root, value):
    state = state_for(root, value.encode(), f"echo {shlex.quote(value)}", [7073])
    report = facts.Report()
    host_plan = plan.plan_host(state, report)
    switch = commands.apply(host_plan, "123-45")
    head = commands.prelude(root)
    return {
        "session": commands.session(root, f"holder {value}"),
        "session --wait-lock": commands.session(root, value, wait=5),
        "session --break-lock": commands.session(root, value, break_lock=True),
        "session, no lock": commands.session(root, value, lock=False),
        "facts": head + commands.facts(state),
        "facts, read-only": head + commands.facts(state, recover=False),
        "apply": head + switch.script,
        "switch": switch.payload[-1].body.content.decode(),
        "stop": head + commands.stop([["envoy-svc"], ["svc", "other"]],
                                     (sys.executable, f"{root}/artifacts/{value}/supervisor.py")),
        "Envoy admin": head + commands.envoy_admin_get(sys.executable, f"{root}/envoy/svc/admin.sock", "/clusters", 5),
    }


@pytest.mark.parametrize("name", list(all_scripts("/srv/x", "v")))
def test_shellcheck_is_clean_on_every_generated_script(name, tmp_path):
    path = tmp_path / "script.sh"
    path.write_text(all_scripts("/srv/fleet", "user@laptop txid=1-2")[name])
    result = subprocess.run(["shellcheck", "-s", "sh", "-S", "style", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    # With hostile values, shellcheck's only remarks may be that quotes, $(...) and backslashes
    # inside a quoted value stay literal (SC2016, SC1003, SC2089, SC2090): they are data, on purpose.
    path.write_text(all_scripts(f"/srv/{HOSTILE_DIR}", HOSTILE_VALUE)[name])
    result = subprocess.run(["shellcheck", "-s", "sh", "-S", "style", "-e", "SC2016,SC1003,SC2089,SC2090", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# -- real runs under dash ---------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path):  # processes started under it are stopped by each test (stop_all)
    work = tmp_path / HOSTILE_DIR
    work.mkdir()
    return str(work / "root")


def open_session(root, lock=True, wait=0):
    conn = connection.LocalConnection(shell="dash")
    shell = conn.start_session(commands.session(root, "test-holder", lock=lock, wait=wait), STEP)
    return conn, shell


def deploy(root, state, txid):
    conn, shell = open_session(root)
    try:
        report = facts.parse(shell.run(commands.facts(state), STEP, "facts").output)
        host_plan = plan.plan_host(state, report)
        switch = commands.apply(host_plan, txid)
        result = shell.run(switch.script, STEP, "apply", payload=switch.payload)
        shell.run(commands.forget_switch(txid), STEP, "forget")
        return result, facts.parse(result.output)
    finally:
        shell.close()
        conn.close()


def stop_all(root, names=("svc",)):
    conn, shell = open_session(root)
    try:
        shell.run(commands.stop([list(names)]), STEP, "stop")
    finally:
        shell.close()
        conn.close()


def assert_nothing_ran(tmp_path):
    for dirpath, _, files in os.walk(tmp_path):
        assert not [f for f in files if f.startswith("PWNED")], dirpath
    assert not [f for f in os.listdir(os.getcwd()) if f.startswith("PWNED")]


def test_hostile_root_and_values_stay_data(root, tmp_path):
    port = free_port()
    state = state_for(root, HOSTILE_VALUE.encode(), listener(port, HOSTILE_VALUE.replace("\n", " ")), [port])
    try:
        result, report = deploy(root, state, "1-1")
        assert result.exit_code == 0, result.output
        assert report.procs["svc"].alive
        config = os.path.join(root, "services", "svc", "config.yaml")
        with open(config, "rb") as f:
            assert f.read() == HOSTILE_VALUE.encode()
        assert_nothing_ran(tmp_path)
        # Private from the moment they exist: umask 077 in every session.
        assert os.stat(config).st_mode & 0o777 == 0o600
        assert os.stat(os.path.join(root, ".lock.holder")).st_mode & 0o777 == 0o600
        assert os.stat(os.path.join(root, "log", "svc.log")).st_mode & 0o777 == 0o640
        assert os.stat(root).st_mode & 0o077 == 0
        assert not os.listdir(os.path.join(root, ".switch"))
    finally:
        stop_all(root)


def test_a_failed_start_shows_only_this_runs_output(root):
    port = free_port()
    good = state_for(root, b"v1", listener(port, "v1"), [port])
    bad = state_for(root, b"v2", "sh -c 'echo this-run-output; exit 3'", [port], tag="v2")
    try:
        assert deploy(root, good, "1-1")[0].exit_code == 0
        with open(os.path.join(root, "log", "svc.log"), "a") as f:
            f.write("an earlier run's output\n")
        result, report = deploy(root, bad, "1-2")
        assert result.exit_code == 1
        assert "this-run-output" in report.logs["svc"]
        assert "earlier run" not in report.logs["svc"]
        assert report.rolled_back == ["svc"]
    finally:
        stop_all(root)


def test_a_failed_hot_restart_keeps_its_own_error_in_what_a_failed_start_shows(root):
    """svc ran under a supervisor without hot restart; the new version asks for one: the reload is
    refused, fleet stops and starts instead, and that start fails too. Both are in the log shown."""
    port = free_port()
    good = state_for(root, b"v1", listener(port, "v1"), [port])
    bad = state_for(root, b"v2", "sh -c 'echo this-run-output; exit 3'", [port], tag="v2")
    bad.processes[0] = dataclasses.replace(bad.processes[0], hot_restart=True)
    try:
        assert deploy(root, good, "1-1")[0].exit_code == 0
        result, report = deploy(root, bad, "1-2")
        assert result.exit_code == 1
        shown = report.logs["svc"]
        assert "fleet hot restart v2" in shown and "start it instead" in shown
        assert "this-run-output" in shown
        assert report.rolled_back == ["svc"]
    finally:
        stop_all(root)


def test_stop_removes_the_shared_memory_a_killed_supervisors_envoy_left(root):
    """A supervisor killed with -9 takes its Envoy along (PDEATHSIG) and removes nothing; the
    region in /dev/shm is the machine's. `fleet stop` removes it, by the base id of the state line.
    (The process here is not an Envoy: the region is made as Envoy would have made it.)"""
    port = free_port()
    hot = state_for(root, b"v1", listener(port, "v1"), [port])
    hot.processes[0] = dataclasses.replace(hot.processes[0], hot_restart=True)
    region = None
    try:
        assert deploy(root, hot, "1-1")[0].exit_code == 0
        with open(os.path.join(root, "run", "svc.state")) as f:
            fields = dict(w.split("=", 1) for w in f.read().split())
        region = f"/dev/shm/envoy_shared_memory_{int(fields['base_id']) * 10}"
        open(region, "w").close()
        os.kill(int(fields["supervisor"]), signal.SIGKILL)
        child = int(fields["pid"])
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.05)
        conn, shell = open_session(root)
        try:
            shell.run(commands.stop([["svc"]], (hot.host.python, hot.supervisor)), STEP, "stop")
        finally:
            shell.close()
            conn.close()
        assert not os.path.exists(region)
    finally:
        if region and os.path.exists(region):
            os.unlink(region)
        stop_all(root)


def test_stop_ends_every_process_of_a_group_at_once(root, tmp_path):
    names = [f"p{i}" for i in range(4)]
    marks = tmp_path / "marks"
    marks.mkdir()
    state = HostState(host=host(root))
    # Each notes its SIGTERM and waits for the last one's: stopped one after another, the first
    # would be killed after the grace before the last was even sent SIGTERM.
    for name in names:
        on_term = (f'touch "$M/{name}.term"; i=0; while [ ! -e "$M/p3.term" ] && [ $i -lt 40 ]; do sleep 0.1; '
                   f'i=$((i+1)); done; [ -e "$M/p3.term" ] && touch "$M/{name}.saw-last"')
        command = f"env M={shlex.quote(str(marks))} sh -c {shlex.quote(f'trap {shlex.quote(on_term)} TERM; while :; do sleep 0.1; done')}"
        state.processes.append(ProcessSpec(name=name, task=f"{name}.t", command=command, fingerprint="x", ports=(),
                                           start_timeout=5))
    state.tasks += [p.task for p in state.processes]
    add_supervisor(state)
    assert deploy(root, state, "1-1")[0].exit_code == 0
    conn, shell = open_session(root)
    try:
        report = facts.parse(shell.run("GRACE=3\n" + commands.stop([names]), STEP, "stop").output)
        assert sorted(report.stopped) == names
        assert sorted(os.listdir(marks)) == sorted([f"{n}.term" for n in names] + [f"{n}.saw-last" for n in names])
        after = facts.parse(shell.run(commands.facts(state), STEP, "facts").output)
        assert not any(p.alive for p in after.procs.values())
    finally:
        shell.close()
        conn.close()


def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    return mount


def test_a_full_disk_is_named_and_the_old_version_keeps_serving(tmp_path):
    mount = small_disk(tmp_path)
    root = str(mount / "root")
    port = free_port()
    try:
        assert deploy(root, state_for(root, b"v1", listener(port, "v1"), [port]), "1-1")[0].exit_code == 0
        big = state_for(root, b"x" * (3 << 20), listener(port, "v2"), [port], tag="v2")
        conn, shell = open_session(root)
        try:
            report = facts.parse(shell.run(commands.facts(big), STEP, "facts").output)
            switch = commands.apply(plan.plan_host(big, report), "1-2")
            result = shell.run(switch.script, STEP, "apply", payload=switch.payload)
            assert result.exit_code == 3
            assert f"{root} has" in result.output and "KB free; this deploy needs" in result.output
            # The session is still in step: the payload was drained, not read as a script.
            after = facts.parse(shell.run(commands.facts(big), STEP, "facts").output)
            assert after.procs["svc"].alive and after.procs["svc"].fingerprint == "v1"
        finally:
            shell.close()
            conn.close()
    finally:
        stop_all(root)
        subprocess.run(["umount", str(mount)])


def test_a_receiver_that_cannot_run_ends_the_session_rather_than_run_the_files(root, tmp_path):
    """The files are read by the host's python; without it, their bytes would stay in the input
    and be taken for the next step's lines. A file that is a script must never run that way."""
    marker = tmp_path / "PWNED4"
    payload = f"touch {marker}\n{protocol.RUN}\n".encode() * 3
    state = state_for(root, payload, f"{sys.executable} -c pass", [])
    broken = HostState(host=dataclasses.replace(state.host, python="/nonexistent/python3"), files=state.files,
                       processes=state.processes, tasks=state.tasks, supervisor=state.supervisor)
    conn, shell = open_session(root)
    try:
        switch = commands.apply(plan.plan_host(broken, facts.Report()), "1-1")
        with pytest.raises(connection.ConnectFailed, match="connection lost during a step: .*python3: not found"):
            shell.run(switch.script, STEP, "apply", payload=switch.payload)
    finally:
        shell.close()
        conn.close()
    assert not marker.exists()


def test_a_step_that_cannot_make_its_directories_still_reads_its_files(root, tmp_path):
    """ROOT/.switch is a file, so the switch directory cannot be made: the step fails, but only
    after its receiver has read the files, which would otherwise be the session's next lines."""
    marker = tmp_path / "PWNED6"
    state = state_for(root, f"touch {marker}\n{protocol.RUN}\n".encode() * 3, f"{sys.executable} -c pass", [])
    os.makedirs(root)
    open(os.path.join(root, ".switch"), "w").close()
    conn, shell = open_session(root)
    try:
        switch = commands.apply(plan.plan_host(state, facts.Report()), "1-1")
        result = shell.run(switch.script, STEP, "apply", payload=switch.payload)
        assert result.exit_code == 3
        assert "Not a directory" in result.output
        after = facts.parse(shell.run(commands.facts(state), STEP, "facts").output)  # still in step
        assert after.procs.get("svc") is None or not after.procs["svc"].alive
    finally:
        shell.close()
        conn.close()
    assert not marker.exists()


@pytest.mark.parametrize("change", ["grown", "shrunk", "gone", "rewritten, same size", "rewritten while sent",
                                    "rewritten after it was hashed"])
def test_a_controller_file_changed_after_it_was_measured_is_neither_placed_nor_run(root, tmp_path, change):
    """The receiver was told the size measured when the step was built; the file changes before
    or while it is sent. Sending it as it is now would leave bytes for the session to read as
    script lines (grown), take the next step's lines as file bytes (shrunk), or place content
    under a name that is not its hash (rewritten): it is not sent (or not finished), the step
    fails naming the file, nothing is placed and the session runs nothing more."""
    marker = tmp_path / "PWNED5"
    source = tmp_path / "artifact.bin"
    source.write_bytes(b"v1" * (3 << 19))  # 3 MB: sent in three blocks
    state = state_for(root, b"v1", f"{sys.executable} -c pass", [])
    placed = os.path.join(root, "artifacts", "0123456789abcdef", "artifact.bin")
    hashed = protocol.file_identity(os.stat(source))  # as artifacts.stamped_sha256 records it
    state.files.append(FileSpec(task="svc.role.artifact", path=placed, sha256="0" * 64, source=str(source),
                                identity=hashed))
    state.tasks.insert(0, "svc.role.artifact")
    if change == "rewritten after it was hashed":  # before the step is built: its size is the same
        time.sleep(0.05)  # past the filesystem's timestamp tick
        source.write_bytes(b"v4" * (3 << 19))
    conn, shell = open_session(root)
    try:
        switch = commands.apply(plan.plan_host(state, facts.Report()), "1-1")
        rewrite = []
        if change == "rewritten while sent":  # in place, same size, after the first block went out
            def rewrite_once(_count):
                if not rewrite:
                    with open(source, "r+b") as f:
                        f.write(f"touch {marker}\n".encode())
                    rewrite.append(True)
        elif change == "grown":
            with open(source, "ab") as f:
                f.write(f"\ntouch {marker}\n{protocol.RUN}\n".encode() * 3)
        elif change == "shrunk":
            source.write_bytes(b"v2")
        elif change == "rewritten, same size":
            time.sleep(0.05)  # past the filesystem's timestamp tick
            source.write_bytes(b"v3" * (3 << 19))
        elif change == "gone":
            source.unlink()
        why = "No such file" if change == "gone" else re.escape(f"{source} changed on the controller")
        with pytest.raises(connection.ConnectFailed, match=f"sending files failed: .*{why}"):
            shell.run(switch.script, STEP, "apply", payload=switch.payload,
                      on_bytes=rewrite_once if change == "rewritten while sent" else None)
        with pytest.raises(connection.ConnectFailed, match="sending files failed"):
            shell.run(commands.facts(state), STEP, "facts")
    finally:
        shell.close()
        conn.close()
    assert not marker.exists()
    assert not os.path.exists(placed)
    assert not os.path.exists(os.path.join(root, "run", "svc.pid"))


def test_a_file_that_did_not_arrive_whole_is_not_left_where_it_was_received(root, tmp_path):
    """Wheels are received into ROOT/wheels, where they stay: a part of one left there would be
    taken for the whole wheel by the next run, and its venv would never build again."""
    source = tmp_path / "dep-1.0-py3-none-any.whl"
    source.write_bytes(b"w" * (3 << 20))
    wheels = tmp_path / "wheels"
    sent = [protocol.Sent.measured(source.name, 0o600, source.name, hostenv.Wheel(source=str(source), name=source.name))]
    step = commands.script(commands.assign("S", str(wheels)), commands.Raw('mkdir -p "$S"'),
                           commands.receive(sys.executable, commands.Raw('"$S"'), sent))
    source.write_bytes(b"w" * (1 << 20))  # shorter than measured: the receiver gets what was sent, then the end
    conn, shell = open_session(root)
    try:
        with pytest.raises(connection.ConnectFailed, match="sending files failed"):
            shell.run(step, STEP, "wheels", payload=sent)
    finally:
        shell.close()
        conn.close()
    assert wheels.is_dir() and not os.listdir(wheels)


def test_steps_run_in_the_root_not_where_the_login_started(root, tmp_path, monkeypatch):
    """`python -c` imports from its working directory first: a module a local user left in the
    login's home, or where fleet ran locally, is never what a step imports."""
    (tmp_path / "json.py").write_text(f"open({str(tmp_path / 'PWNED5')!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)  # where the local session starts
    conn = connection.LocalConnection(shell="dash")
    shell = conn.start_session(commands.session(root, "test-holder"), STEP)
    try:
        result = shell.run(commands.script(commands.Raw("pwd; python3 -S -c 'import json'")), STEP, "step")
    finally:
        shell.close()
        conn.close()
    assert result.exit_code == 0 and result.output.splitlines()[0] == root
    assert not (tmp_path / "PWNED5").exists()


# -- a switch that outlives its connection ---------------------------------------------------------

def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.1)


def pid_in(root, name="svc"):
    try:
        with open(os.path.join(root, "run", f"{name}.pid")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def serving(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_switch(root, state, txid):
    """Starts an apply and returns once the host runs the switch; the caller then cuts it off."""
    conn, shell = open_session(root)
    report = facts.parse(shell.run(commands.facts(state), STEP, "facts").output)
    switch = commands.apply(plan.plan_host(state, report), txid)
    shell._write(protocol.frame(switch.script))
    for sent in switch.payload:
        shell._write(sent.body.content)
    wait_for(lambda: os.path.exists(os.path.join(root, ".switch", txid, "journal")), 20, "the switch to start")
    return conn


def test_a_dropped_connection_mid_switch_still_rolls_back(root):
    port = free_port()
    try:
        assert deploy(root, state_for(root, b"v1", listener(port, "v1"), [port]), "1-1")[0].exit_code == 0
        old = pid_in(root)
        never_listens = state_for(root, b"v2", "sleep 300", [port], start_timeout=2, tag="v2")
        conn = start_switch(root, never_listens, "1-2")
        conn.close()  # the controller is gone (Ctrl-C, kill -9, network)
        # The host finishes on its own: the previous version serves again, no fleet command run.
        wait_for(lambda: pid_in(root) not in (None, old) and serving(port), 30, "the rollback")
        with open(os.path.join(root, "services", "svc", "config.yaml"), "rb") as f:
            assert f.read() == b"v1"
        wait_for(lambda: os.path.exists(os.path.join(root, ".switch", "1-2", "outcome")), 10, "the outcome")
        # The next run reports how that switch ended, then has nothing to change.
        conn, shell = open_session(root)
        try:
            v1 = state_for(root, b"v1", listener(port, "v1"), [port])
            report = facts.parse(shell.run(commands.facts(v1), STEP, "facts").output)
            assert not plan.plan_host(v1, report).changed
        finally:
            shell.close()
            conn.close()
        assert report.switches == [("1-2", "ended while no controller was connected (failed, exit 1; see the "
                                           "host's log)")]
        assert not os.listdir(os.path.join(root, ".switch"))
    finally:
        stop_all(root)


def test_a_switch_killed_mid_way_is_rolled_back_by_the_next_run(root):
    port = free_port()
    try:
        assert deploy(root, state_for(root, b"v1", listener(port, "v1"), [port]), "1-1")[0].exit_code == 0
        slow = state_for(root, b"v2", "sleep 300", [port], start_timeout=30, tag="v2")
        old = pid_in(root)
        conn = start_switch(root, slow, "1-2")
        wait_for(lambda: pid_in(root) not in (None, old), 20, "the new version to start")
        # The host itself loses the switch (a reboot, an OOM kill): nothing finished it.
        out = subprocess.run(["pgrep", "-f", "switch.sh"], capture_output=True, text=True).stdout.split()
        # The switch and what it runs (not the services); its forks (command substitutions) carry
        # the same command line, so the group is named by its leader.
        groups = set()
        for pid in out:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if os.path.join(root, ".switch", "1-2").encode() in f.read():
                        groups.add(os.getpgid(int(pid)))
            except OSError:
                pass  # a fork that ended meanwhile
        assert len(groups) == 1, groups
        os.killpg(groups.pop(), signal.SIGKILL)
        conn.close()
        # The killed switch's processes may hold the lock a moment longer, as they die.
        conn, shell = open_session(root, wait=10)
        try:
            report = facts.parse(shell.run(commands.facts(slow), STEP, "facts").output)
        finally:
            shell.close()
            conn.close()
        assert ("1-2", "was cut off mid-switch; rolled back to the previous version") in report.switches
        assert report.procs["svc"].alive and report.procs["svc"].fingerprint == "v1"
        with open(os.path.join(root, "services", "svc", "config.yaml"), "rb") as f:
            assert f.read() == b"v1"
    finally:
        stop_all(root)


@pytest.mark.parametrize("systemd_pid1, expected", [(True, True), (False, False)])
def test_the_facts_step_tells_hosts_that_run_systemd(root, tmp_path, systemd_pid1, expected):
    """systemd as PID 1 is told by /run/systemd/system and a systemctl on PATH."""
    out = run_as_if_systemd(root, tmp_path, systemd_pid1, "report_init")
    assert out.returncode == 0, out.stderr
    assert facts.parse(out.stdout).systemd is expected


def run_as_if_systemd(root, tmp_path, systemd_pid1, body):
    """The prelude and `body` under dash, where /run/systemd/system exists if systemd_pid1 and a
    systemctl is on PATH. This machine has neither as a systemd host would: a private mount
    namespace with /run on a tmpfs fakes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "systemctl").chmod(0o755)
    script = tmp_path / "script.sh"
    script.write_text(commands.prelude(root) + body + "\n")
    setup = "mount -t tmpfs tmpfs /run && " + ("mkdir -p /run/systemd/system && " if systemd_pid1 else "")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f'{setup}PATH="$1:$PATH" exec dash "$2"', "sh", str(bin_dir), str(script)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("systemd_pid1, unit_file, expected", [
    (True, True, "unit"), (True, False, "supervisor"), (False, True, "supervisor")])
def test_a_process_runs_as_a_unit_only_where_systemd_can_take_it(root, tmp_path, systemd_pid1, unit_file, expected):
    """start_proc's choice (`by_unit`): a unit for the process (ROOT/units/NAME.service) and a
    host that runs systemd, as root here (tests/test_systemd_hosts.py runs both kinds of login
    on real systemd hosts)."""
    if unit_file:
        os.makedirs(os.path.join(root, "units"))
        open(os.path.join(root, "units", "svc.service"), "w").close()
    out = run_as_if_systemd(root, tmp_path, systemd_pid1, "if by_unit svc; then echo unit; else echo supervisor; fi")
    assert (out.returncode, out.stdout) == (0, expected + "\n"), out.stderr


@pytest.mark.parametrize("grep_has_z", [True, False])
def test_alive_matches_a_whole_environment_entry_only(root, tmp_path, grep_has_z):
    """`alive` takes only this user's processes, and reads a process's environment entry by entry:
    a value with a newline in it cannot pass for the FLEET_PROC entry, with a grep that has -z or
    (the fallback) one that has not."""
    marker = f"FLEET_PROC={root}/svc"
    env_path = os.environ["PATH"]
    if not grep_has_z:  # a grep that, like some small ones, rejects -z (exit 2)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "grep").write_text('#!/bin/sh\nfor a; do case $a in -*z*) exit 2 ;; esac; done\nexec /bin/grep "$@"\n')
        (bin_dir / "grep").chmod(0o755)
        env_path = f"{bin_dir}:{env_path}"
    ours = subprocess.Popen(["sleep", "30"], env={"PATH": env_path, "FLEET_PROC": f"{root}/svc"})
    posing = subprocess.Popen(["sleep", "30"], env={"PATH": env_path, "X": f"a\n{marker}", "FLEET_PROC": f"{root}/other"})
    # Another user's process that carries the marker itself (the session here is root's).
    foreign = subprocess.Popen(["sleep", "30"], env={"PATH": env_path, "FLEET_PROC": f"{root}/svc"}, user="nobody")
    try:
        pids = [ours.pid, posing.pid, foreign.pid]
        check = commands.script(commands.prelude(root), commands.Raw(
            f'for p in {" ".join(map(str, pids))}; do if alive "$p" svc; then echo "$p yes"; else echo "$p no"; fi; done'))
        out = subprocess.run(["sh", "-c", str(check)], capture_output=True, text=True, env={"PATH": env_path})
        assert out.stdout.split("\n")[:3] == [f"{ours.pid} yes", f"{posing.pid} no", f"{foreign.pid} no"], out.stderr
    finally:
        for proc in (ours, posing, foreign):
            proc.kill()
            proc.wait()
