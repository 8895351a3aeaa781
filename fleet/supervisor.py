"""Keeps one service process alive on a host: everywhere fleet cannot use systemd, and for Envoy
(hot restart) everywhere; pushed to hosts like an artifact.

Standard library only, Python 3.9+: it runs with the host's python3, where fleet is not installed.

    python3 supervisor.py start  ROOT NAME [options] [--hot-restart] [--listen S [PORT...]] -- COMMAND...
    python3 supervisor.py reload ROOT NAME [--listen S [PORT...]] -- COMMAND...
    python3 supervisor.py stop   ROOT NAME [--grace S]
    python3 supervisor.py status ROOT NAME
    python3 supervisor.py listening ROOT NAME [--timeout S] [PORT...]
    python3 supervisor.py mark   ROOT NAME TEXT

`listening` waits until the process in NAME.started (written by fleet's host scripts: the pid
the last start began) listens on every PORT. `start` and `reload` with --listen S wait the same
way for the process they began, after their state line, and print a second line: `ok`, or why
not. `mark`, and --mark TEXT of start and reload, record
where what fleet does now begins in NAME.log (NAME.logpos) and append `== TIME TEXT` to it.

One supervisor process per service process, not one per host root: a supervisor then has a
single child, no protocol to add or remove services, no config to reload, and a bug or crash in
it touches one backend only; start/stop map one to one onto a systemd unit where the host has
systemd. It costs one small Python process (~10 MB) per service process, which hosts afford.

`start` forks the supervisor, which enters a new session (setsid: the SSH session ending does
not reach it) once it has written NAME.sup, stdin /dev/null, every inherited fd above 2 closed
(fd 9 holds fleet's deploy lock), umask 077. The supervisor runs COMMAND (no shell; pass `sh -c '...'` for one) with cwd ROOT and
FLEET_PROC=ROOT/NAME in its environment, in a process group of its own, and with
PR_SET_PDEATHSIG=SIGKILL on Linux: if the supervisor itself is killed (-9), its child dies with
it, so a service never runs unsupervised; `status` then reports `state=dead` and the next
`start` brings both back. Any exit that `stop` did not ask for is restarted, like systemd's
Restart=always: the first after --backoff-min seconds, then doubling up to --backoff-max while
the process keeps exiting within --stable seconds of its start; a run of --stable seconds or
more resets the delay.

With --hot-restart (Envoy), the child's environment also carries FLEET_RESTART_EPOCH,
FLEET_BASE_ID and FLEET_HOT_RESTART_SOCKET for its `--restart-epoch`, `--base-id` and
`--socket-path`, and `reload` replaces the child without a moment in which nothing serves: the
supervisor starts COMMAND as the next epoch beside the running one, which hands its listening
sockets over and exits by itself once drained. The exit of such a retiring epoch is expected, not
a crash. If the new epoch exits while an older one still holds its listeners (it never took
them over), the older one is the child again, with its command; if the older one had handed them
over, it is ended and the process starts afresh. A crash with no older epoch alive restarts at
epoch 0. Each epoch 0 gets a new random base id (Envoy names its /dev/shm region after it, and
/dev/shm is shared by every Envoy on the machine); the hot-restart sockets are files under
ROOT/run, which only this user reaches. The state line names the base id: a supervisor killed
with -9 removes neither, so the next `start` or `stop` of NAME does (fleet's stop step calls it).

The child's stdout and stderr go through a pipe to ROOT/log/NAME.log (mode 0640), rotated by
size: NAME.log.1 .. NAME.log.K hold the older output. Supervisor events are lines starting with
`== ` in the same log.

Files in ROOT/run (mode 0600):
    NAME.pid    the child's pid (what fleet's listen checks read), absent while none runs
    NAME.sup    the supervisor's pid; its environment carries FLEET_SUPERVISOR=ROOT/NAME
    NAME.state  one line of key=value: state (running, backoff, stopping, stopped), supervisor,
                pid, restarts, last_exit (exit:N, SIGNAME or exec:ERROR), last_exit_at,
                started_at, delay (seconds before the next start while in backoff), epoch
                (the child's restart epoch; - without --hot-restart), reloads, spawned (the pid
                of the latest start, a reload's new epoch included, alive or not)
    NAME.stop   written by `stop`: the grace period the supervisor gives the child
    NAME.next   written by `reload`: the next epoch's command (JSON), read and removed on SIGUSR1

`status` prints NAME.state's line with `state` corrected by what is alive (`dead`: the
supervisor is gone; `absent`: never started) and exits 0 if the state is running, else 3.
Bad arguments: one line on stderr, exit 2.
"""

import errno
import os
import select
import selectors
import signal
import sys
import time

