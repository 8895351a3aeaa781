"""The host-side supervisor, with real processes under a temporary root and on a namespace host
over SSH. Every wait is bounded; durations are never asserted, only what was recorded."""

import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import grpc
import pytest

from fleet import artifacts, supervisor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.conftest import alive, open_files

SUPERVISOR = os.path.abspath(supervisor.__file__)
# The supervisor runs with a host's own python3, beside which neither fleet nor its
# dependencies are installed: Debian's, as on the hosts.
HOST_PYTHON = "/usr/bin/python3"
LAB_HOSTS = 1


def run(*args, timeout=30):
    return subprocess.run([HOST_PYTHON, SUPERVISOR, *args], capture_output=True, text=True, timeout=timeout)


def fields(line):
    return supervisor.parse_state(line)


def wait_for(predicate, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Root:
    """A temporary host root; whatever a test started under it is stopped at the end."""

    def __init__(self, path):
        self.path = str(path)
        self.names = set()

    def start(self, name, *command, options=()):
        self.names.add(name)
        proc = run("start", self.path, name, *options, "--", *command)
        assert proc.returncode == 0, proc.stderr
        return fields(proc.stdout)

    def status(self, name):
        proc = run("status", self.path, name)
        return fields(proc.stdout), proc.returncode

    def stop(self, name, grace=5):
        proc = run("stop", self.path, name, "--grace", str(grace), timeout=grace + 30)
        assert proc.returncode == 0, proc.stderr
        return fields(proc.stdout)

    def file(self, *parts):
        return os.path.join(self.path, *parts)

    def read(self, *parts):
        with open(self.file(*parts)) as f:
            return f.read()

    def cleanup(self):
        for name in self.names:
            run("stop", self.path, name, "--grace", "1")
            pid = supervisor.read_pid(self.file("run", f"{name}.sup"))
            if pid and alive(pid):  # stop failed: never leave a supervisor behind
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def root(tmp_path):
    r = Root(tmp_path / "root")
    yield r
    r.cleanup()


SLEEPER = [sys.executable, "-c", "import time\nprint('up', flush=True)\nwhile True: time.sleep(1)"]


def test_a_killed_child_is_restarted_with_its_exit_reason_recorded(root):
    first = root.start("svc", *SLEEPER)
    assert first["state"] == "running"
    old = int(first["pid"])
    os.kill(old, signal.SIGKILL)
    state = wait_for(lambda: (lambda s: s if s["pid"] not in ("-", str(old)) else None)(root.status("svc")[0]),
                     what="a new child pid")
    assert state["state"] == "running"
    assert state["restarts"] == "1"
    assert state["last_exit"] == "SIGKILL"
    new = int(state["pid"])
    assert root.read("run", "svc.pid").strip() == str(new)
    # The new child is marked as fleet's and runs in the root, like the one before.
    with open(f"/proc/{new}/environ", "rb") as f:
        assert f"FLEET_PROC={root.path}/svc".encode() in f.read().split(b"\0")
    assert os.readlink(f"/proc/{new}/cwd") == root.path
    assert root.status("svc")[1] == 0


def test_a_command_that_keeps_exiting_backs_off_instead_of_looping(root):
    root.start("crash", "sh", "-c", "exit 3",
               options=["--backoff-min", "0.1", "--backoff-max", "0.8", "--stable", "60"])
    delays = []

    def reached_max():
        state = root.status("crash")[0]
        if state["state"] == "backoff" and (not delays or delays[-1] != state["delay"]):
            delays.append(state["delay"])
        return state if state["delay"] == "0.8" else None

    state = wait_for(reached_max, what="the longest backoff")
    assert state["last_exit"] == "exit:3"
    # Each recorded delay doubles the one before (polling may miss some), up to the cap.
    values = [float(d) for d in delays]
    assert values == sorted(values) and set(values) <= {0.1, 0.2, 0.4, 0.8}
    # At the cap, a window of 2 s holds at most a few restarts: no tight loop.
    before = int(state["restarts"])
    time.sleep(2)
    after = int(root.status("crash")[0]["restarts"])
    assert 1 <= after - before <= 4


def test_a_run_longer_than_stable_resets_the_backoff(root):
    root.start("flaky", "sh", "-c", "sleep 0.4; exit 1",
               options=["--backoff-min", "0.1", "--backoff-max", "5", "--stable", "0.2"])
    seen = set()

    def some_restarts():
        state = root.status("flaky")[0]
        if state["state"] == "backoff":
            seen.add(state["delay"])
        return int(state["restarts"]) >= 4

    wait_for(some_restarts, what="4 restarts")
    assert seen <= {"0.1"}, seen


def test_a_command_that_cannot_be_executed_is_recorded_and_retried(root):
    state = root.start("missing", "/nonexistent/binary", options=["--backoff-min", "0.1", "--backoff-max", "0.2"])
    assert state["state"] == "backoff"
    assert state["last_exit"] == "exec:ENOENT"
    wait_for(lambda: int(root.status("missing")[0]["restarts"]) >= 2, what="retries")


GRACEFUL = [sys.executable, "-c", """
import signal, sys, time
def term(*_):
    print('got SIGTERM', flush=True)
    time.sleep(1)
    print('drained', flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print('up', flush=True)
while True: time.sleep(1)
"""]


def test_stop_sends_sigterm_and_gives_the_child_its_grace(root):
    child = int(root.start("graceful", *GRACEFUL)["pid"])
    sup = supervisor.read_pid(root.file("run", "graceful.sup"))
    # A whole line: the supervisor's own "== ... supervisor: ..." lines contain "up" too.
    wait_for(lambda: "up" in root.read("log", "graceful.log").splitlines(), what="the child's first line")
    state = root.stop("graceful", grace=10)
    assert state["state"] == "stopped"
    assert state["last_exit"] == "exit:0"
    log = root.read("log", "graceful.log")
    assert "got SIGTERM" in log and "drained" in log
    assert not alive(child) and not alive(sup)
    assert not os.path.exists(root.file("run", "graceful.pid"))
    assert root.status("graceful") == (state, supervisor.NOT_RUNNING)


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(root):
    child = int(root.start("stubborn", "sh", "-c", "trap '' TERM; echo trapped; while :; do sleep 0.1; done")["pid"])
    wait_for(lambda: "trapped" in root.read("log", "stubborn.log").splitlines(), what="the trap in place")
    state = root.stop("stubborn", grace=1)
    assert state["last_exit"] == "SIGKILL"
    assert not alive(child)
    assert "grace over: SIGKILL" in root.read("log", "stubborn.log")


def test_stop_of_a_name_never_started_succeeds_and_touches_nothing(root):
    assert root.stop("never")["state"] == "absent"
    assert root.status("never") == ({"name": "never", "state": "absent"}, supervisor.NOT_RUNNING)


def test_a_supervisor_killed_with_sigkill_takes_its_child_along(root):
    child = int(root.start("svc", *SLEEPER)["pid"])
    sup = supervisor.read_pid(root.file("run", "svc.sup"))
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: not alive(child), what="the child to die with its supervisor (PR_SET_PDEATHSIG)")
    state, code = root.status("svc")
    assert (state["state"], state["pid"], code) == ("dead", "-", supervisor.NOT_RUNNING)
    # The next start brings it back.
    assert root.start("svc", *SLEEPER)["state"] == "running"


