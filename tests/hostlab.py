"""Real SSH hosts on this machine, for tests and benchmarks: one network namespace per host,
joined by a bridge, each running its own sshd with a private /srv (see
../shared/reference/test-hosts.md). Only addresses created here are ever used, and everything is
removed by the names it was created with."""

import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass

from fleet import commands

SUBNET_BASE = "10.213"  # 10.213.<lab>.0/24, a subnet that exists only inside this machine
# The services' Python for plain logins: Debian's python3 has no grpcio, and root's Python
# (under /root/.pyenv, mode 0700) is out of their reach. Built once per machine and set of
# packages (services/pyproject.toml's dependencies), shared by labs.
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "services",
                       "pyproject.toml"), "rb") as _f:
    HOST_PYTHON_PACKAGES = tuple(tomllib.load(_f)["project"]["dependencies"])
HOST_PYTHON_DIR = ("/var/cache/fleet-hostlab/python-"
                   + hashlib.sha256("\n".join(HOST_PYTHON_PACKAGES).encode()).hexdigest()[:12])


def envoy_regions(pids):
    """The /dev/shm files of the hot-restart regions of the Envoys among `pids` (by the
    FLEET_BASE_ID their supervisor gave them): a host torn down with SIGKILL leaves them, and
    /dev/shm is the machine's."""
    regions = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"FLEET_BASE_ID", b"").isdigit():
            regions.add(f"/dev/shm/envoy_shared_memory_{int(env[b'FLEET_BASE_ID']) * 10}")
    return regions


def remove_files(paths):
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


class LabError(RuntimeError):
    """Creating the hosts failed: the caller must stop, never fall back to other addresses."""


@dataclass
class LabHost:
    name: str
    namespace: str
    address: str
    srv: str  # the host's private /srv, as seen from the controller
    sshd: subprocess.Popen = None
    init: subprocess.Popen = None  # systemd=True: `unshare` holding the host's systemd (PID 1 inside)