# Few imports, and none of re, argparse or subprocess (with them a call took 26 ms, without 12):
# `start` and `listening` run for every process a deploy starts, on every host at once. What only
# some paths use, and costs more, is imported there (ctypes, glob, json).

NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@")
NAME_CHARS = NAME_FIRST | frozenset(".-")
PR_SET_PDEATHSIG = 1
READ_CHUNK = 65536
NOT_RUNNING = 3
RELOAD_SECONDS = 10  # `start` and `reload` wait this long, at most, for the supervisor to record the change
# Envoy's shared memory is /dev/shm/envoy_shared_memory_<10 * base id>: base ids stay below 2**32 / 10.
BASE_IDS = 100_000_000


class Usage(Exception):
    """A bad argument: reported on one line, exit 2."""


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def exit_reason(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return signal.Signals(sig).name
        except ValueError:
            return f"signal:{sig}"
    return f"exit:{os.WEXITSTATUS(status)}"


def carries(pid, marker):
    """Is `pid` alive, ours (this user's), and does its environment hold `marker`? A recycled pid
    does not, nor another user's process that sets the marker for itself."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker.encode() in f.read().split(b"\0")
    except (OSError, ValueError):
        return False


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def write_atomic(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_state(line):
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def format_state(fields):
    return " ".join(f"{key}={value}" for key, value in fields.items())


class Paths:
    def __init__(self, root, name):
        if not os.path.isabs(root):
            raise Usage(f"ROOT must be an absolute path: {root!r}")
        if not name or name[0] not in NAME_FIRST or not set(name) <= NAME_CHARS:
            raise Usage(f"NAME must be letters, digits and _.@- (not starting with . or -): {name!r}")
        self.root, self.name = root, name
        self.run_dir, self.log_dir = os.path.join(root, "run"), os.path.join(root, "log")
        self.pid = os.path.join(self.run_dir, f"{name}.pid")
        self.sup = os.path.join(self.run_dir, f"{name}.sup")
        self.state = os.path.join(self.run_dir, f"{name}.state")
        self.stop = os.path.join(self.run_dir, f"{name}.stop")
        self.next = os.path.join(self.run_dir, f"{name}.next")
        self.started = os.path.join(self.run_dir, f"{name}.started")  # fleet's host scripts write it
        self.logpos = os.path.join(self.run_dir, f"{name}.logpos")
        self.hot_restart = os.path.join(self.run_dir, f"{name}.hot-restart")  # Envoy adds _parent_ID ...
        self.log = os.path.join(self.log_dir, f"{name}.log")
        self.proc_marker = f"FLEET_PROC={root}/{name}"
        self.sup_marker = f"FLEET_SUPERVISOR={root}/{name}"

    def make_dirs(self):
        for directory in (self.root, self.run_dir, self.log_dir):
            os.makedirs(directory, mode=0o700, exist_ok=True)

    def live_supervisor(self):
        pid = read_pid(self.sup)
        return pid if pid and carries(pid, self.sup_marker) else None

    def live_child(self):
        pid = read_pid(self.pid)
        return pid if pid and carries(pid, self.proc_marker) else None

    def read_state(self):
        try:
            with open(self.state) as f:
                return parse_state(f.read())
        except OSError:
            return {}


class RotatingLog:
    """Appends to PATH; when the next bytes would pass max_bytes, PATH becomes PATH.1 (PATH.1
    becomes PATH.2 ...; PATH.keep is dropped) and a fresh PATH is opened."""

    def __init__(self, path, max_bytes, keep):
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self._open()

    def _open(self):
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.fchmod(self.fd, 0o640)  # umask 077 would leave 0600; the log is group-readable
        self.size = os.fstat(self.fd).st_size

    def _rotate(self):
        os.close(self.fd)
        self.fd = None
        for i in range(self.keep - 1, 0, -1):
            if os.path.exists(f"{self.path}.{i}"):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        if self.keep > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._open()

    def write(self, data):
        """Drops what cannot be written (a full disk): the service must not die of its log."""
        try:
            if self.fd is None:  # a rotation that failed half-way: try again with a fresh file
                self._open()
            while data:
                room = self.max_bytes - self.size
                if room <= 0:
                    self._rotate()
                    continue
                part, data = data[:room], data[room:]
                os.write(self.fd, part)
                self.size += len(part)
        except OSError:
            pass

    def event(self, text):
        self.write(f"== {utc_now()} supervisor: {text}\n".encode())


def _pdeathsig_setter():
    """A preexec function giving the child SIGKILL when the supervisor dies (Linux), and its own
    process group so that stop reaches the children it forks."""
    supervisor_pid = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec():
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
                os._exit(1)

    return preexec


def new_base_id():
    """Envoy's --base-id for a new run of epochs (epoch 0): random, so that neither another Envoy
    on the machine (namespace hosts share one /dev/shm) nor a local user who would plant its
    shared-memory file can know it beforehand; never 0, Envoy's default."""
    # 64 random bits folded onto the range: a bias below 1e-10 (the secrets module costs 3 ms to import).
    return int.from_bytes(os.urandom(8), "big") % (BASE_IDS - 1) + 1


def shared_memory(base):
    """The file Envoy leaves in /dev/shm for its hot-restart region of base id `base`."""
    return f"/dev/shm/envoy_shared_memory_{base * 10}"


def socket_files(paths, suffix="*"):
    """Envoy's hot-restart socket files of NAME under ROOT/run whose id ends the name with `suffix`."""
    import glob

    return glob.glob(f"{glob.escape(paths.hot_restart)}_*_{suffix}")


def forget_dead_run(paths):
    """What the Envoy of a supervisor that died without its clean-up (SIGKILL, a crash) left: its
    /dev/shm region, which is the machine's and outlives ROOT, named by the base id of the
    supervisor's last state line, and its hot-restart sockets. Only once nothing of NAME lives."""
    base = paths.read_state().get("base_id", "-")
    if not (base.isascii() and base.isdigit() and 0 < int(base) < BASE_IDS):
        return
    if not paths.live_supervisor() and not paths.live_child():
        remove_quietly([shared_memory(int(base)), *socket_files(paths)])


def remove_quietly(paths):
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def listeners():
    """{port: socket inodes} of every TCP socket in LISTEN state in this network namespace. Each
    read of these tables walks the kernel's whole connection hash (about 1 ms here, whatever the
    namespace holds): callers read them only when they must."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A":
                        found.setdefault(int(fields[1].rsplit(":", 1)[1], 16), set()).add(fields[9])
        except (OSError, IndexError, ValueError):
            pass
    return found


def socket_inodes(pid, fds=None):
    """The inodes of the sockets process `pid` holds (empty if it is gone); `fds`: its open
    descriptors, if listed already."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd") if fds is None else fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def holds_listener(pid):
    """Does process `pid` hold a listening TCP socket? An Envoy epoch that handed its listeners
    over and drains holds none."""
    held = socket_inodes(pid)
    return any(inodes & held for inodes in listeners().values())


