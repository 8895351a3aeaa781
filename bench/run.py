"""fleet beside Ansible and pyinfra, on the same namespace hosts in one sitting.

For each N it creates 1 ingress + N backend hosts (real sshd in network namespaces, see
tests/hostlab.py) whose login is a plain /bin/sh user (what a command costs on an ordinary
server), and times each tool doing the same job (bench/ansible/, bench/pyinfra/): (a) a cold
deploy onto empty hosts, (b) an unchanged re-run, (c) a re-run after a one-variable change to the
service's config (fleet restarts rolling behind Envoy, the others all at once). Every phase is
repeated --reps times, the tools taking turns, each rep on emptied hosts; the medians are what
counts. It also measures the floor (SSH handshake, one remote command, pushing the bytes,
starting N services) and, with --root-backends, repeats the tools on hosts whose login is root
with pyenv in its .bashrc (the login-shell tax). Every run's exit code is checked: a failed run
stops the benchmark. No assertion on speed: numbers go to docs/performance.md (bench/report.py).

    python bench/run.py --backends 2,20,100,200 --root-backends 20 [--reps 3] [--out bench/results.json]
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import paramiko
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fleet import artifacts  # noqa: E402
from tests.hostlab import HostLab, envoy_regions, host_python, remove_files  # noqa: E402

BENCH = os.path.join(REPO, "bench")
PHASES = ("cold", "unchanged", "changed")
PARALLELISM = {"cold": 4, "unchanged": 4, "changed": 5}  # the config variable the changed run changes
ROOT = "/srv/fleet"  # every tool's root on the hosts (emptied between runs)
FIRST_LAB_ID = 230
BIN = os.path.dirname(sys.executable)


class BenchFailed(SystemExit):
    pass


class RunFailed(Exception):
    """A tool's run exited non-zero (or did not do its job): recorded, and that tool's rep ends."""


def timed(cmd, env=None, cwd=REPO):
    """{seconds, peak_mb, cpu_s} of one command, and its output; a non-zero exit raises RunFailed.
    Peak memory and CPU come from GNU time, a small process between: Linux counts the memory of
    the process that forked into a child's peak (it records the pre-exec peak), so wait4 here
    would report the benchmark's own size for any command smaller than it."""
    with tempfile.NamedTemporaryFile("r", prefix="fleet-bench-time-") as usage:
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M %U %S", "-o", usage.name, *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        output = proc.stdout.read().decode(errors="replace")
        code = proc.wait()
        elapsed = time.perf_counter() - start
        measured = usage.read().split()
    if code != 0:
        raise RunFailed(f"{os.path.basename(cmd[0])} {' '.join(cmd[1:5])}... exited {code}:\n{output[-3000:]}")
    # The command and the descendants it waited for (Envoy's validation, ...).
    peak_kb, user, system = int(measured[-3]), float(measured[-2]), float(measured[-1])
    return {"seconds": round(elapsed, 2), "peak_mb": round(peak_kb / 1024, 1), "cpu_s": round(user + system, 2)}, output


