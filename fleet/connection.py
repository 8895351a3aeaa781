"""Connectors: how fleet reaches a host. The only module that talks to hosts.

ssh: one paramiko connection per host, reused for the run's one shell session and its tunnels.
local: this machine, through /bin/sh, for the embedded default inventory.
Both run commands.session() and feed it step scripts through a ScriptSession."""

import contextlib
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

import paramiko

from fleet import commands


# paramiko logs refused channels to stderr; fleet reports what matters itself.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


class ConnectFailed(Exception):
    """The host could not be reached, authenticated or locked; the message says why, in one line."""


class Locked(ConnectFailed):
    """Another run holds the host's deploy lock."""


@dataclass(frozen=True)
class Result:
    exit_code: int
    output: str  # stdout and stderr, interleaved as produced


def connect(host, accept_new_host_keys=False, timeout=10.0):
    if host.connection == "local":
        return LocalConnection()
    return SSHConnection(host, accept_new_host_keys, timeout)


class ScriptSession:
    """A running commands.session(): send a step script (and the files it receives), read its
    output up to `@@done`. One step at a time."""

    def __init__(self, write, close_write, chunks, exit_status):
        self._write, self._close_write, self._exit_status = write, close_write, exit_status
        self._lines = _lines(chunks)
        self.closed = False

    def start(self):
        """Waits for the session to hold the lock; raises ConnectFailed naming the holder if not."""
        seen = []
        for line in self._lines:
            if line == "@@ready":
                return
            seen.append(line)
            if line.startswith("@@locked "):
                raise Locked(f"locked by another deploy: {line[9:] or 'holder unknown'} "
                                    "(--wait-lock SECONDS to wait, --break-lock if it is stale)")
        raise ConnectFailed(f"remote session ended: {_last(seen)}")

    def run(self, script, payload=(), on_line=None):
        self._write((script + f"\n{commands.RUN_MARKER}\n").encode())
        error = []
        feeder = threading.Thread(target=self._send_files, args=(payload, error), daemon=True)
        feeder.start()
        output = []
        for line in self._lines:
            if line.startswith("@@done "):
                feeder.join()
                return Result(exit_code=int(line[7:]), output="\n".join(output))
            output.append(line)
            if on_line:
                on_line(line)
        feeder.join()
        raise ConnectFailed(f"connection lost during a step: {error[0] if error else _last(output)}")

    def _send_files(self, payload, error):
        try:
            for _, spec in payload:
                if spec.content is not None:
                    self._write(spec.content)
                else:
                    with open(spec.source, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            self._write(block)
        except (OSError, EOFError, paramiko.SSHException) as e:
            error.append(str(e) or type(e).__name__)

    def close(self):
        """Ends the session (releasing the lock) and waits for it to exit."""
        if not self.closed:
            self.closed = True
            try:
                self._close_write()
                for _ in self._lines:
                    pass
            except (OSError, EOFError, paramiko.SSHException):
                pass
            return self._exit_status()


def _lines(chunks):
    pending = b""
    for data in chunks:
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")


def _last(lines):
    meaningful = [l for l in lines if l.strip() and not l.startswith("@@")]
    return meaningful[-1] if meaningful else "no output"


class LocalConnection:
    def __init__(self):
        self.processes = []

    def start_session(self, script, shell_slot=None):
        """A ScriptSession running `script` (a shell costs nothing here: no slot needed)."""
        # A session of its own, as sshd gives: --break-lock can end it as a process group.
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)

        def write(data):
            proc.stdin.write(data)
            proc.stdin.flush()

        chunks = iter(lambda: proc.stdout.read1(65536), b"")
        session = ScriptSession(write, proc.stdin.close, chunks, proc.wait)
        session.start()
        return session

    def open_tcp(self, port):
        return socket.create_connection(("127.0.0.1", port), timeout=5)

    def close(self):
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Trust a host's key on first contact and record it; a changed key still fails (paramiko
    checks known keys before consulting the policy)."""

    _lock = threading.Lock()

    def __init__(self, known_hosts):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        with self._lock:
            os.makedirs(os.path.dirname(self.known_hosts) or ".", exist_ok=True)
            with open(self.known_hosts, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class SSHConnection:
    def __init__(self, host, accept_new_host_keys, timeout):
        self.host = host
        self.client = paramiko.SSHClient()
        if os.path.exists(host.known_hosts):
            self.client.load_host_keys(host.known_hosts)
        policy = _AcceptNewPolicy(host.known_hosts) if accept_new_host_keys else paramiko.RejectPolicy()
        self.client.set_missing_host_key_policy(policy)
        try:
            self.client.connect(host.address, port=host.port, username=host.user, key_filename=host.key,
                                look_for_keys=host.key is None, allow_agent=host.key is None, timeout=timeout,
                                banner_timeout=timeout, auth_timeout=timeout)
        except paramiko.BadHostKeyException as e:
            raise ConnectFailed(f"host key mismatch: {host.address} presented a {e.key.get_name()} key that does "
                                f"not match {host.known_hosts}; refusing to connect") from None
        except paramiko.AuthenticationException:
            raise ConnectFailed(f"authentication refused for {host.user}@{host.address}") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise ConnectFailed(f"unknown host key: {host.address} is not in {host.known_hosts} "
                                    "(add it, or pass --accept-new-host-keys to trust it on first contact)") from None
            raise ConnectFailed(f"ssh error: {e}") from None
        except paramiko.ssh_exception.NoValidConnectionsError as e:
            reasons = sorted({err.strerror or str(err) for err in e.errors.values()})
            raise ConnectFailed(f"unreachable: {host.address}:{host.port}: {', '.join(reasons)}") from None
        except (OSError, EOFError) as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise ConnectFailed(f"unreachable: {host.address}:{host.port}: {reason}") from None

    def start_session(self, script, shell_slot=contextlib.nullcontext()):
        """A ScriptSession running `script` as the one SSH command of the run, started inside
        `shell_slot` (a context manager that limits how many login shells start at once)."""
        with shell_slot:
            channel = self.client.get_transport().open_session()
            channel.set_combine_stderr(True)
            channel.exec_command(script)
            chunks = iter(lambda: channel.recv(65536), b"")
            session = ScriptSession(channel.sendall, channel.shutdown_write, chunks, channel.recv_exit_status)
            session.start()
        return session

    def open_tcp(self, port):
        """A channel to 127.0.0.1:port as seen from the host (its admin interfaces bind there)."""
        try:
            return self.client.get_transport().open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0),
                                                             timeout=5)
        except paramiko.SSHException as e:
            raise OSError(f"tunnel to 127.0.0.1:{port} on {self.host.name} refused: {e}") from None

    def close(self):
        self.client.close()