def gone(pid):
    """Exited, or a zombie its parent has not reaped yet."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


SHELL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@%+=:,./-_")


def shell_join(words):
    """A command as a shell would read it back (shlex.join, whose import costs re's 4 ms)."""
    return " ".join(w if w and set(w) <= SHELL_SAFE else "'" + w.replace("'", "'\"'\"'") + "'" for w in words)


class Child:
    """A process the supervisor started (what subprocess.Popen would be, without its 10 ms import)."""

    def __init__(self, pid):
        self.pid = pid


def start_process(command, cwd, env, output, preexec):
    """Forks and execs `command` (PATH from `env`) in `cwd`: stdin /dev/null, stdout and stderr to
    the descriptor `output`, SIGPIPE and SIGXFSZ back to their defaults (Python ignores them), after
    preexec(); every other descriptor of the supervisor is close-on-exec. An exec that fails raises
    its OSError here, as Popen's would."""
    errors_read, errors_write = os.pipe()  # close-on-exec: EOF on it means the exec happened
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_read)
            os.chdir(cwd)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            preexec()
            os.execvpe(command[0], command, env)
        except OSError as e:
            os.write(errors_write, str(e.errno).encode())
        finally:
            os._exit(127)
    os.close(errors_write)
    try:
        failed = os.read(errors_read, 32)
    finally:
        os.close(errors_read)
    if failed:
        os.waitpid(pid, 0)
        code = int(failed)
        raise OSError(code, os.strerror(code), command[0])
    return Child(pid)