# -- the tools --------------------------------------------------------------------------------
class Fleet:
    name = "fleet"

    def __init__(self, lab, directory):
        self.lab, self.directory = lab, directory
        # Its own controller cache (validated Envoy configs, artifact hashes), kept across runs as
        # an operator's would be.
        self.env = dict(os.environ, XDG_CACHE_HOME=os.path.join(directory, "fleet-cache"))

    def inventory(self, parallelism):
        data = {"hosts": self.lab.inventory_hosts(root=ROOT), "services": {"inference": {
            "port": 7073, "backends": [h.name for h in self.lab.hosts[1:]],
            "ingress": {"host": "h0", "port": 8083},
            "vars": {"modelParallelism": parallelism}}}}
        path = os.path.join(self.directory, f"fleet-{parallelism}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    def reset(self):
        pass

    def run(self, phase):
        args = [sys.executable, "-m", "fleet.cli", "deploy", "inference", "-i", self.inventory(PARALLELISM[phase])]
        result, output = timed(args, env=self.env)
        if phase == "unchanged" and "no changes" not in output:
            raise RunFailed(f"fleet's unchanged run changed something:\n{output[-3000:]}")
        return result

    def timings(self, phase):
        """`fleet deploy --timings --json` of one more run of this phase: where the time went."""
        args = [sys.executable, "-m", "fleet.cli", "deploy", "inference", "--json", "--timings",
                "-i", self.inventory(PARALLELISM[phase])]
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env=self.env, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchFailed(f"fleet --timings exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        document = json.loads(proc.stdout)
        hosts = {h["host"]: h.get("timings", {}) for h in document["hosts"]}
        return {"run": document["timings"], "hosts": hosts, "wall": round(wall, 3)}


class Ansible:
    name = "ansible"

    def __init__(self, lab, directory):
        self.lab, self.directory = lab, directory
        self.control = None

    def inventory(self, parallelism):
        def hosts(selected):
            return {h.name: {"ansible_host": h.address} for h in selected}

        data = {"all": {
            "vars": dict(tool_vars(self.lab, parallelism), ansible_user=self.lab.user or "root",
                         ansible_ssh_private_key_file=self.lab.client_key,
                         ansible_python_interpreter=self.lab.python),
            "children": {"ingress": {"hosts": hosts(self.lab.hosts[:1])},
                         "backends": {"hosts": hosts(self.lab.hosts[1:])}},
        }}
        path = os.path.join(self.directory, f"ansible-{parallelism}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    def reset(self):
        # Its ControlPersist masters lost their sessions with the hosts' processes: start afresh.
        self.control = tempfile.mkdtemp(prefix="cp-", dir=self.directory)

    def run(self, phase):
        env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(BENCH, "ansible", "ansible.cfg"),
                   ANSIBLE_FORKS=str(len(self.lab.hosts)), ANSIBLE_SSH_CONTROL_PATH_DIR=self.control,
                   ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=120s -o StrictHostKeyChecking=yes "
                                    f"-o UserKnownHostsFile={self.lab.known_hosts}",
                   PATH=f"{BIN}:{os.environ['PATH']}")
        return timed([os.path.join(BIN, "ansible-playbook"), "-i", self.inventory(PARALLELISM[phase]),
                      os.path.join(BENCH, "ansible", "deploy.yml")], env=env, cwd=os.path.join(BENCH, "ansible"))[0]


class Pyinfra:
    name = "pyinfra"

    def __init__(self, lab, directory):
        self.lab, self.directory = lab, directory

    def inventory(self, parallelism):
        common = dict(tool_vars(self.lab, parallelism), ssh_user=self.lab.user or "root", ssh_key=self.lab.client_key,
                      ssh_known_hosts_file=self.lab.known_hosts, ssh_strict_host_key_checking="yes")
        groups = {"ingress": self.lab.hosts[:1], "backends": self.lab.hosts[1:]}
        path = os.path.join(self.directory, f"pyinfra_{parallelism}.py")
        with open(path, "w") as f:
            for group, hosts in groups.items():
                f.write(f"{group} = {[(h.address, common) for h in hosts]!r}\n")
        return path

    def reset(self):
        pass

    def run(self, phase):
        return timed([os.path.join(BIN, "pyinfra"), "-y", "--parallel", str(len(self.lab.hosts)),
                      self.inventory(PARALLELISM[phase]), os.path.join(BENCH, "pyinfra", "deploy.py")])[0]


def tool_vars(lab, parallelism):
    """The job's variables for Ansible and pyinfra (fleet's come from its roles)."""
    return {"root": ROOT, "python": lab.python, "modelParallelism": parallelism,
            "artifact": artifacts.resolve("builtin:services", ".").path,
            "envoy_binary": artifacts.resolve("builtin:envoy", ".").path,
            "backend_addresses": [h.address for h in lab.hosts[1:]]}


def empty_hosts(lab):
    """Every process the hosts run but their sshd (services, Envoys, sessions) killed,
    and the tools' root emptied: the next cold run starts from nothing."""
    sshd = {h.sshd.pid for h in lab.hosts}
    for host in lab.hosts:
        pids = [p for p in subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True,
                                          text=True).stdout.split() if int(p) not in sshd]
        regions = envoy_regions(pids)
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_files(regions)
    for host in lab.hosts:
        root = os.path.join(host.srv, os.path.basename(ROOT))
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def listeners(lab):
    """{backend: pid of the process listening on its port 7073, or None}: a changed run must
    leave a new process there on every backend (a restart that failed to bind would keep the old)."""
    found = {}
    for host in lab.hosts[1:]:
        out = subprocess.run(["ip", "netns", "exec", host.namespace, "ss", "-Htlnp", "sport = :7073"],
                             capture_output=True, text=True).stdout
        pids = [int(part.split("pid=")[1].split(",")[0]) for part in out.split() if "pid=" in part]
        found[host.name] = pids[0] if pids else None
    return found


# -- the floor --------------------------------------------------------------------------------
def floor(lab):
    """What no tool can beat on these hosts: SSH handshakes (paramiko, all hosts at once), one
    remote command on each, pushing the bytes of a cold run, starting the N services."""
    hosts = lab.hosts
    user = lab.user or "root"
    result = {}

    def connect(host):
        client = paramiko.SSHClient()
        client.load_host_keys(lab.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(host.address, username=user, key_filename=lab.client_key, look_for_keys=False,
                       allow_agent=False, timeout=30, banner_timeout=30, auth_timeout=30)
        return client

    with ThreadPoolExecutor(max_workers=min(128, len(hosts))) as pool:
        start = time.perf_counter()
        clients = list(pool.map(connect, hosts))
        result["ssh_handshake_all_s"] = round(time.perf_counter() - start, 3)

        def command(client):
            _, out, _ = client.exec_command("true")
            return out.channel.recv_exit_status()

        start = time.perf_counter()
        codes = list(pool.map(command, clients))
        result["one_command_all_s"] = round(time.perf_counter() - start, 3)
        if any(codes):
            raise BenchFailed(f"`true` failed on a host: {codes}")

        # Bytes of a cold run: the services zipapp to every backend, Envoy to the ingress host.
        services = artifacts.resolve("builtin:services", ".").path
        envoy = artifacts.resolve("builtin:envoy", ".").path

        def push(args):
            client, path = args
            channel = client.get_transport().open_session()
            channel.exec_command(f"cat > {ROOT}/floor.bin")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    channel.sendall(block)
            channel.shutdown_write()
            return channel.recv_exit_status()

        start = time.perf_counter()
        codes = list(pool.map(push, [(clients[0], envoy)] + [(c, services) for c in clients[1:]]))
        result["push_bytes_s"] = round(time.perf_counter() - start, 3)
        result["push_mb"] = round((os.path.getsize(envoy) + len(clients[1:]) * os.path.getsize(services)) / 1e6, 1)
        if any(codes):
            raise BenchFailed(f"pushing failed on a host: {codes}")
        for client in clients:
            client.close()
    result["start_services_s"] = start_services(lab.python, len(hosts) - 1, port_base(lab.lab_id))
    return result


def start_services(python, n, port_base):
    """Seconds from starting n inference services at once on this machine (on 127.0.0.1, ports
    port_base.., no SSH, no namespace to enter, no user to switch to) until each accepts
    connections: what starting the backends costs on these 2 cores, at the least."""
    directory = tempfile.mkdtemp(prefix="fleet-floor-")
    artifact = artifacts.resolve("builtin:services", ".").path
    configs = []
    for i in range(n):
        configs.append(os.path.join(directory, f"config-{i}.yaml"))
        with open(configs[-1], "w") as f:
            f.write(f"servicePort: {port_base + i}\nbindAddress: 127.0.0.1\nmonitorPort: 0\nmodelPath: \"\"\n"
                    "modelParallelism: 4\ndrainSeconds: 0\ngraceSeconds: 5\n")
    start = time.perf_counter()
    procs = [subprocess.Popen([python, artifact, "inference", "-c", config], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for config in configs]
    try:
        deadline = time.monotonic() + 300
        for i, proc in enumerate(procs):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port_base + i), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise BenchFailed(f"service {i} on port {port_base + i} exited or did not listen in 300 s")
                    time.sleep(0.02)
        return round(time.perf_counter() - start, 3)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def port_base(lab_id):
    """Loopback ports of the services floor: 256 per lab id, below the ephemeral range (32768-) and
    above the tests' (port_shift)."""
    return 21000 + (lab_id - FIRST_LAB_ID) * 256


# -- one table --------------------------------------------------------------------------------
def bench(n, login, tools, reps, lab_id, timings):
    """One row per tool: each phase's runs and median, for 1 ingress + n backends."""
    print(f"[{login}] N={n}: 1 ingress + {n} backends, {reps} reps of {', '.join(tools)}", flush=True)
    with HostLab(n + 1, lab_id=lab_id, plain_user=login == "plain") as lab, \
            tempfile.TemporaryDirectory(prefix="fleet-bench-") as directory:
        os.chmod(directory, 0o755)
        for host in lab.hosts:  # a plain lab made it for its user already
            os.makedirs(os.path.join(host.srv, os.path.basename(ROOT)), exist_ok=True)
        runners = {"fleet": Fleet(lab, directory), "ansible": Ansible(lab, directory), "pyinfra": Pyinfra(lab, directory)}
        row = {"floor": floor(lab)}
        empty_hosts(lab)
        print(f"  floor {row['floor']}", flush=True)
        runs = {tool: {phase: [] for phase in PHASES} for tool in tools}
        failures = {}
        for rep in range(reps):
            for tool in tools:
                runner = runners[tool]
                empty_hosts(lab)
                runner.reset()
                for phase in PHASES:
                    before = listeners(lab)
                    result = None
                    try:
                        result = runner.run(phase)
                        after = listeners(lab)
                        # Per host: pids are the machine's, so an old pid of one host may be a new one's elsewhere.
                        if None in after.values() or (phase == "changed" and any(before[h] == after[h] for h in after)):
                            raise RunFailed(f"a backend does not run a new copy listening on 7073 (pids before "
                                            f"{before}, after {after})")
                    except RunFailed as e:
                        print(f"  rep {rep + 1} {tool:<14} {phase:<10} FAILED: {e}", flush=True)
                        failures.setdefault(tool, []).append({"rep": rep + 1, "phase": phase, "error": str(e)[-1500:],
                                                              "seconds": result and result["seconds"]})
                        break  # the tool's later phases of this rep would start from a broken state
                    runs[tool][phase].append(result)
                    print(f"  rep {rep + 1} {tool:<14} {phase:<10} {result['seconds']:7.2f} s  "
                          f"cpu {result['cpu_s']:6.2f} s  peak {result['peak_mb']:6.1f} MB", flush=True)
        if timings and "fleet" in tools:
            empty_hosts(lab)
            runners["fleet"].reset()
            row["fleet_timings"] = {phase: runners["fleet"].timings(phase) for phase in PHASES}
        empty_hosts(lab)
        for tool in tools:
            row[tool] = {phase: summary(runs[tool][phase]) for phase in PHASES}
            if failures.get(tool):
                row[tool]["failures"] = failures[tool]
        return row


def summary(results):
    if not results:
        return {"seconds": None, "runs": []}
    return {"seconds": statistics.median(r["seconds"] for r in results),
            "runs": [r["seconds"] for r in results],
            "cpu_s": statistics.median(r["cpu_s"] for r in results),
            "peak_mb": max(r["peak_mb"] for r in results)}


def main():
    # A killed benchmark still removes its hosts (HostLab's context exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="2,20,100,200", help="comma-separated N values, plain-login hosts")
    parser.add_argument("--root-backends", default="", help="comma-separated N values, root logins with pyenv")
    parser.add_argument("--reps", type=int, default=1, help="runs of each phase per tool (medians are reported; "
                                                            "docs/performance.md's run used 3)")
    parser.add_argument("--reps-at", default="", help="other reps for a tool at one N, e.g. ansible:100:1 "
                                                       "(0: not run there), ansible:20:1:root for the root table; comma-separated")
    parser.add_argument("--tools", default="fleet,pyinfra,ansible")
    parser.add_argument("--timings-at", default="20", help="N values (plain hosts) at which to record one more "
                                                           "fleet run of each phase with --timings")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results.json"))
    parser.add_argument("--services-floor", action="store_true",
                        help="only time starting N services at once (each N of --backends) and add it to --out")
    args = parser.parse_args()
    if args.services_floor:
        return services_floor(args)
    tools = [t for t in args.tools.split(",") if t]
    # fleet as installed: pip and pipx compile a package's bytecode when they install it, as they
    # did pyinfra's and Ansible's in this venv. From a checkout (editable) run with
    # PYTHONDONTWRITEBYTECODE=1, fleet would compile its own sources again on every run (~40 ms).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "fleet")], check=True)
    timings_at = {int(x) for x in filter(None, args.timings_at.split(","))}
    fewer = {}
    for spec in filter(None, args.reps_at.split(",")):
        tool, n, reps, *login = spec.split(":")
        fewer[(login[0] if login else "plain", tool, int(n))] = int(reps)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "reps": args.reps, "tables": {}}
    lab_id = FIRST_LAB_ID
    # The root table first: the plain table's largest N (Ansible at N=200) is the longest sitting.
    for login, spec in (("root", args.root_backends), ("plain", args.backends)):
        table = {}
        for n in (int(x) for x in filter(None, spec.split(","))):
            row = {}
            # A tool with fewer reps at this N runs in a sitting of its own, after the others.
            groups = {}
            for tool in tools:
                groups.setdefault(fewer.get((login, tool, n), args.reps), []).append(tool)
            for reps, group in sorted(groups.items(), reverse=True):
                if reps == 0:
                    row.setdefault("not_run", []).extend(group)
                    continue
                part = bench(n, login, group, reps, lab_id, timings=login == "plain" and n in timings_at)
                row.update({k: v for k, v in part.items() if k not in row})
                row.setdefault("reps", {}).update({tool: reps for tool in group})
            table[str(n)] = row
            results["tables"][login] = table
            lab_id += 1
            write(results, args.out)  # row by row: a run cut short keeps what it measured
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write(results, args.out)
    print(f"results written to {args.out}")


def services_floor(args):
    """Adds {N: seconds} of start_services, in a sitting of its own, to an existing results file."""
    with open(args.out) as f:
        results = json.load(f)
    floor = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for n in (int(x) for x in filter(None, args.backends.split(","))):
        floor[str(n)] = start_services(host_python(), n, port_base(FIRST_LAB_ID))
        print(f"  starting {n} services: {floor[str(n)]:.2f} s", flush=True)
    results["services_floor"] = floor
    write(results, args.out)


def write(results, path):
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