def test_a_second_start_of_a_supervised_name_is_refused(root):
    root.start("svc", *SLEEPER)
    proc = run("start", root.path, "svc", "--", *SLEEPER)
    assert proc.returncode == 1 and "already supervised" in proc.stderr


def test_start_takes_over_from_an_unsupervised_process_of_the_same_name(root):
    """A service started by an older fleet (setsid, FLEET_PROC marker, pid file) holds its
    ports: start stops it before running the new one."""
    os.makedirs(root.file("run"))
    env = dict(os.environ, FLEET_PROC=f"{root.path}/svc")
    old = subprocess.Popen(SLEEPER, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    with open(root.file("run", "svc.pid"), "w") as f:
        f.write(f"{old.pid}\n")
    try:
        state = root.start("svc", *SLEEPER, options=["--grace", "2"])
        assert old.wait(timeout=10) == -signal.SIGTERM
        assert int(state["pid"]) != old.pid
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


def test_the_supervisor_leaves_the_callers_session_lock_and_stdin(root, tmp_path):
    lock = str(tmp_path / "deploy.lock")
    # As fleet's host script does: fd 9 holds the deploy lock while start runs.
    script = 'exec 9>>"$1"; flock -n 9 || exit 9; shift; exec "$@"'
    proc = subprocess.run(["sh", "-c", script, "sh", lock, HOST_PYTHON, SUPERVISOR, "start", root.path, "svc",
                           "--", *SLEEPER], capture_output=True, text=True, timeout=30)
    root.names.add("svc")
    assert proc.returncode == 0, proc.stderr
    sup = supervisor.read_pid(root.file("run", "svc.sup"))
    child = int(fields(proc.stdout)["pid"])
    for pid in (sup, child):
        assert lock not in open_files(pid)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    with open(f"/proc/{child}/status") as f:
        ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    assert not ignored & (1 << (signal.SIGHUP - 1))  # the service gets default signal handling
    assert os.getsid(sup) == sup != os.getsid(0)
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone still held it


def test_the_log_is_rotated_by_size(root):
    line = "x" * 99
    command = [sys.executable, "-c", f"for i in range(300): print('{line}', flush=True)\nprint('la' + 'st', flush=True)\n"
                                     "import time\nwhile True: time.sleep(1)"]
    root.start("chatty", *command, options=["--log-max-bytes", "2000", "--log-keep", "2"])

    def current_log():
        try:
            return root.read("log", "chatty.log")
        except FileNotFoundError:  # between the rename of a rotation and the new file
            return ""

    wait_for(lambda: "\nlast\n" in current_log(), what="the last line in the current log")
    names = sorted(n for n in os.listdir(root.file("log")) if n.startswith("chatty"))
    assert names == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    for name in names:
        st = os.stat(root.file("log", name))
        assert st.st_size <= 2000
        assert stat.S_IMODE(st.st_mode) == 0o640
    for name in os.listdir(root.file("run")):
        assert stat.S_IMODE(os.stat(root.file("run", name)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root.file("run")).st_mode) == 0o700


@pytest.mark.parametrize("args", [
    ["start", "/tmp/x", "../etc", "--", "true"],
    ["start", "relative/root", "svc", "--", "true"],
    ["start", "/tmp/x", "svc"],
    ["start", "/tmp/x", "svc", "--grace", "-1", "--", "true"],
    ["start", "/tmp/x", "svc", "--log-max-bytes", "0", "--", "true"],
    ["status", "/tmp/x", "svc", "--", "true"],
])
def test_bad_arguments_exit_2_with_one_line_and_create_nothing(tmp_path, args):
    args = [a.replace("/tmp/x", str(tmp_path / "x")) for a in args]
    proc = run(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


def test_a_supervisor_started_over_ssh_outlives_the_session(lab):
    host = lab.host("h0")
    ssh = ["ssh", "-i", lab.client_key, "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "StrictHostKeyChecking=yes",
           "-o", "BatchMode=yes", f"root@{host.address}"]
    remote_root = "/srv/supervised"

    def remote(*args):
        proc = subprocess.run([*ssh, HOST_PYTHON, SUPERVISOR, *args], capture_output=True, text=True, timeout=60)
        return fields(proc.stdout), proc

    started, proc = remote("start", remote_root, "svc", "--", "sleep", "600")
    assert proc.returncode == 0, proc.stderr
    sup = supervisor.read_pid(os.path.join(host.srv, "supervised", "run", "svc.sup"))
    try:
        # The session that started it is over; a new one finds it running and restarts a kill.
        child = int(started["pid"])
        assert alive(sup) and alive(child)
        lab.exec("h0", "kill", "-9", str(child))

        def restarted():
            state = remote("status", remote_root, "svc")[0]
            return state if state["state"] == "running" and state["restarts"] == "1" else None

        status = wait_for(restarted, timeout=30, what="a restart seen over ssh")
        assert status["last_exit"] == "SIGKILL"
        assert remote("stop", remote_root, "svc", "--grace", "2")[0]["state"] == "stopped"
        assert not alive(sup)
    finally:
        if alive(sup):
            os.kill(sup, signal.SIGKILL)


def test_fleets_inference_service_under_the_supervisor(root, tmp_path):
    """The real service artifact: restarted after kill -9 and serving again; stop drains it
    (health NOT_SERVING, then finish) and records a clean exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "inference.yaml"
    config.write_text(f"servicePort: {port}\nbindAddress: 127.0.0.1\nmodelParallelism: 1\ndrainSeconds: 0.5\n")
    artifact = artifacts.resolve("builtin:services", ".").path
    first = int(root.start("inference", sys.executable, artifact, "inference", "-c", str(config))["pid"])

    def serving_pid(other_than=None):
        state = root.status("inference")[0]
        if state["state"] != "running" or state["pid"] == str(other_than):
            return None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return None
        return int(state["pid"]) if reply.status == health_pb2.HealthCheckResponse.SERVING else None

    assert wait_for(serving_pid, timeout=30, what="the service serving") == first
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: serving_pid(other_than=first), timeout=30, what="the restarted service serving")
    state = root.stop("inference", grace=15)
    assert state["last_exit"] == "exit:0"
    log = root.read("log", "inference.log")
    assert log.count("draining: health NOT_SERVING") == 1 and log.rstrip().endswith("supervisor: stopped")


ENVOY_BOOTSTRAP = """admin:
  address: {{pipe: {{path: {admin}, mode: 0600}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"""


class HttpLoad:
    """Requests to 127.0.0.1:port as fast as one thread goes, each on a new connection (a listener
    handed over with a request in its accept queue would show up here), until stopped."""

    def __init__(self, port):
        import threading
        self.port, self.sent, self.failed, self.bodies = port, 0, [], set()
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        import http.client
        while self.running:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                self.bodies.add(response.read().decode())
                if response.status != 200:
                    self.failed.append(f"status {response.status}")
            except OSError as e:
                self.failed.append(repr(e))
            finally:
                connection.close()
            self.sent += 1

    def stop(self):
        self.running = False
        self.thread.join(10)


def envoy_command(directory, port, parent_shutdown):
    """command(body, config_name=None): an Envoy answering `body` on 127.0.0.1:port, as fleet's
    role runs it (epoch, base id and hot-restart sockets from the supervisor)."""
    envoy = artifacts.resolve("builtin:envoy", ".").path

    def command(body, config_name=None):
        config = directory / (config_name or f"{body}.yaml")
        if config_name is None:
            config.write_text(ENVOY_BOOTSTRAP.format(admin=directory / "admin.sock", port=port, body=body))
        return ["sh", "-c", f'exec {envoy} -c {config} --restart-epoch "$FLEET_RESTART_EPOCH" '
                            '--base-id "$FLEET_BASE_ID" --socket-path "$FLEET_HOT_RESTART_SOCKET" --socket-mode 600 '
                            f'--drain-time-s 1 --parent-shutdown-time-s {parent_shutdown} -l warn']
    return command


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def base_id_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"FLEET_BASE_ID"])


def test_a_hot_restart_hands_envoy_over_to_its_next_epoch_without_a_failed_request(root, tmp_path):
    """reload starts the next epoch beside the running Envoy (no moment without a listener), the
    old one's exit is not a crash; a next epoch that cannot start leaves the old one serving; stop
    ends them all and removes Envoy's shared memory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    command = envoy_command(tmp_path, port, parent_shutdown=2)
    first = root.start("envoy", *command("v1"), options=("--hot-restart",))
    assert first["epoch"] == "0"
    old = int(first["pid"])
    base = base_id_of(old)
    wait_for(lambda: os.path.exists(supervisor.shared_memory(base)), what="Envoy's shared memory")
    # The load counts failures from the first request: it starts once Envoy listens (on a busy
    # machine Envoy takes a while to, and those refusals are not the hand-over's).
    wait_for(lambda: accepts(port), what="Envoy listening")
    load = HttpLoad(port)
    try:
        wait_for(lambda: "v1" in load.bodies, what="v1 answering")
        proc = run("reload", root.path, "envoy", "--", *command("v2"))
        assert proc.returncode == 0, proc.stderr
        state = fields(proc.stdout)
        new = int(state["pid"])
        assert new != old and state["epoch"] == "1" and state["reloads"] == "1"
        wait_for(lambda: not alive(old), timeout=15, what="the old epoch to exit after its drain")
        wait_for(lambda: "v2" in load.bodies, what="v2 answering")
        state, code = root.status("envoy")
        assert code == 0 and state["pid"] == str(new) and state["restarts"] == "0" and state["last_exit"] == "-"

        # A next epoch that cannot start (its config is missing): the running one serves on.
        proc = run("reload", root.path, "envoy", "--", *command("v3", config_name="missing.yaml"))
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: root.status("envoy")[0]["pid"] == str(new) and root.status("envoy")[0]["reloads"] == "2",
                 what="epoch 1 to be the child again")
        time.sleep(1)  # still serving after what would have been the failed epoch's take-over
        assert alive(new) and root.status("envoy")[0]["state"] == "running"
    finally:
        load.stop()
    assert load.sent > 100 and load.failed == [], (load.sent, load.failed[:5])
    assert load.bodies == {"v1", "v2"}
    assert "serves on" in root.read("log", "envoy.log")
    # Its hot-restart sockets are files under ROOT/run, only the running epoch's left, mode 0600.
    sockets = sorted(f for f in os.listdir(root.file("run")) if f.startswith("envoy.hot-restart_"))
    assert sockets and all(f.endswith(f"_{base * 10 + 1}") for f in sockets), sockets
    assert all(stat.S_IMODE(os.stat(root.file("run", f)).st_mode) == 0o600 for f in sockets)
    state = root.stop("envoy")
    assert state["state"] == "stopped" and not alive(new)
    assert not os.path.exists(supervisor.shared_memory(base))
    assert not [f for f in os.listdir(root.file("run")) if f.startswith("envoy.hot-restart_")]


@pytest.mark.parametrize("then", ["start", "stop"])
def test_what_a_killed_supervisors_envoy_left_in_dev_shm_goes_at_the_next_start_or_stop(root, tmp_path, then):
    """SIGKILL to the supervisor: its Envoy follows (PDEATHSIG) and nothing removes the Envoy's
    region in /dev/shm, which is the machine's. The next start or stop of the name does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = envoy_command(tmp_path, port, parent_shutdown=2)
    first = root.start("envoy", *command("v1"), options=("--hot-restart",))
    envoy, base = int(first["pid"]), base_id_of(int(first["pid"]))
    assert first["base_id"] == str(base)
    wait_for(lambda: os.path.exists(supervisor.shared_memory(base)), what="Envoy's shared memory")
    os.kill(int(first["supervisor"]), signal.SIGKILL)
    wait_for(lambda: not alive(envoy), what="the Envoy to follow its supervisor")
    assert os.path.exists(supervisor.shared_memory(base))  # left behind
    if then == "start":
        again = root.start("envoy", *command("v1"), options=("--hot-restart",))
        assert not os.path.exists(supervisor.shared_memory(base))
        assert again["base_id"] != str(base)
        wait_for(lambda: os.path.exists(supervisor.shared_memory(int(again["base_id"]))), what="the new region")
        root.stop("envoy")
        assert not os.path.exists(supervisor.shared_memory(int(again["base_id"])))
    else:
        assert root.stop("envoy")["state"] == "dead"
        assert not os.path.exists(supervisor.shared_memory(base))
    assert not [f for f in os.listdir(root.file("run")) if f.startswith("envoy.hot-restart_")]


def test_a_new_epoch_that_dies_after_taking_over_is_replaced_by_a_fresh_envoy(root, tmp_path):
    """The old epoch handed its listeners over and drains; only the new one would have told it to
    exit. When the new one dies, the old one serves nothing: the supervisor ends it and starts
    afresh at epoch 0, with a new base id, and the listener answers again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = envoy_command(tmp_path, port, parent_shutdown=60)
    old = int(root.start("envoy", *command("v1"), options=("--hot-restart",))["pid"])
    wait_for(lambda: supervisor.holds_listener(old), what="epoch 0 listening")
    old_base = base_id_of(old)
    new = int(fields(run("reload", root.path, "envoy", "--", *command("v2")).stdout)["pid"])
    wait_for(lambda: supervisor.holds_listener(new) and not supervisor.holds_listener(old), timeout=20,
             what="the new epoch to take the listeners over")
    os.kill(new, signal.SIGKILL)
    wait_for(lambda: not alive(old), timeout=20, what="the drained epoch ended")
    state = wait_for(lambda: (lambda st: st if st["state"] == "running" and st["epoch"] == "0" else None)(
        root.status("envoy")[0]), timeout=20, what="a fresh epoch 0")
    fresh = int(state["pid"])
    wait_for(lambda: supervisor.holds_listener(fresh), what="the fresh Envoy listening")
    assert state["last_exit"] == "SIGKILL" and state["restarts"] == "1"
    assert base_id_of(fresh) != old_base  # a new run of epochs, a new region
    assert "had handed its listeners over" in root.read("log", "envoy.log")


def test_reload_of_a_process_without_hot_restart_is_refused_with_exit_3(root):
    root.start("plain", *SLEEPER)
    proc = run("reload", root.path, "plain", "--", *SLEEPER)
    assert proc.returncode == 3 and "start it instead" in proc.stderr
    proc = run("reload", root.path, "never-started", "--", *SLEEPER)
    assert proc.returncode == 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Binds at once and listens only after a while, on a descriptor number reused for a new socket:
# what `listening` must still see, though the process's descriptors look the same by then.
LATE_LISTENER = """
import socket, sys, time
port = int(sys.argv[1])
probe = socket.socket()
time.sleep(0.3)
fd = probe.fileno()
probe.close()
s = socket.socket()
assert s.fileno() == fd
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
time.sleep(0.8)
s.listen()
time.sleep(60)
"""


def test_listening_waits_for_the_started_process_on_every_port_and_says_why_not(root):
    port, other = free_port(), free_port()
    state = root.start("late", sys.executable, "-c", LATE_LISTENER, str(port))
    with open(root.file("run", "late.started"), "w") as f:  # what fleet's host script writes
        f.write(state["spawned"] + "\n")
    assert run("listening", root.path, "late", "--timeout", "10", str(port)).returncode == 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    # Listening on one of two ports is not enough; the wait is bounded.
    proc = run("listening", root.path, "late", "--timeout", "1", str(port), str(other))
    assert proc.returncode == 1 and proc.stdout == f"not listening on port(s) {port} {other} after 1s\n"
    # Another process on the port does not count for this one.
    with open(root.file("run", "late.started"), "w") as f:
        f.write(f"{os.getpid()}\n")
    assert run("listening", root.path, "late", "--timeout", "1", str(port)).returncode == 1
    # A process that is gone, or was never started.
    with open(root.file("run", "late.started"), "w") as f:
        f.write("\n")
    proc = run("listening", root.path, "late", str(port))
    assert proc.returncode == 1 and proc.stdout == "exited before listening\n"
    assert run("listening", root.path, "late", "70000").returncode == 2


def test_another_users_process_with_the_marker_is_not_taken_for_ours():
    marker = "FLEET_PROC=/srv/fleet/svc"
    ours = subprocess.Popen(["sleep", "30"], env={"FLEET_PROC": "/srv/fleet/svc"})
    foreign = subprocess.Popen(["sleep", "30"], env={"FLEET_PROC": "/srv/fleet/svc"}, user="nobody")
    try:
        assert supervisor.carries(ours.pid, marker) and not supervisor.carries(foreign.pid, marker)
    finally:
        for proc in (ours, foreign):
            proc.kill()
            proc.wait()


def test_start_with_listen_waits_for_the_process_it_began_and_answers_on_a_second_line(root):
    port, other = free_port(), free_port()
    root.names.update({"late", "never"})
    proc = run("start", root.path, "late", "--listen", "10", str(port), "--", sys.executable, "-c", LATE_LISTENER, str(port))
    state_line, answer = proc.stdout.splitlines()
    assert proc.returncode == 0 and fields(state_line)["state"] == "running" and answer == "ok"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    # A process that never listens there: the answer says so, within the bound.
    proc = run("start", root.path, "never", "--listen", "1", str(other), "--", *SLEEPER)
    assert proc.returncode == 0 and proc.stdout.splitlines()[1] == f"not listening on port(s) {other} after 1s"
    # Ports are only what --listen waits for.
    assert run("start", root.path, "stray", str(port), "--", *SLEEPER).returncode == 2