class Supervisor:
    def __init__(self, paths, command, options):
        self.paths, self.command, self.options = paths, command, options
        self.log = RotatingLog(paths.log, options.log_max_bytes, options.log_keep)
        self.child = None  # a Child while one runs
        self.epoch = 0  # the child's restart epoch (--hot-restart)
        self.retiring = {}  # pid -> (Child, epoch, started, command): older epochs handing over to the child
        self.outputs = {}  # pid -> read end of that process's stdout/stderr pipe
        self.state = "starting"
        self.restarts = 0
        self.reloads = 0
        self.failures = 0  # consecutive exits within options.stable seconds of a start
        self.last_exit, self.last_exit_at, self.started_at = "-", "-", "-"
        self.started = 0.0
        self.spawned = "-"  # pid of the latest start, alive or not (a reload's new epoch may die at once)
        self.delay = 0.0
        self.restart_at = None
        self.kill_at = None
        self.term_requested = False
        self.reload_requested = False
        self.selector = selectors.DefaultSelector()
        self.preexec = _pdeathsig_setter()
        self.env = {k: v for k, v in os.environ.items() if k != "FLEET_SUPERVISOR"}
        self.env["FLEET_PROC"] = f"{paths.root}/{paths.name}"
        self.base_id = None  # with --hot-restart: the base id of the running epochs (new at each epoch 0)

    # -- records ---------------------------------------------------------------------------
    def record(self):
        fields = {"name": self.paths.name, "state": self.state, "supervisor": os.getpid(),
                  "pid": self.child.pid if self.child else "-", "restarts": self.restarts,
                  "last_exit": self.last_exit, "last_exit_at": self.last_exit_at,
                  "started_at": self.started_at, "delay": f"{self.delay:g}",
                  "epoch": self.epoch if self.options.hot_restart else "-", "reloads": self.reloads,
                  "spawned": self.spawned, "base_id": self.base_id if self.base_id is not None else "-"}
        write_atomic(self.paths.state, format_state(fields) + "\n")

    def write_pid(self):
        write_atomic(self.paths.pid, f"{self.child.pid}\n")

    # -- the child -------------------------------------------------------------------------
    def spawn(self, epoch=0):
        self.restart_at = None
        env = self.env
        if self.options.hot_restart:
            if epoch == 0:
                self.forget_base_id()
                self.base_id = new_base_id()
            # The hot-restart sockets: files under ROOT/run (0700, Envoy makes them 0600), where only
            # this user reaches them; relative to the child's cwd ROOT, so that the path stays short.
            env = dict(env, FLEET_RESTART_EPOCH=str(epoch), FLEET_BASE_ID=str(self.base_id),
                       FLEET_HOT_RESTART_SOCKET=os.path.relpath(self.paths.hot_restart, self.paths.root))
        read_end, write_end = os.pipe()
        try:
            child = start_process(self.command, self.paths.root, env, write_end, self.preexec)
        except OSError as e:
            os.close(read_end)
            os.close(write_end)
            self.last_exit, self.last_exit_at = f"exec:{errno.errorcode.get(e.errno, e.errno)}", utc_now()
            self.spawned = "-"
            self.log.event(f"cannot start {self.command[0]}: {e.strerror}")
            if self.retiring:
                self.serve_on()
            else:
                self.schedule_restart(ran=0.0)
            return
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.outputs[child.pid] = read_end
        self.selector.register(read_end, selectors.EVENT_READ, child.pid)
        self.child, self.epoch, self.spawned = child, epoch, child.pid
        self.started, self.started_at = time.monotonic(), utc_now()
        self.write_pid()
        self.state = "running"
        self.delay = 0.0
        self.log.event(f"started pid {child.pid}" + (f" (epoch {epoch})" if self.options.hot_restart else ""))
        self.record()

    def reload(self):
        """The next epoch, with the command `reload` left in NAME.next, beside the running one."""
        import json

        try:
            with open(self.paths.next) as f:
                command = json.load(f)
            os.unlink(self.paths.next)
        except (OSError, ValueError) as e:
            self.log.event(f"reload: no command to start ({e})")
            return
        if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
            self.log.event("reload: the command is not a list of strings")
            return
        command_before, self.command = self.command, command
        self.reloads += 1
        if self.state in ("stopping", "stopped"):
            return
        self.log.event(f"reload: {shell_join(command)}")
        if self.child is None:  # in backoff: start now, afresh
            self.spawn(0)
            return
        self.retiring[self.child.pid] = (self.child, self.epoch, self.started, command_before)
        self.child = None
        self.spawn(self.epoch + 1)

    def serve_on(self):
        """The new epoch is gone. If the newest older one still holds its listeners (the new one
        never took them over), it is the child again, with its command; if it handed them over
        and drains, it serves nothing and would never be told to exit: end every older epoch and
        start afresh at epoch 0."""
        pid = max(self.retiring, key=lambda p: self.retiring[p][1])
        if not holds_listener(pid):
            self.log.event(f"epoch {self.retiring[pid][1]} pid {pid} had handed its listeners over: ending it")
            for retired in self.retiring:
                try:
                    os.killpg(retired, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.schedule_restart(ran=0.0)
            return
        self.child, self.epoch, self.started, self.command = self.retiring.pop(pid)
        self.write_pid()
        self.state = "running"
        self.log.event(f"epoch {self.epoch} pid {pid} serves on")
        self.record()

    def hot_restart_sockets(self, epoch=None):
        """The socket files Envoy made under ROOT/run for an epoch of this base id (or any)."""
        return socket_files(self.paths, "*" if epoch is None else str(self.base_id * 10 + epoch))

    def forget_base_id(self):
        """Removes what the epochs before left (Envoy's /dev/shm region and its socket files); the
        state line then names no base id."""
        if self.base_id is not None:
            remove_quietly([shared_memory(self.base_id), *self.hot_restart_sockets()])
            self.base_id = None

    def drain_output(self, pid, until_eof=False):
        fd = self.outputs.get(pid)
        while fd is not None:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                if until_eof:  # a grandchild may hold the pipe: keep what is there, then let go
                    self.close_output(pid)
                return
            if not data:
                self.close_output(pid)
                return
            self.log.write(data)

    def close_output(self, pid):
        fd = self.outputs.pop(pid)
        self.selector.unregister(fd)
        os.close(fd)

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited(pid, status)

    def exited(self, pid, status):
        self.drain_output(pid, until_eof=True)
        reason = exit_reason(status)
        if pid in self.retiring:
            epoch = self.retiring.pop(pid)[1]
            remove_quietly(self.hot_restart_sockets(epoch))
            self.log.event(f"epoch {epoch} pid {pid} exited ({reason}), handed over")
        elif self.child is not None and pid == self.child.pid:
            self.child = None
            if self.base_id is not None:
                remove_quietly(self.hot_restart_sockets(self.epoch))
            try:
                os.unlink(self.paths.pid)
            except FileNotFoundError:
                pass
            self.last_exit, self.last_exit_at = reason, utc_now()
            self.log.event(f"process exited ({reason})")
            if self.state != "stopping":
                if self.retiring:
                    self.serve_on()
                else:
                    self.schedule_restart(ran=time.monotonic() - self.started)
        if self.state == "stopping" and self.child is None and not self.retiring:
            self.state = "stopped"

    def schedule_restart(self, ran):
        if ran >= self.options.stable:
            self.failures = 0
        self.failures += 1
        self.delay = min(self.options.backoff_max, self.options.backoff_min * 2 ** (self.failures - 1))
        self.restart_at = time.monotonic() + self.delay
        self.restarts += 1
        self.state = "backoff"
        self.log.event(f"restart {self.restarts} in {self.delay:g}s")
        self.record()

    def begin_stop(self):
        grace = self.options.grace
        try:
            with open(self.paths.stop) as f:
                grace = float(f.read().strip())
        except (OSError, ValueError):
            pass
        self.restart_at = None
        if self.child is None and not self.retiring:
            self.state = "stopped"
            return
        self.state = "stopping"
        self.record()
        self.log.event(f"stopping pid(s) {' '.join(map(str, self.pids()))} (SIGTERM, grace {grace:g}s)")
        self.signal_all(signal.SIGTERM)
        self.kill_at = time.monotonic() + grace

    def pids(self):
        return ([self.child.pid] if self.child else []) + list(self.retiring)

    def signal_all(self, sig):
        for pid in self.pids():
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass

    # -- the loop --------------------------------------------------------------------------
    def run(self, ready=None):
        wakeup_read, wakeup_write = os.pipe()
        for fd in (wakeup_read, wakeup_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wakeup_write)
        self.selector.register(wakeup_read, selectors.EVENT_READ)

        def request_stop(*_):
            self.term_requested = True

        def request_reload(*_):
            self.reload_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGUSR1, request_reload)
        # Caught, not ignored: an ignored signal would stay ignored in the child across exec.
        signal.signal(signal.SIGHUP, lambda *_: None)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd hears it
        self.log.event(f"supervising {self.paths.name}: {shell_join(self.command)}")
        self.spawn()
        if ready is not None:  # the first start is recorded (running, or backoff): `start` returns
            os.close(ready)
        while self.state != "stopped":
            for key, _ in self.selector.select(self.timeout()):
                if key.fd == wakeup_read:
                    while True:
                        try:
                            if not os.read(wakeup_read, 512):
                                break
                        except BlockingIOError:
                            break
                else:
                    self.drain_output(key.data)
            if self.term_requested and self.state not in ("stopping", "stopped"):
                self.begin_stop()
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            self.reap()
            now = time.monotonic()
            if self.restart_at is not None and now >= self.restart_at:
                self.spawn()
            if self.kill_at is not None and now >= self.kill_at and self.pids():
                self.log.event(f"grace over: SIGKILL pid(s) {' '.join(map(str, self.pids()))}")
                self.signal_all(signal.SIGKILL)
                self.kill_at = None
        self.forget_base_id()
        self.record()
        self.log.event("stopped")
        remove_quietly([self.paths.sup, self.paths.stop, self.paths.next])

    def timeout(self):
        deadlines = [t for t in (self.restart_at, self.kill_at) if t is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())


