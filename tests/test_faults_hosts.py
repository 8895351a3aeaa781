"""Faults on real hosts: unreachable hosts, bad keys, failing steps, interrupted and concurrent
deploys, stale locks, killed processes, secrets, and a backend killed under load. Each test
matches a row of docs/failure-modes.md."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml

from friesian_services.inference import encode_instances
from friesian_services.proto import feature_pb2, feature_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from tests.load import Load
from tests.conftest import REPO, deployed, inference_inventory, kill_unsupervised, run_fleet, write_inventory


LAB_HOSTS = 3


@pytest.fixture(scope="module")
def base(lab, tmp_path_factory):
    return deployed(tmp_path_factory, inference_inventory(lab))


def variant(tmp_path, data):
    return write_inventory(tmp_path, data, name="variant.yaml")


def srv(lab, host, *parts):
    return os.path.join(lab.host(host).srv, "fleet", *parts)


def pid_of(lab, host, proc):
    with open(srv(lab, host, "run", f"{proc}.pid")) as f:
        return int(f.read())


def predict(lab, timeout=10):
    with grpc.insecure_channel(f"{lab.host('h0').address}:8083") as channel:
        reply = ranking_pb2_grpc.RankingStub(channel).doPredict(
            ranking_pb2.Content(encodedStr=encode_instances([[0.1] * 8])), timeout=timeout)
    return reply.predictStr


def host_line(stdout, host):
    return [l for l in stdout.splitlines() if l.startswith(f"│ {host} ")]


# -- hosts that cannot be reached or trusted -------------------------------------------------------

def test_unreachable_host_is_reported_and_the_others_proceed(lab, base):
    lab.stop_sshd("h1")
    try:
        result = run_fleet("deploy", "inference", "-i", base)
        assert result.returncode == 1
        assert f"unreachable: {lab.host('h1').address}:22: Connection refused" in result.stdout
        assert re.search(r"│ h0 +│ \d+ +│ 0 +│ 0 +│ 2/2", result.stdout)  # h0 was deployed and verified
    finally:
        lab.start_sshd("h1")
    again = run_fleet("deploy", "inference", "-i", base)
    assert again.returncode == 0, again.stdout + again.stderr


def test_refused_key_is_reported(lab, base, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    data = yaml.safe_load(open(base))
    data["hosts"]["h1"]["key"] = str(tmp_path / "other")
    result = run_fleet("deploy", "inference", "-i", variant(tmp_path, data))
    assert result.returncode == 1
    assert f"authentication refused for root@{lab.host('h1').address}" in result.stdout


def test_changed_host_key_is_never_accepted(lab, base, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = open(tmp_path / "impostor.pub").read().split()[1]
    known = open(lab.known_hosts).read()
    h1 = lab.host("h1").address
    forged = re.sub(rf"^{re.escape(h1)} ssh-ed25519 \S+$", f"{h1} ssh-ed25519 {impostor}", known, flags=re.M)
    (tmp_path / "known_hosts").write_text(forged)
    data = yaml.safe_load(open(base))
    for host in data["hosts"].values():
        host["known_hosts"] = str(tmp_path / "known_hosts")
    result = run_fleet("deploy", "inference", "--accept-new-host-keys", "-i", variant(tmp_path, data))
    assert result.returncode == 1
    assert f"host key mismatch: {h1} presented a ssh-ed25519 key that does not match" in result.stdout
    assert (tmp_path / "known_hosts").read_text() == forged


def test_new_host_keys_are_accepted_only_when_asked(lab, base, tmp_path):
    (tmp_path / "known_hosts").write_text("")
    data = yaml.safe_load(open(base))
    for host in data["hosts"].values():
        host["known_hosts"] = str(tmp_path / "known_hosts")
    path = variant(tmp_path, data)
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 1
    assert len(re.findall(r"^h\d +connect +failed +unknown host key", result.stdout, re.M)) == 2
    assert run_fleet("deploy", "inference", "--accept-new-host-keys", "-i", path).returncode == 0
    assert len((tmp_path / "known_hosts").read_text().splitlines()) == 2
    assert run_fleet("deploy", "inference", "-i", path).returncode == 0


# -- a step that fails on a host ---------------------------------------------------------------------

def test_bad_config_keeps_the_previous_version_serving(lab, base, tmp_path):
    config_before = open(srv(lab, "h1", "services", "inference", "config.yaml")).read()
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["vars"] = {"modelPath": "/nonexistent/model.json"}
    result = run_fleet("deploy", "inference", "-i", variant(tmp_path, data))
    assert result.returncode == 1
    assert "No such file or directory: '/nonexistent/model.json'" in result.stdout  # the log tail
    assert "inference: previous version restored and running" in result.stdout
    assert open(srv(lab, "h1", "services", "inference", "config.yaml")).read() == config_before
    assert predict(lab).startswith("[0.")
    again = run_fleet("deploy", "inference", "-i", base)
    assert again.returncode == 0 and "no changes" in again.stdout


def test_broken_artifact_keeps_the_previous_version_serving(lab, base, tmp_path):
    broken = tmp_path / "broken.pyz"
    broken.write_bytes(b"this is not a zip archive")
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["vars"] = {"artifact": str(broken)}
    result = run_fleet("deploy", "inference", "-i", variant(tmp_path, data))
    assert result.returncode == 1
    assert "SyntaxError: invalid syntax" in result.stdout  # python's complaint, from the log tail
    # The first batch (h0) fails and is restored (its progress line and summary row); the rollout
    # stops there, so h1 never gets the broken artifact.
    assert result.stdout.count("previous version restored and running") == 2
    assert re.search(r"│ h1 .* not restarted: the rollout of inference stopped at batch 1", result.stdout)
    assert predict(lab).startswith("[0.")
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


def test_port_taken_is_reported_with_the_log_and_other_hosts_serve(lab, base, tmp_path):
    assert run_fleet("stop", "inference", "--limit", "h1", "-i", base).returncode == 0
    squatter = subprocess.Popen(["ip", "netns", "exec", lab.host("h1").namespace, sys.executable, "-c",
                                 # another program on the port: accepts, speaks no gRPC, hangs up
                                 "import socket; s=socket.socket(); s.bind(('0.0.0.0',7073)); s.listen()\n"
                                 "while True: s.accept()[0].close()"])
    try:
        time.sleep(0.5)
        result = run_fleet("deploy", "inference", "-i", base)
        assert result.returncode == 1
        assert "inference: exited before listening" in result.stdout
        assert "cannot listen on 0.0.0.0:7073" in result.stdout
        assert predict(lab).startswith("[0.")  # h0 serves alone
    finally:
        squatter.kill()
        squatter.wait()
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


# -- Envoy configuration ------------------------------------------------------------------------------

def test_invalid_envoy_config_is_never_put_in_place(lab, base, tmp_path):
    cds = open(srv(lab, "h0", "envoy", "inference", "cds.yaml")).read()
    envoy = pid_of(lab, "h0", "envoy-inference")
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["ingress"]["vars"] = {"connect_timeout": "-5s"}
    result = run_fleet("deploy", "inference", "-i", variant(tmp_path, data))
    assert result.returncode == 2 and "rejected by `envoy --mode validate`" in result.stderr
    assert open(srv(lab, "h0", "envoy", "inference", "cds.yaml")).read() == cds
    assert pid_of(lab, "h0", "envoy-inference") == envoy
    assert predict(lab).startswith("[0.")


def admin_stat(lab, name):
    return int(lab.envoy_admin("h0", f"/stats?filter=^{re.escape(name)}$").split(":")[1])


def test_envoy_takes_new_config_without_dropping_connections(lab, base, tmp_path):
    envoy = pid_of(lab, "h0", "envoy-inference")
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["ingress"]["vars"] = {"health_check_interval": "3s"}
    errors, calls, stop = [], [0], threading.Event()
    with grpc.insecure_channel(f"{lab.host('h0').address}:8083") as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        stub.doPredict(ranking_pb2.Content(encodedStr=encode_instances([[0.0] * 8])), timeout=10)
        connections = admin_stat(lab, "listener.0.0.0.0_8083.downstream_cx_total")

        def caller():
            while not stop.is_set():
                try:
                    stub.doPredict(ranking_pb2.Content(encodedStr=encode_instances([[0.0] * 8])), timeout=10)
                    calls[0] += 1
                except grpc.RpcError as e:
                    errors.append(e.code())

        thread = threading.Thread(target=caller)
        thread.start()
        try:
            result = run_fleet("deploy", "inference", "-i", variant(tmp_path, data))
            time.sleep(1)
        finally:
            stop.set()
            thread.join()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "inference.envoy.config             changed" in result.stdout
        assert errors == [] and calls[0] > 0
        # One new connection only: fleet's own health check. The client kept its connection.
        assert admin_stat(lab, "listener.0.0.0.0_8083.downstream_cx_total") == connections + 1
    assert pid_of(lab, "h0", "envoy-inference") == envoy
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


# -- hangs and the admin interface ---------------------------------------------------------------------

def envoy_view(lab):
    """{backend address: health_flags} from Envoy's admin on h0."""
    return {parts[1]: parts[3] for parts in (l.split("::") for l in lab.envoy_admin("h0", "/clusters").splitlines())
            if len(parts) == 4 and parts[0] == "inference_service" and parts[2] == "health_flags"}