def host_python():
    """A Python with the services' packages that any login can run (see HOST_PYTHON_DIR)."""
    python = os.path.join(HOST_PYTHON_DIR, "bin", "python3")
    complete = os.path.join(HOST_PYTHON_DIR, ".complete")  # written last: a half-built venv is rebuilt
    os.makedirs(os.path.dirname(HOST_PYTHON_DIR), mode=0o755, exist_ok=True)
    with open(HOST_PYTHON_DIR + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # labs of other checkouts may build it at the same moment
        if not os.path.exists(complete):
            shutil.rmtree(HOST_PYTHON_DIR, ignore_errors=True)
            # Built in place: a venv's paths are absolute.
            _run("/usr/bin/python3", "-m", "venv", HOST_PYTHON_DIR)
            _run(os.path.join(HOST_PYTHON_DIR, "bin", "pip"), "install", "-q", *HOST_PYTHON_PACKAGES)
            _run("chmod", "-R", "a+rX", HOST_PYTHON_DIR)
            open(complete, "w").close()
    return python


def _run(*cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


class HostLab:
    def __init__(self, count, lab_id=None, max_startups="200:30:400", plain_user=False, sudo=False, setenv=None,
                 systemd=False):
        """plain_user: fleet logs in as a user of this lab whose shell is /bin/sh (no login-shell
        tax, no root), with /srv/fleet its own on every host; sudo: that user may sudo without a
        password; setenv: {host name: {VARIABLE: value}} that host's sshd sets for every login
        (sshd's SetEnv: PATH too); systemd: every host runs a real systemd as PID 1 of its own PID
        namespace, and its sshd runs beside it there ("systemd hosts" below)."""
        # FLEET_LAB_ID: an id of its own for each checkout that runs tests on this machine at once.
        if lab_id is None:
            lab_id = int(os.environ["FLEET_LAB_ID"]) if os.environ.get("FLEET_LAB_ID") else os.getpid() % 200 + 20
        self.lab_id = lab_id
        self.tag = f"fl{self.lab_id}"
        self.count = count
        self.max_startups = max_startups
        self.dir = tempfile.mkdtemp(prefix=f"fleet-lab-{self.tag}-")
        self.bridge = f"{self.tag}br"
        self.gateway = f"{SUBNET_BASE}.{self.lab_id}.1"
        self.hosts = []
        self.client_key = os.path.join(self.dir, "id_ed25519")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.host_key_files = {}
        self.user = f"{self.tag}u" if plain_user else None
        self.sudo = sudo and plain_user
        self.sudoers = f"/etc/sudoers.d/fleet-lab-{self.tag}"
        self.python = host_python() if plain_user else sys.executable
        self.setenv = setenv or {}
        self._user_created = False
        self.systemd = systemd

    # -- setup -------------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.destroy()

    def create(self):
        if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
            raise LabError("sshd not installed (Debian package openssh-server)")
        if self.count > 250:
            raise LabError("at most 250 hosts per lab")
        os.makedirs("/run/sshd", exist_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.client_key)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        if self.user:
            self._create_user()
        for i in range(self.count):
            self.hosts.append(self._create_host(i))
        self._write_known_hosts()
        for host in self.hosts:
            if self.systemd:
                self._boot(host)
            self._start_sshd(host)
        self.wait_ready()

    def _create_host(self, i, kind="h", bridge=None, subnet=None):
        namespace = f"{self.tag}{kind}{i}"
        address = f"{subnet or f'{SUBNET_BASE}.{self.lab_id}'}.{10 + i}"
        _run("ip", "netns", "add", namespace)
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        self._add_interface(namespace, f"{self.tag}{'v' if kind == 'h' else kind}{i}", bridge or self.bridge,
                            "eth0", address)
        srv = os.path.join(self.dir, namespace, "srv")
        os.makedirs(srv)
        if self.user:
            # The bind mount makes this /srv, so lab.dir's 0700 does not stand in the user's way.
            os.makedirs(os.path.join(srv, "fleet"))
            shutil.chown(os.path.join(srv, "fleet"), self.user, self.user)
        host = LabHost(name=f"{kind}{i}", namespace=namespace, address=address, srv=srv)
        key = os.path.join(self.dir, namespace, "ssh_host_ed25519_key")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        self.host_key_files[host.name] = key
        return host

    def _create_user(self):
        # '*', not a locked '!': sshd with UsePAM no refuses locked accounts.
        if subprocess.run(["id", self.user], capture_output=True).returncode == 0:
            raise LabError(f"user {self.user} exists already (a lab of id {self.lab_id} not cleaned up?)")
        _run("useradd", "-m", "-s", "/bin/sh", "-p", "*", self.user)
        self._user_created = True
        home = os.path.expanduser(f"~{self.user}")
        os.makedirs(os.path.join(home, ".ssh"), mode=0o700)
        shutil.copy(self.client_key + ".pub", os.path.join(home, ".ssh", "authorized_keys"))
        _run("chown", "-R", f"{self.user}:{self.user}", os.path.join(home, ".ssh"))
        if self.sudo:
            if not shutil.which("sudo"):
                raise LabError("sudo not installed (Debian package sudo; .ci/setup installs it)")
            with open(self.sudoers, "w") as f:
                f.write(f"{self.user} ALL=(ALL) NOPASSWD: ALL\n")
            os.chmod(self.sudoers, 0o440)
            _run("visudo", "-cqf", self.sudoers)

    def _add_interface(self, namespace, veth, bridge, name, address):
        """A veth pair: one end on `bridge`, the other in the namespace as `name` with address/24."""
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _run("ip", "link", "set", f"{veth}p", "netns", namespace)
        _run("ip", "link", "set", veth, "master", bridge)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", f"{veth}p", "name", name)
        _run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", name)
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", name, "up")

    def _sshd_config(self, host):
        path = os.path.join(self.dir, host.namespace, "sshd_config")
        with open(path, "w") as f:
            f.write(f"""ListenAddress {host.address}
Port 22
HostKey {self.host_key_files[host.name]}
PidFile {os.path.join(self.dir, host.namespace, 'sshd.pid')}
AuthorizedKeysFile {self.client_key}.pub .ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups {self.max_startups}
MaxSessions 100
AllowTcpForwarding yes
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
            for variable, value in self.setenv.get(host.name, {}).items():
                f.write(f"SetEnv {variable}={value}\n")
        return path

    def _start_sshd(self, host):
        config = self._sshd_config(host)
        if self.systemd:
            return self._start_sshd_beside_systemd(host, config)
        # A private mount namespace per host, with its own directory over /srv: what fleet puts
        # under /srv on one host is invisible to the others, as on separate machines.
        script = f"mount --bind {host.srv} /srv && exec /usr/sbin/sshd -D -e -f {config}"
        log = open(os.path.join(self.dir, host.namespace, "sshd.log"), "w")
        host.sshd = subprocess.Popen(["ip", "netns", "exec", host.namespace, "unshare", "-m", "--propagation",
                                      "private", "sh", "-c", script], stdout=log, stderr=log,
                                     start_new_session=True)

    def _write_known_hosts(self):
        with open(self.known_hosts, "w") as f:
            for host in self.hosts:
                with open(self.host_key_files[host.name] + ".pub") as pub:
                    kind, key = pub.read().split()[:2]
                f.write(f"{host.address} {kind} {key}\n")

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while True:
                if host.sshd.poll() is not None:
                    raise LabError(f"sshd on {host.name} exited: see {self.dir}/{host.namespace}/sshd.log")
                try:
                    with socket.create_connection((host.address, 22), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise LabError(f"sshd on {host.name} ({host.address}) did not come up")
                    time.sleep(0.05)

    # -- systemd hosts -----------------------------------------------------------------------
    # systemd=True: the machine's own /lib/systemd/systemd runs as PID 1 of a PID, mount, UTS, IPC
    # and cgroup namespace inside the host's network namespace, in a cgroup of its own
    # (fleet-lab-NAMESPACE in the name=systemd and the cgroup2 hierarchy; the cgroup namespace
    # makes that its root). Its /run and /var/lib/systemd are private tmpfs, its
    # /etc/systemd/system a directory of the host's own (kept across reboot()), and it sees no
    # unit of the machine: SYSTEMD_UNIT_PATH holds only that directory and a few empty targets, and
    # no generator runs. So it boots in milliseconds, starts nothing but what is enabled there,
    # and touches nothing of the machine (no sysctl, no tmpfiles, no journal). The host's sshd is
    # started inside the same namespaces (nsenter), so a login sees /run/systemd/system and its
    # systemctl talks to this systemd; pids in a host's files are pids of its PID namespace.
    SYSTEMD_TARGETS = ("default", "multi-user", "basic", "sysinit", "sockets", "timers", "paths", "slices",
                       "local-fs", "network", "network-online", "shutdown", "umount", "final", "halt",
                       "poweroff", "reboot", "exit", "emergency", "rescue")

    def _cgroups(self, host):
        return [f"/sys/fs/cgroup/{h}/fleet-lab-{host.namespace}" for h in ("systemd", "unified")]

    def _boot(self, host, timeout=20):
        base = os.path.join(self.dir, host.namespace)
        units, etc, empty = (os.path.join(base, d) for d in ("units", "etc-systemd-system", "generators"))
        if not os.path.isdir(units):
            for d in (units, etc, empty):
                os.makedirs(d)
            for target in self.SYSTEMD_TARGETS:
                with open(os.path.join(units, f"{target}.target"), "w") as f:
                    f.write(f"[Unit]\nDescription={target} (lab host: empty)\nDefaultDependencies=no\n"
                            "AllowIsolate=yes\n")
            with open(os.path.join(units, "default.target"), "w") as f:
                f.write("[Unit]\nDescription=default (lab host)\nRequires=multi-user.target\n"
                        "After=multi-user.target\nAllowIsolate=yes\n")
            with open(os.path.join(units, "system.slice"), "w") as f:
                f.write("[Unit]\nDescription=System Slice\nDefaultDependencies=no\n")
        q = shlex.quote
        inner = "; ".join([
            "set -e",
            "mount -t tmpfs -o mode=755 tmpfs /run", "mkdir -p /run/sshd",
            f"mount --bind {q(etc)} /etc/systemd/system", "mount -t tmpfs -o mode=755 tmpfs /var/lib/systemd",
            f"mount --bind {q(host.srv)} /srv",
            "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup", "mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified",
            "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified",
            f"exec env container=fleet-test SYSTEMD_UNIT_PATH={q('/etc/systemd/system:' + units)} "
            f"SYSTEMD_GENERATOR_PATH={q(empty)} SYSTEMD_ENVIRONMENT_GENERATOR_PATH={q(empty)} "
            "/lib/systemd/systemd --system --log-target=kmsg --log-level=warning",
        ])
        # set -e: systemd must never start outside its cgroup (it would take the hierarchy's root).
        outer = "; ".join(["set -e", *[f"mkdir -p {q(cg)}; echo $$ > {q(cg)}/cgroup.procs" for cg in self._cgroups(host)],
                           f"exec nsenter --net=/run/netns/{q(host.namespace)} unshare --pid --fork --mount "
                           f"--uts --ipc --cgroup --mount-proc --propagation private sh -c {q(inner)}"])
        log = open(os.path.join(base, "init.log"), "a")
        host.init = subprocess.Popen(["sh", "-c", outer], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if host.init.poll() is not None:
                raise LabError(f"systemd on {host.name} exited: see {base}/init.log and dmesg")
            if self._pid1(host):
                state = subprocess.run(self._enter(host, "systemctl", "is-system-running"), capture_output=True,
                                       text=True, timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.05)
        raise LabError(f"systemd on {host.name} did not come up (state {state!r}): see {base}/init.log")

    @staticmethod
    def _pid1(host):
        """The host's systemd, as a pid of this machine: unshare's only child."""
        try:
            with open(f"/proc/{host.init.pid}/task/{host.init.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def _enter(self, host, *cmd):
        return ["nsenter", "-t", str(self._pid1(host)), "-m", "-p", "-u", "-i", "-n", *cmd]

    def _start_sshd_beside_systemd(self, host, config):
        log = open(os.path.join(self.dir, host.namespace, "sshd.log"), "w")
        host.sshd = subprocess.Popen(self._enter(host, "/usr/sbin/sshd", "-D", "-e", "-f", config), stdout=log,
                                     stderr=log, start_new_session=True)

    def _halt(self, host, timeout=10):
        """Everything of a systemd host ends at once: SIGKILL to its PID 1 ends its PID namespace."""
        pid1 = self._pid1(host)
        if pid1:
            try:
                os.kill(pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in (host.init, host.sshd):
            if proc is not None:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        # The cgroups systemd made, deepest first, once their processes are gone.
        deadline = time.monotonic() + timeout
        for cgroup in self._cgroups(host):
            for top, _, _ in sorted(os.walk(cgroup), key=lambda w: -w[0].count("/")):
                while True:
                    try:
                        os.rmdir(top)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)

    def reboot(self, name):
        """A systemd host goes down hard (power cut: SIGKILL to everything in it) and boots again:
        its /srv and /etc/systemd/system stay, everything else is new."""
        host = self.host(name)
        self._halt(host)
        self._boot(host)
        self._start_sshd(host)
        self.wait_ready()

    def systemctl(self, name, *args, check=False):
        """`systemctl ARGS` on a systemd host, as its root sees it: (exit code, stdout)."""
        proc = subprocess.run(self._enter(self.host(name), "systemctl", *args), capture_output=True, text=True,
                              timeout=30)
        if check and proc.returncode != 0:
            raise LabError(f"systemctl {' '.join(args)} on {name}: {proc.stderr.strip()}")
        return proc.returncode, proc.stdout

    # -- use ---------------------------------------------------------------------------------
    def host(self, name):
        return next(h for h in self.hosts if h.name == name)

    def exec(self, name, *cmd, check=True):
        """Runs a command inside a host's network namespace (for tests: kill, inspect); on a
        systemd host inside all its namespaces, so the pids in its files mean what they say."""
        host = self.host(name)
        argv = self._enter(host, *cmd) if self.systemd else ["ip", "netns", "exec", host.namespace, *cmd]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise LabError(f"{cmd} on {name}: {proc.stderr.strip()}")
        return proc.stdout

    def processes(self, name):
        """{pid: argv} of the processes in a host's network namespace. (pkill and friends see
        every process of the machine, other labs' too: select by namespace first.)"""
        found = {}
        for pid in _run("ip", "netns", "pids", self.host(name).namespace).split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found[int(pid)] = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                pass  # exited meanwhile
        return found

    def stop_sshd(self, name):
        host = self.host(name)
        os.killpg(host.sshd.pid, signal.SIGTERM)
        host.sshd.wait(timeout=10)

    def start_sshd(self, name):
        host = self.host(name)
        self._start_sshd(host)
        self.wait_ready()

    def sshd_log(self, name):
        with open(os.path.join(self.dir, self.host(name).namespace, "sshd.log")) as f:
            return f.read()

    def envoy_admin(self, name, path, service="inference", root="fleet"):
        """Body of a GET from an Envoy's admin on host `name`, by fleet's own step script: its Unix
        socket under the host's /srv is a file this machine's root can open from any namespace."""
        socket_path = os.path.join(self.host(name).srv, root, "envoy", service, "admin.sock")
        return _run("sh", "-c", commands.envoy_admin_get(sys.executable, socket_path, path, 10))

    def inventory_hosts(self, root="/srv/fleet"):
        """The `hosts:` mapping of an inventory for these hosts. The hosts share this machine's
        filesystem, so the interpreter running the tests (with grpcio) is root's Python there too;
        a plain user gets host_python() and its own name."""
        login = {"user": self.user} if self.user else {}
        return {h.name: {"address": h.address, **login, "key": self.client_key, "known_hosts": self.known_hosts,
                         "root": root, "python": self.python} for h in self.hosts}

    # -- teardown ----------------------------------------------------------------------------
    def destroy(self):
        for host in self.hosts:
            # Everything started inside the namespace: sshd and what fleet started through it.
            pids = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True).stdout
            regions = envoy_regions(pids.split())
            if self.systemd and host.init is not None:
                self._halt(host)
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            remove_files(regions)
            if host.sshd:
                try:
                    host.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        for i in range(self.count):
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.sudo and os.path.exists(self.sudoers):
            os.unlink(self.sudoers)
        if self._user_created:
            # Its processes lived in the namespaces, killed above; -r removes its home.
            subprocess.run(["userdel", "-r", self.user], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class BastionLab(HostLab):
    """A bastion (h0, on the lab's bridge) and private hosts p0, p1, ... on a second bridge that has
    no address on this machine, reachable only through the bastion's second interface (a blackhole
    route keeps a direct attempt on this machine). Every login is `user`, a /bin/sh account with
    passwordless sudo; `ssh_config` reaches every host by an alias (lab-h0, lab-p0, ...). Uses lab
    ids lab_id and lab_id + 1 (the private subnet)."""

    def __init__(self, private=2, lab_id=None):
        super().__init__(1, lab_id, plain_user=True, sudo=True)  # the lab's /bin/sh login, with sudo
        self.private = private
        self.private_subnet = f"{SUBNET_BASE}.{self.lab_id + 1}"
        self.private_bridge = f"{self.tag}pbr"
        self.ssh_config = os.path.join(self.dir, "ssh_config")
        self.blackholed = False

    def create(self):
        os.chmod(self.dir, 0o755)  # sshd reads the authorized key (the .pub) as the login user
        super().create()
        _run("ip", "link", "add", self.private_bridge, "type", "bridge")
        _run("ip", "link", "set", self.private_bridge, "up")
        _run("ip", "route", "add", "blackhole", f"{self.private_subnet}.0/24")
        self.blackholed = True
        bastion = self.hosts[0]
        self._add_interface(bastion.namespace, f"{self.tag}b", self.private_bridge, "eth1", f"{self.private_subnet}.1")
        private = [self._create_host(i, kind="p", bridge=self.private_bridge, subnet=self.private_subnet)
                   for i in range(self.private)]
        self.hosts += private
        self._write_known_hosts()
        for host in private:
            self._start_sshd(host)
        self._wait_private(private)
        self._write_ssh_config()

    def _wait_private(self, hosts, timeout=20):
        """sshd listening, seen from inside each host (this machine cannot reach them)."""
        deadline = time.monotonic() + timeout
        for host in hosts:
            while f"{host.address}:22" not in self.exec(host.name, "ss", "-Htln"):
                if host.sshd.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"sshd on {host.name} ({host.address}) did not come up")
                time.sleep(0.05)

    def _write_ssh_config(self):
        with open(self.ssh_config, "w") as f:
            for host in self.hosts:
                f.write(f"Host lab-{host.name}\n  HostName {host.address}\n")
            f.write(f"Host lab-p*\n  ProxyJump lab-{self.hosts[0].name}\n")
            f.write(f"Host lab-*\n  User {self.user}\n  IdentityFile {self.client_key}\n  IdentitiesOnly yes\n"
                    f"  UserKnownHostsFile {self.known_hosts}\n")

    def inventory_hosts(self, root="/srv/fleet"):
        """Every host by its ssh config alias, as the login user with become: true; Debian's
        /usr/bin/python3 (no grpcio) is their Python, and fleet builds the venv the services need."""
        return {h.name: {"address": h.address, "ssh_host": f"lab-{h.name}", "root": root,
                         "python": "/usr/bin/python3", "venv": True, "become": True} for h in self.hosts}

    def destroy(self):
        super().destroy()
        for i in range(self.private):
            subprocess.run(["ip", "link", "del", f"{self.tag}p{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.tag}b"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.private_bridge], capture_output=True)
        if self.blackholed:
            subprocess.run(["ip", "route", "del", "blackhole", f"{self.private_subnet}.0/24"], capture_output=True)