# -- commands ----------------------------------------------------------------------------------
def status_line(paths):
    """(line, running?) for `status`: the recorded state, corrected by what is alive."""
    fields = paths.read_state()
    if not fields:
        fields = {"name": paths.name, "state": "absent"}
    elif fields.get("state") != "stopped" and not paths.live_supervisor():
        fields["state"] = "dead"
        child = paths.live_child()
        fields["pid"] = child or "-"
    return format_state(fields), fields["state"] == "running"


def cmd_status(paths, _args):
    line, running = status_line(paths)
    print(line)
    return 0 if running else NOT_RUNNING


def cmd_start(paths, args):
    marker = f"{paths.root}/{paths.name}"
    if os.environ.get("FLEET_SUPERVISOR") != marker or "FLEET_PROC" in os.environ:
        # The supervisor is this process, forked; it is known by FLEET_SUPERVISOR in its initial
        # environment (/proc/PID/environ), which only exec sets. fleet's host scripts pass it, so
        # they never pay for this second interpreter.
        env = dict(os.environ, FLEET_SUPERVISOR=marker)
        env.pop("FLEET_PROC", None)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *args.argv], env)
    paths.make_dirs()
    running = paths.live_supervisor()
    if running:
        print(f"{paths.name}: already supervised by pid {running}; stop it first", file=sys.stderr)
        return 1
    # A child left by an older fleet (setsid start, no supervisor) would hold the ports.
    stop_orphan(paths, args.grace)
    for path in (paths.stop, paths.state):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.close(ready_read)
        code = 1
        try:
            code = run_supervisor(paths, args, ready=ready_write)
        finally:
            os._exit(code)
    os.close(ready_write)
    # Wait (bounded) until the supervisor has recorded its first start, so that the caller's
    # next step (a listen check on ROOT/run/NAME.pid) sees this run, not an earlier one: it closes
    # its end of the pipe then (or by exiting), no polling (a hundred hosts start at once).
    answered, _, _ = select.select([ready_read], [], [], RELOAD_SECONDS)
    os.close(ready_read)
    fields = paths.read_state()
    if fields.get("state") in ("running", "backoff"):
        print(format_state(fields), flush=True)
        report_listening(fields, args)
        return 0
    exited, status = os.waitpid(pid, os.WNOHANG)
    if exited:
        print(f"{paths.name}: supervisor exited at once ({exit_reason(status)}); see {paths.log}", file=sys.stderr)
    else:
        print(f"{paths.name}: supervisor pid {pid} recorded no state "
              f"{'' if answered else f'within {RELOAD_SECONDS}s'}; see {paths.log}", file=sys.stderr)
    return 1