def wait_for(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_other_users_cannot_reach_envoys_admin(lab, base):
    envoy = pid_of(lab, "h0", "envoy-inference")
    admin = srv(lab, "h0", "envoy", "inference", "admin.sock")
    assert os.stat(admin).st_mode & 0o777 == 0o600
    tcp_ports = set(re.findall(rf":(\d+)\s+\S+\s+LISTEN\s+{envoy}/", lab.exec("h0", "netstat", "-tnlp")))
    assert tcp_ports == {"8083"}  # the listener only: no admin port on 127.0.0.1
    # uid 65534, inside h0 (its network and its /srv), tries /quitquitquit on the admin socket and
    # on every TCP port Envoy listens on.
    attack = ("import socket, sys\n"
              "def post(family, address):\n"
              "    s = socket.socket(family); s.settimeout(5)\n"
              "    try:\n"
              "        s.connect(address); s.sendall(b'POST /quitquitquit HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
              "        print(address, s.recv(100))\n"
              "    except OSError as e: print(address, type(e).__name__)\n"
              "post(socket.AF_UNIX, '/srv/fleet/envoy/inference/admin.sock')\n"
              f"for port in {sorted(tcp_ports)!r}: post(socket.AF_INET, ('127.0.0.1', int(port)))\n")
    out = subprocess.run(["nsenter", "-t", str(lab.host("h0").sshd.pid), "-m", "-n", "setpriv", "--reuid", "65534",
                          "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", attack],
                         capture_output=True, text=True, timeout=30).stdout
    assert "/srv/fleet/envoy/inference/admin.sock PermissionError" in out and "OK" not in out, out
    time.sleep(1)
    assert os.path.exists(f"/proc/{envoy}") and pid_of(lab, "h0", "envoy-inference") == envoy
    assert predict(lab).startswith("[0.")
    status = run_fleet("status", "inference", "-i", base)
    assert status.returncode == 0, status.stdout + status.stderr
    for host in ("h0", "h1"):
        assert re.search(rf"{re.escape(lab.host(host).address)}:7073 +│ healthy", status.stdout)


def test_status_fails_while_a_backend_is_out_of_rotation(lab, base):
    backend = pid_of(lab, "h1", "inference")
    h1 = f"{lab.host('h1').address}:7073"
    os.kill(backend, signal.SIGSTOP)  # alive and listening, but answers no health check
    try:
        wait_for(lambda: envoy_view(lab)[h1] != "healthy", "Envoy never took the stopped backend out")
        status = run_fleet("status", "inference", "-i", base)
        assert status.returncode == 1, status.stdout
        assert re.search(rf"{re.escape(h1)} +│ \S*failed_active_hc", status.stdout)
    finally:
        os.kill(backend, signal.SIGCONT)
    wait_for(lambda: envoy_view(lab)[h1] == "healthy", "the backend did not come back")
    assert run_fleet("status", "inference", "-i", base).returncode == 0


def test_a_stopped_envoy_fails_status_and_deploy_in_bounded_time(lab, base):
    envoy = pid_of(lab, "h0", "envoy-inference")
    os.kill(envoy, signal.SIGSTOP)
    try:
        # The subprocess timeouts are a safety net against a hang, not a timing assertion.
        status = run_fleet("status", "inference", "-i", base, timeout=120)
        assert status.returncode == 1
        assert "inference Envoy: Envoy admin on h0 not answering" in status.stdout
        assert "TimeoutError: timed out" in status.stdout
        deploy = run_fleet("deploy", "inference", "-i", base, timeout=120)
        assert deploy.returncode == 1
        assert "inference: Envoy admin on h0 not answering" in deploy.stdout
    finally:
        os.kill(envoy, signal.SIGCONT)
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


def test_a_stopped_sshd_fails_that_host_and_status_names_it(lab, base):
    sshd = lab.host("h1").sshd.pid
    os.kill(sshd, signal.SIGSTOP)  # connections are accepted by the kernel, but no banner comes
    try:
        status = run_fleet("status", "inference", "-i", base, timeout=120)  # a safety net, not a timing
        assert status.returncode == 1
        assert re.search(r"│ h1 +│ - +│ unreachable", status.stdout), status.stdout
        assert "no SSH greeting within 10 s" in status.stdout, status.stdout
        assert re.search(r"│ h0 +│ envoy-inference +│ running", status.stdout)
        limited = run_fleet("status", "inference", "--limit", "h0", "-i", base, timeout=120)
        assert limited.returncode == 0, limited.stdout  # h1 left out: its state is not asked for
    finally:
        os.kill(sshd, signal.SIGCONT)


def session_pgid_waiting_for_lock(lab, host, wait):
    """Process group of fleet's session on `host` while it waits (`flock -w WAIT`) for the lock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid, argv in lab.processes(host).items():
            if argv[:3] == ["flock", "-w", str(wait)]:
                return os.getpgid(pid)
        time.sleep(0.02)
    raise AssertionError(f"no session waiting for the lock on {host}")


def test_a_stopped_host_session_fails_that_host_in_bounded_time(lab, base):
    lock = srv(lab, "h1", ".lock")
    holder = subprocess.Popen(["ip", "netns", "exec", lab.host("h1").namespace, "flock", lock, "sleep", "120"],
                              start_new_session=True)
    session = None
    try:
        time.sleep(0.3)
        deploy = subprocess.Popen([sys.executable, "-m", "fleet.cli", "deploy", "inference", "--wait-lock", "5",
                                   "-i", base], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        session = session_pgid_waiting_for_lock(lab, "h1", 5)
        os.killpg(session, signal.SIGSTOP)  # h1's session stops answering, with the lock free
        os.killpg(holder.pid, signal.SIGKILL)
        out, err = deploy.communicate(timeout=120)  # a safety net, not a timing assertion
        assert deploy.returncode == 1, out + err
        assert re.search(r"^h1 +connect +failed +no answer from the host session within \d+ s "
                         r"\(start of the session\)", out, re.M), out
        assert re.search(r"│ h0 +│ \d+ +│ 0 +│ 0 +│ 2/2", out)  # h0 deployed and verified meanwhile
    finally:
        if session is not None:
            os.killpg(session, signal.SIGKILL)
            os.killpg(session, signal.SIGCONT)
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


# -- interrupted deploys ---------------------------------------------------------------------------

def cold_inventory(lab, tmp_path, root):
    """inference alone on h2 under a fresh root: a cold deploy that sends the 107 MB Envoy binary."""
    data = {"hosts": lab.inventory_hosts(root=root), "services": {"inference": {
        "port": 7073, "backends": ["h2"], "ingress": {"host": "h2", "port": 8083}}}}
    return write_inventory(tmp_path, data, name=f"cold-{os.path.basename(root)}.yaml")


def start_and_wait_for_transfer(lab, path, staging):
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i", path], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (os.path.isdir(staging) and any(os.scandir(staging))):
        assert proc.poll() is None and time.monotonic() < deadline, "no transfer seen"
        time.sleep(0.005)
    return proc


def assert_no_partial_files(lab, root_name):
    root = os.path.join(lab.host("h2").srv, root_name)
    deadline = time.monotonic() + 15
    while os.path.exists(os.path.join(root, ".staging")) and os.listdir(os.path.join(root, ".staging")):
        assert time.monotonic() < deadline, "the host did not clean its staging directory"
        time.sleep(0.1)
    assert not os.path.exists(os.path.join(root, "artifacts")), "a file was put in place from an incomplete deploy"
    assert not os.path.exists(os.path.join(root, "services"))


def test_ctrl_c_mid_transfer_leaves_no_partial_file(lab, tmp_path):
    path = cold_inventory(lab, tmp_path, "/srv/cold-a")
    proc = start_and_wait_for_transfer(lab, path, os.path.join(lab.host("h2").srv, "cold-a", ".staging"))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err
    assert_no_partial_files(lab, "cold-a")
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_fleet("stop", "inference", "-i", path).returncode == 0


def test_dropped_connection_mid_transfer_leaves_no_partial_file(lab, tmp_path):
    path = cold_inventory(lab, tmp_path, "/srv/cold-b")
    proc = start_and_wait_for_transfer(lab, path, os.path.join(lab.host("h2").srv, "cold-b", ".staging"))
    for pid, argv in lab.processes("h2").items():  # the host drops the session
        if " ".join(argv).startswith("sshd: root@notty"):
            os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "connection lost during a step" in out
    assert_no_partial_files(lab, "cold-b")
    result = run_fleet("deploy", "inference", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_fleet("stop", "inference", "-i", path).returncode == 0


def test_ctrl_c_while_a_bad_version_starts_still_rolls_back(lab, base, tmp_path):
    """Finding 3 of issue 8: the switch runs on the host, detached from the connection, so the
    controller's Ctrl-C cannot cost the rollback; the next run reports how the switch ended."""
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["vars"] = {"command": "sleep 300", "start_timeout": 4}
    bad = variant(tmp_path, data)
    # The rollout's first batch (h0) is cut off while its bad version starts: its pid file names
    # the new process.
    running = pid_of(lab, "h0", "inference")
    switches = [os.path.join(lab.host("h0").srv, "fleet", ".switch")]
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i", bad], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60

    def started():
        try:
            return pid_of(lab, "h0", "inference") != running
        except (OSError, ValueError):
            return False

    while not started():
        assert proc.poll() is None and time.monotonic() < deadline, "the new version never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    # No fleet command runs from here on: the hosts put the previous version back themselves.
    deadline = time.monotonic() + 30
    while True:
        try:
            if predict(lab, timeout=2).startswith("[0."):
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the previous version did not come back on its own"
        time.sleep(0.2)
    for d in switches:
        while not any(os.path.exists(os.path.join(d, t, "outcome")) for t in os.listdir(d)):
            assert time.monotonic() < deadline, "the switch did not journal its outcome"
            time.sleep(0.1)
    result = run_fleet("deploy", "inference", "-i", base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^h0 +earlier deploy +ok +\S+ ended while no controller was connected \(failed", result.stdout,
                     re.M)
    # Nothing restarts; only the cluster file the cut-off rollout left draining h0 is put back.
    assert not re.search(r"inference\.(inference|envoy)\.process +changed", result.stdout)


# -- concurrent deploys and locks ------------------------------------------------------------------

# A version that takes 3 s to come up keeps a first deploy busy while a second one starts.
SLOW_START = "sh -c 'sleep 3 && exec {{ host.python }} {{ artifact_path }} {{ entry }} -c {{ config_path }}'"


def deploy_holding_the_lock(lab, path, host):
    """Starts `fleet deploy inference -i path` and returns once it holds host's lock."""
    holder = srv(lab, host, ".lock.holder")
    before = os.stat(holder).st_mtime_ns
    first = subprocess.Popen([sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i", path], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while os.stat(holder).st_mtime_ns == before:
        assert first.poll() is None, "the first deploy ended before taking the lock"
        time.sleep(0.01)
    return first


def test_concurrent_deploys_never_interleave(lab, base, tmp_path):
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["vars"] = {"command": SLOW_START}
    changed = variant(tmp_path, data)
    first = deploy_holding_the_lock(lab, changed, "h0")
    second = run_fleet("deploy", "inference", "-i", changed)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert second.returncode == 1
    assert re.search(r"locked by another deploy: holder=\S+@\S+ txid=\d+-\d+ pid=\d+ since=20", second.stdout)
    waited = run_fleet("deploy", "inference", "--wait-lock", "60", "-i", changed)
    assert waited.returncode == 0 and "no changes" in waited.stdout
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


def test_two_different_deploys_never_leave_hosts_half_and_half(lab, base, tmp_path):
    """Two inventories at once (finding 8 of issue 8): the second takes no lock and changes no host
    while the first holds them, so h0 and h1 end with the same version."""
    data = yaml.safe_load(open(base))
    data["services"]["inference"]["vars"] = {"modelParallelism": 3, "command": SLOW_START}
    first_path = variant(tmp_path, data)
    data["services"]["inference"]["vars"] = {"modelParallelism": 5}
    second_path = write_inventory(tmp_path, data, name="second.yaml")
    first = deploy_holding_the_lock(lab, first_path, "h1")
    second = run_fleet("deploy", "inference", "-i", second_path)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert second.returncode == 1 and "nothing was changed on any host" in second.stderr
    for host in ("h0", "h1"):
        with open(srv(lab, host, "services", "inference", "config.yaml")) as f:
            assert yaml.safe_load(f)["modelParallelism"] == 3, host
    assert run_fleet("deploy", "inference", "-i", base).returncode == 0


def test_check_takes_no_lock(lab, base):
    lock = srv(lab, "h0", ".lock")
    holder = srv(lab, "h0", ".lock.holder")
    sleeper = subprocess.Popen(["ip", "netns", "exec", lab.host("h0").namespace, "flock", lock, "sleep", "120"],
                               start_new_session=True)
    try:
        time.sleep(0.3)
        before = os.stat(holder).st_mtime_ns
        result = run_fleet("deploy", "inference", "--check", "-i", base)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "h0: no changes" in result.stdout and "locked" not in result.stdout
        assert os.stat(holder).st_mtime_ns == before
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


def test_listen_address_not_on_the_host_is_refused(lab, base, tmp_path):
    data = yaml.safe_load(open(base))
    foreign = lab.host("h1").address  # an address of the lab, but not of h0
    data["services"]["inference"]["ingress"]["listen_address"] = foreign
    result = run_fleet("deploy", "inference", "-i", variant(tmp_path, data))
    assert result.returncode == 1
    assert f"listen_address {foreign} is not an address of this host (it has: " in result.stdout
    assert lab.host("h0").address in result.stdout.split("it has: ", 1)[1]


def test_stale_lock_is_named_and_broken_only_when_asked(lab, base):
    lock = srv(lab, "h0", ".lock")
    sleeper = subprocess.Popen(["ip", "netns", "exec", lab.host("h0").namespace, "flock", lock, "sleep", "120"],
                               start_new_session=True)
    try:
        time.sleep(0.3)
        with open(srv(lab, "h0", ".lock.holder"), "w") as f:
            f.write(f"holder=alice@laptop txid=stale pid={sleeper.pid} since=2026-01-01T00:00:00Z\n")
        h1_config = srv(lab, "h1", "services", "inference", "config.yaml")
        before = os.stat(h1_config).st_mtime_ns
        result = run_fleet("deploy", "inference", "-i", base)
        assert result.returncode == 1
        assert "h0: locked by another deploy: holder=alice@laptop txid=stale" in result.stdout
        # All or nothing: h1 was reachable and free, but is not touched while h0 is held.
        assert "nothing was changed on any host" in result.stderr
        assert os.stat(h1_config).st_mtime_ns == before
        result = run_fleet("deploy", "inference", "--break-lock", "-i", base)
        assert result.returncode == 0, result.stdout + result.stderr
        assert sleeper.wait(timeout=10) is not None
    finally:
        if sleeper.poll() is None:
            os.killpg(sleeper.pid, signal.SIGKILL)
            sleeper.wait()


# -- convergence ------------------------------------------------------------------------------------

def test_killed_envoy_is_shown_first_and_brought_back(lab, base):
    # Its supervisor killed with it: nothing on the host brings it back (a kill -9 of Envoy alone is
    # restarted by the supervisor: tests/test_supervision_hosts.py).
    kill_unsupervised(lab, "h0", "envoy-inference")
    status = run_fleet("status", "inference", "-i", base)
    assert status.returncode == 1
    rows = [l for l in status.stdout.splitlines() if re.match(r"│ h\d ", l)]
    assert "envoy-inference" in rows[0] and "dead" in rows[0]
    result = run_fleet("deploy", "inference", "-i", base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^h0 +inference\.envoy\.process +changed", result.stdout, re.M)
    assert predict(lab).startswith("[0.")


# -- secrets ----------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55word"


@pytest.fixture
def redis_with_password(lab):
    address = lab.host("h2").address
    proc = subprocess.Popen(["ip", "netns", "exec", lab.host("h2").namespace, "redis-server", "--port", "6379",
                             "--bind", address, "--requirepass", SECRET, "--save", "", "--appendonly", "no",
                             "--dir", lab.dir], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    yield f"redis://:{SECRET}@{address}:6379"
    proc.terminate()
    proc.wait(timeout=10)


def test_secrets_never_appear_in_output(lab, tmp_path, redis_with_password, monkeypatch):
    data = {"hosts": lab.inventory_hosts(), "services": {"feature": {
        "port": 7072, "backends": ["h0", "h1"], "ingress": {"host": "h0", "port": 8082},
        "vars": {"redisUrl": {"env": "FLEET_TEST_REDIS_URL"}}}}}
    path = variant(tmp_path, data)
    monkeypatch.setenv("FLEET_TEST_REDIS_URL", redis_with_password)
    result = run_fleet("deploy", "feature", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    config = srv(lab, "h1", "services", "feature", "config.yaml")
    assert SECRET in open(config).read() and os.stat(config).st_mode & 0o777 == 0o600
    with grpc.insecure_channel(f"{lab.host('h0').address}:8082") as channel:
        reply = feature_pb2_grpc.FeatureStub(channel).getUserFeatures(feature_pb2.IDs(ID=[1]), timeout=10)
    assert reply.b64Feature[0]  # rows come from the password-protected Redis
    monkeypatch.setenv("FLEET_TEST_REDIS_URL", redis_with_password.replace(SECRET, "an0ther-Secret"))
    check = run_fleet("deploy", "feature", "--check", "-i", path)
    assert check.returncode == 3  # changes pending
    assert '+redisUrl: "********"' in check.stdout and "-(line hidden: this file holds secrets)" in check.stdout
    assert SECRET not in check.stdout and "an0ther-Secret" not in check.stdout
    monkeypatch.setenv("FLEET_TEST_REDIS_URL", redis_with_password)
    # Another user of the host (uid 65534, in h1's own view of /srv) reads none of it: every
    # session runs with umask 077, so the root is private from the moment it exists.
    attack = ("import os\n"
              "for path in ('/srv/fleet', '/srv/fleet/services/feature/config.yaml', '/srv/fleet/log/feature.log',"
              " '/srv/fleet/.lock.holder'):\n"
              "    try: open(path).read() if os.path.isfile(path) else os.listdir(path); print(path, 'READ')\n"
              "    except OSError as e: print(path, type(e).__name__)\n")
    out = subprocess.run(["nsenter", "-t", str(lab.host("h1").sshd.pid), "-m", "setpriv", "--reuid", "65534",
                          "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", attack],
                         capture_output=True, text=True, timeout=30).stdout
    assert out.count("PermissionError") == 4 and "READ" not in out, out
    assert run_fleet("stop", "feature", "-i", path).returncode == 0


# -- under load -----------------------------------------------------------------------------------------

def test_a_backend_killed_and_redeployed_under_load(lab, base):
    with Load(f"{lab.host('h0').address}:8083") as load:
        time.sleep(2)
        kill_unsupervised(lab, "h1", "inference")  # stays down until the deploy below
        time.sleep(4)
        result = run_fleet("deploy", "inference", "-i", base)
        time.sleep(4)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nunder load: {load}")
    assert load.sent > 100
    assert load.failed <= 4  # at most those in flight on the killed backend