def cmd_reload(paths, args):
    """Hands NAME over to COMMAND as its next epoch (a supervisor started with --hot-restart);
    returns once the supervisor has started it (NAME.pid names it), or exits 3 when no such
    supervisor runs NAME (the caller starts it instead)."""
    supervisor = paths.live_supervisor()
    fields = paths.read_state()
    if not supervisor or fields.get("epoch", "-") == "-" or fields.get("state") in ("stopping", "stopped"):
        print(f"{paths.name}: not run by a supervisor with --hot-restart; start it instead", file=sys.stderr)
        return NOT_RUNNING
    import json

    before = fields.get("reloads")
    write_atomic(paths.next, json.dumps(args.command))
    os.kill(supervisor, signal.SIGUSR1)
    deadline = time.monotonic() + RELOAD_SECONDS
    while time.monotonic() < deadline:
        fields = paths.read_state()
        if fields.get("reloads") != before:
            print(format_state(fields), flush=True)
            report_listening(fields, args)
            return 0
        if not paths.live_supervisor():
            print(f"{paths.name}: the supervisor exited during the reload; see {paths.log}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"{paths.name}: the supervisor did not take the reload within {RELOAD_SECONDS}s; see {paths.log}",
          file=sys.stderr)
    return 1


def mark(paths, text):
    """Where the output of what fleet does now begins in NAME.log (NAME.logpos: a failed start
    shows only its own lines), and a line saying what it does: `== TIME TEXT`."""
    paths.make_dirs()
    fd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.fchmod(fd, 0o640)
        write_atomic(paths.logpos, f"{os.fstat(fd).st_size}\n")
        os.write(fd, f"== {utc_now()} {text}\n".encode())
    finally:
        os.close(fd)
    return 0


def cmd_listening(paths, args):
    """Waits, at most --timeout seconds, until the process the last start began (NAME.started)
    listens on every PORT; exit 0, or one line on stdout saying why not and exit 1."""
    why = wait_listening(read_pid(paths.started), args.timeout, args.rest)
    if why:
        print(why)
    return 1 if why else 0


def report_listening(fields, args):
    """`start` and `reload` with --listen SECONDS: a second line, `ok` once the process this start
    began listens on every PORT (the rest of the arguments), or why not (as `listening`). One
    interpreter on the host instead of two, where a switch starts one process and waits for it."""
    if args.listen is not None:
        pid = fields.get("spawned", "")
        try:
            why = wait_listening(int(pid) if pid.isdigit() and pid.isascii() else None, args.listen, args.rest)
        except Exception as e:  # the start happened: its exit status must not say otherwise
            why = f"could not be checked: {e}"
        print(why or "ok", flush=True)


def wait_listening(pid, timeout, ports):
    """None once `pid` listens on every port in `ports`, or why not within `timeout` seconds. It
    looks every 50 ms at the process's descriptors, at its sockets only when those changed, and
    reads the kernel's listener tables only when its sockets changed: many hosts wait for many
    processes at once. Every 0.5 s it looks at all of them again (a socket that only now listens,
    or a descriptor reused for another socket)."""
    deadline = time.monotonic() + timeout
    fds, sockets, checked, refreshed_at = None, set(), None, 0.0
    while True:
        if pid is None or gone(pid):
            return "exited before listening"
        if not ports:  # a process that listens on nothing: started is all there is to wait for
            return None
        now = time.monotonic()
        refresh = now - refreshed_at >= 0.5 or now >= deadline  # the last look sees everything
        if refresh:
            refreshed_at = now
        try:
            listed = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            listed = []
        if listed != fds or refresh:
            fds, sockets = listed, socket_inodes(pid, listed)
        if sockets and (sockets != checked or refresh):
            checked = sockets
            table = listeners()
            if all(table.get(p, set()) & sockets for p in ports):
                return None
        if now >= deadline:
            return f"not listening on port(s) {' '.join(map(str, ports))} after {timeout:g}s"
        time.sleep(0.05)


def wait_gone(pid, marker, timeout):
    deadline = time.monotonic() + timeout
    while carries(pid, marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_orphan(paths, grace):
    """A child alive without a live supervisor: SIGTERM, grace, SIGKILL; then what its run left."""
    child = paths.live_child()
    if child:
        end_orphan(paths, child, grace)
    forget_dead_run(paths)


def end_orphan(paths, child, grace):
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            return
        if wait_gone(child, paths.proc_marker, wait):
            break
    try:
        os.unlink(paths.pid)
    except FileNotFoundError:
        pass


def cmd_stop(paths, args):
    supervisor = paths.live_supervisor()
    if supervisor:
        write_atomic(paths.stop, f"{args.grace:g}\n")
        os.kill(supervisor, signal.SIGTERM)
        # The supervisor's own SIGKILL fires at the end of the grace; 5 s more covers the reap.
        if not wait_gone(supervisor, paths.sup_marker, args.grace + 5):
            child = paths.live_child()
            os.kill(supervisor, signal.SIGKILL)  # its child follows (PDEATHSIG), or:
            if child:
                try:
                    os.killpg(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_gone(supervisor, paths.sup_marker, 5)
    stop_orphan(paths, args.grace)
    line, _ = status_line(paths)
    print(line)
    return 0


def positive(text):
    try:
        value = float(text)
    except ValueError:
        raise Usage(f"not a number: {text!r}") from None
    if value <= 0 or value != value or value == float("inf"):
        raise Usage(f"must be a positive number: {text!r}")
    return value


def non_negative(text):
    """Seconds, 0 included (a single look)."""
    return 0.0 if text in ("0", "0.0") else positive(text)


def non_negative_int(text):
    if not (text.isascii() and text.isdigit()):
        raise Usage(f"must be a whole number >= 0: {text!r}")
    return int(text)


def port(text):
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise Usage(f"not a TCP port: {text!r}")
    return int(text)


# option -> (attribute, what it converts its value with, default, the actions that take it);
# written out rather than argparse, which alone took a quarter of a start's 26 ms.
OPTIONS = {
    "--grace": ("grace", positive, 15.0, ("start", "stop")),  # SIGTERM to SIGKILL: a service drains, then finishes calls
    "--backoff-min": ("backoff_min", positive, 1.0, ("start",)),
    "--backoff-max": ("backoff_max", positive, 30.0, ("start",)),
    "--stable": ("stable", positive, 10.0, ("start",)),  # a run this long resets the backoff
    "--log-max-bytes": ("log_max_bytes", non_negative_int, 10 * 1024 * 1024, ("start",)),
    "--log-keep": ("log_keep", non_negative_int, 3, ("start",)),  # rotated logs kept
    "--mark": ("mark", str, None, ("start", "reload")),  # a line for NAME.log first (see mark())
    "--timeout": ("timeout", non_negative, 30.0, ("listening",)),
    "--listen": ("listen", non_negative, None, ("start", "reload")),  # then wait for PORT... (report_listening)
}
FLAGS = {"--hot-restart": ("hot_restart", ("start",))}  # Envoy's hot restart: `reload` hands over
# action -> (the positional arguments after ROOT NAME: how many at least, at most; their converter)
ACTIONS = {"start": (0, None, port), "reload": (0, None, port), "stop": (0, 0, str), "status": (0, 0, str),
           "listening": (0, None, port), "mark": (1, 1, str)}


class Args:
    def __init__(self, action):
        self.action = action
        for attribute, _, default, _ in OPTIONS.values():
            setattr(self, attribute, default)
        for attribute, _ in FLAGS.values():
            setattr(self, attribute, False)
        self.rest = []


def parse(head):
    """ACTION ROOT NAME [options] [ARG...] (what is before `--`); raises Usage."""
    if not head or head[0] not in ACTIONS:
        raise Usage(f"the first argument is one of {', '.join(ACTIONS)}: {' '.join(head[:1])!r}")
    args = Args(head[0])
    positional = []
    words = iter(head[1:])
    for word in words:
        option, has_value, value = word.partition("=")
        if option in OPTIONS and args.action in OPTIONS[option][3]:
            attribute, convert, _, _ = OPTIONS[option]
            if not has_value:
                value = next(words, None)
                if value is None:
                    raise Usage(f"{option} needs a value")
            setattr(args, attribute, convert(value))
        elif word in FLAGS and args.action in FLAGS[word][1]:
            setattr(args, FLAGS[word][0], True)
        elif word.startswith("--"):
            raise Usage(f"{args.action} takes no option {option}")
        else:
            positional.append(word)
    least, most, convert = ACTIONS[args.action]
    if len(positional) < 2 + least or (most is not None and len(positional) > 2 + most):
        raise Usage(f"{args.action}: wrong number of arguments: {' '.join(positional)!r}")
    args.root, args.name = positional[:2]
    args.rest = [convert(word) for word in positional[2:]]
    return args


def split_command(argv):
    """Everything after the first `--` is the command, verbatim (options in it are the command's)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv=None):
    os.umask(0o077)
    argv = sys.argv[1:] if argv is None else argv
    head, command = split_command(argv)
    try:
        args = parse(head)
        args.command, args.argv = command, argv
        if args.action not in ("start", "reload") and command:
            raise Usage(f"{args.action} takes no command")
        if args.action in ("start", "reload") and not command:
            raise Usage(f"{args.action} needs a command after --")
        if args.action == "start" and args.log_max_bytes < 1:
            raise Usage("--log-max-bytes must be at least 1")
        if args.rest and args.action in ("start", "reload") and args.listen is None:
            raise Usage(f"{args.action}: ports are what --listen waits for; there is no --listen")
        paths = Paths(args.root, args.name)
    except Usage as e:
        print(f"supervisor.py: {e}", file=sys.stderr)
        return 2
    if args.action in ("start", "reload") and args.mark is not None:
        mark(paths, args.mark)
    return {"start": cmd_start, "reload": cmd_reload, "stop": cmd_stop, "status": cmd_status,
            "listening": cmd_listening, "mark": lambda p, a: mark(p, *a.rest)}[args.action](paths, args)


def run_supervisor(paths, args, ready):
    """The forked supervisor: stdin and stdout /dev/null, every inherited descriptor above 2
    closed (the caller's pipes, fleet's deploy lock) but `ready`, which it closes once it has
    recorded its first start; then the loop."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for fd in [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2 and int(fd) != ready]:
        try:
            os.close(fd)
        except OSError:  # the descriptor of the listing itself, closed already
            pass
    os.chdir(paths.root)
    # Findable first (NAME.sup), then a session of its own: until setsid it shares the process
    # group of whatever ran `start`, so if that group is killed mid-start (a deploy's switch cut
    # off) this supervisor dies with it instead of coming up later where nobody looks for it.
    write_atomic(paths.sup, f"{os.getpid()}\n")
    os.setsid()
    supervisor = Supervisor(paths, args.command, args)
    try:
        supervisor.run(ready)
    except BaseException:
        import traceback
        supervisor.log.event("crashed: " + traceback.format_exc().replace("\n", " | "))
        supervisor.signal_all(signal.SIGKILL)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
