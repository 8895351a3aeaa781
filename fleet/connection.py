"""Connectors: how fleet reaches a host. The only module that talks to hosts.

ssh: one paramiko connection per host, for the run's one shell session.
local: this machine, through /bin/sh, for the embedded default inventory.
Both run commands.session() and feed it step scripts through a ScriptSession."""

import contextlib
import logging
import os
import select
import subprocess
import threading
import time
from dataclasses import dataclass

import paramiko

from fleet import commands, protocol, sshconfig


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


# --ask-become-pass: kept here, out of every object that is shown, logged or passed to a host.
_become_password = None


def use_become_password(password):
    """sudo on become hosts gets this password (on the session's input, never a command line)."""
    global _become_password
    if "\n" in password or "\r" in password:
        raise ValueError("a become password cannot contain a line break")
    _become_password = password


def connect(host, accept_new_host_keys=False, timeout=10.0):
    if host.connection == "local":
        return LocalConnection()
    return SSHConnection(host, accept_new_host_keys, timeout)


# How long closing a session may take (end of input, the shell exits, the lock is released)
# before fleet stops waiting for it.
CLOSE_SECONDS = 10.0


class ScriptSession:
    """A running commands.session(): send a step script (and the files it receives), read its
    output up to protocol.DONE. One step at a time, each within a deadline: a host whose session,
    sshd or machine stops answering fails that step (ConnectFailed) instead of hanging the run.

    recv(timeout) returns the next bytes of output (b"" at its end) or raises TimeoutError."""

    def __init__(self, write, close_write, recv, exit_status):
        self._write, self._close_write, self._recv, self._exit_status = write, close_write, recv, exit_status
        self._pending, self._ended = b"", False
        self.closed = False
        self.failure = None  # why the session can no longer be used, once a deadline passed
        self.machine = None  # "Linux x86_64": the host's `uname -s` `uname -m`, as its session started

    def start(self, timeout):
        """Waits for the session to hold the lock; raises ConnectFailed naming the holder if not."""
        seen = []
        deadline = time.monotonic() + timeout
        while (line := self._line(deadline, timeout, "start of the session")) is not None:
            if line == protocol.READY:
                return
            if line.startswith(protocol.MACHINE + " "):
                self.machine = line[len(protocol.MACHINE) + 1:].strip()
                continue
            seen.append(line)
            if line.startswith(protocol.LOCKED + " "):
                raise Locked(f"locked by another deploy: {line[len(protocol.LOCKED) + 1:] or 'holder unknown'} "
                             "(--wait-lock SECONDS to wait, --break-lock if it is stale)")
        raise ConnectFailed(f"remote session ended: {_last(seen)}")

    def run(self, script, timeout, what, payload=(), on_line=None, on_bytes=None):
        """Runs one step script; `what` names the step in the error if it takes over `timeout` s."""
        if self.failure:
            raise ConnectFailed(self.failure)
        deadline = time.monotonic() + timeout
        self._write(protocol.frame(script))
        error = []
        feeder = threading.Thread(target=self._send_files, args=(payload, error, on_bytes), daemon=True)
        feeder.start()
        output = []
        while (line := self._line(deadline, timeout, what)) is not None:
            code = protocol.done_code(line)
            if code is not None:
                feeder.join()
                if error:  # its input was ended: the session can run nothing more
                    self.failure = f"sending files failed: {error[0]}"
                    raise ConnectFailed(self.failure)
                return Result(exit_code=code, output="\n".join(output))
            output.append(line)
            if on_line:
                on_line(line)
        feeder.join(timeout=CLOSE_SECONDS)
        # What the host said last explains more than the send it cut short (a broken pipe).
        said = _last(output)
        raise ConnectFailed(f"connection lost during a step: {error[0] if error and said == NO_OUTPUT else said}")

    def _line(self, deadline, timeout, what):
        """The next output line, or None at the end of the output."""
        while b"\n" not in self._pending:
            if self._ended:
                line, self._pending = self._pending, b""
                return line.decode(errors="replace") if line else None
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                data = self._recv(remaining)
            except TimeoutError:
                # The stream is now mid-step: nothing more can be run on it.
                self.failure = f"no answer from the host session within {timeout:.0f} s ({what})"
                raise ConnectFailed(self.failure) from None
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            self._ended = not data
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")

    def _send_files(self, payload, error, on_bytes=None):
        """Sends each protocol.Sent's `size` bytes. A file that cannot be sent whole as it was
        measured (gone, grown, shrunk, rewritten while read) is not sent at all or not finished:
        the host's input is ended, so its receiver fails the step and nothing is placed.
        on_bytes(count), if given, after each block of a file artifact (progress of large ones)."""
        # Blocks go out as views of one buffer: paramiko's sendall slices what it has left after
        # every 32 KB packet, which for a bytes block copied ~16 MB per MB sent (half the
        # controller's CPU for the Envoy binary, where a deploy starves it of CPU the most).
        buffer = memoryview(bytearray(1 << 20))
        try:
            for sent in payload:
                if sent.body.content is not None:
                    self._write(sent.body.content)
                    continue
                with open(sent.body.source, "rb") as f:
                    left = sent.size if protocol.file_identity(os.fstat(f.fileno())) == sent.identity else -1
                    while left > 0 and (count := f.readinto(buffer[:min(left, len(buffer))])):
                        left -= count
                        # The last block goes out only if the file is still the one measured.
                        if not left and protocol.file_identity(os.fstat(f.fileno())) != sent.identity:
                            left = -1
                            break
                        self._write(buffer[:count])
                        if on_bytes:
                            on_bytes(count)
                    if left:
                        raise ChangedWhileSent(f"{sent.body.source} changed on the controller since fleet measured "
                                               f"it ({sent.size} bytes then): run again")
        except (OSError, EOFError, paramiko.SSHException, ChangedWhileSent) as e:
            error.append(str(e) or type(e).__name__)
            # The host must not wait for the rest, nor read it as script lines.
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._close_write()

    def close(self):
        """Ends the session (releasing the lock) and waits, boundedly, for it to exit: its exit
        code, or None if it did not end in time (a session that failed a deadline is not waited for)."""
        if self.closed:
            return None
        self.closed = True
        if self.failure:
            return None
        try:
            self._close_write()
            deadline = time.monotonic() + CLOSE_SECONDS
            while self._line(deadline, CLOSE_SECONDS, "end of the session") is not None:
                pass
        except (OSError, EOFError, paramiko.SSHException, ConnectFailed):
            return None
        return self._exit_status()


class ChangedWhileSent(Exception):
    """A controller file was not what was measured for the step's receiver when it was sent."""


NO_OUTPUT = "no output"


def _last(lines):
    meaningful = [l for l in lines if l.strip() and not protocol.is_report(l)]
    return meaningful[-1] if meaningful else NO_OUTPUT


class LocalConnection:
    def __init__(self, shell="/bin/sh"):
        self.shell = shell
        self.processes = []

    def start_session(self, script, timeout, shell_slot=None):
        """A ScriptSession running `script` (a shell costs nothing here: no slot needed)."""
        # A session of its own, as sshd gives: --break-lock can end it as a process group.
        proc = subprocess.Popen([self.shell, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)

        def write(data):
            proc.stdin.write(data)
            proc.stdin.flush()

        def recv(timeout):
            # The raw descriptor, not the buffered reader: select() must see every byte not yet read.
            if not select.select([proc.stdout], [], [], timeout)[0]:
                raise TimeoutError
            return os.read(proc.stdout.fileno(), 65536)

        def exit_status():
            try:
                return proc.wait(timeout=CLOSE_SECONDS)
            except subprocess.TimeoutExpired:
                return None

        session = ScriptSession(write, proc.stdin.close, recv, exit_status)
        session.start(timeout)
        return session

    def close(self):
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass  # a write still buffered for a session that is gone


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


def target(host):
    """The host's SSH target as resolved on load, or one made of its address, port, user and key."""
    if host.target is not None:
        return host.target
    return sshconfig.Hop(name=host.address, hostname=host.address, port=host.port, user=host.user,
                         identity_files=(host.key,) if host.key else (), look_for_keys=host.key is None,
                         known_hosts=host.known_hosts, accept_new_host_keys=False)


# AES-GCM first, as OpenSSH itself orders them: an AEAD cipher needs no separate HMAC over every
# packet. Pushing the 107 MB Envoy binary took 0.29 s of controller CPU with aes128-gcm against
# 0.39 s with aes128-ctr and hmac-sha2-256 (and a cold deploy pushes it while the hosts' services
# start on the same cores). The others stay, for servers without it.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _transport(sock, **kwargs):
    """The SSHClient's transport, with PREFERRED_CIPHERS first."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    supported = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(supported) + tuple(c for c in options.ciphers if c not in supported)
    return transport


def _open_client(hop, accept_new_host_keys, timeout, sock=None, via=""):
    """A connected, authenticated SSHClient for `hop` (through `sock`, a channel of a jump host,
    if given); every failure is a one-line ConnectFailed. `via` says through which jump host."""
    client = paramiko.SSHClient()
    if os.path.exists(hop.known_hosts):
        client.load_host_keys(hop.known_hosts)
    accept_new = accept_new_host_keys or hop.accept_new_host_keys
    client.set_missing_host_key_policy(_AcceptNewPolicy(hop.known_hosts) if accept_new else paramiko.RejectPolicy())
    try:
        client.connect(hop.hostname, port=hop.port, username=hop.user, key_filename=list(hop.identity_files) or None,
                       look_for_keys=hop.look_for_keys, allow_agent=hop.look_for_keys, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout, sock=sock,
                       transport_factory=_transport)
    except paramiko.BadHostKeyException as e:
        raise ConnectFailed(f"host key mismatch: {hop.hostname}{via} presented a {e.key.get_name()} key that does "
                            f"not match {hop.known_hosts}; refusing to connect") from None
    except paramiko.AuthenticationException:
        raise ConnectFailed(f"authentication refused for {hop.user}@{hop.hostname}{via}") from None
    except paramiko.SSHException as e:
        if "not found in known_hosts" in str(e):
            raise ConnectFailed(f"unknown host key: {hop.hostname}{via} is not in {hop.known_hosts} "
                                "(add it, or pass --accept-new-host-keys to trust it on first contact)") from None
        transport = client.get_transport()
        if transport is None or not transport.remote_version:  # a port that accepts but says nothing
            raise ConnectFailed(f"unreachable: {hop.hostname}:{hop.port}{via}: no SSH greeting within "
                                f"{timeout:.0f} s") from None
        raise ConnectFailed(f"ssh error{via}: {e}") from None
    except paramiko.ssh_exception.NoValidConnectionsError as e:
        reasons = sorted({err.strerror or str(err) for err in e.errors.values()})
        raise ConnectFailed(f"unreachable: {hop.hostname}:{hop.port}{via}: {', '.join(reasons)}") from None
    except (OSError, EOFError) as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ConnectFailed(f"unreachable: {hop.hostname}:{hop.port}{via}: {reason}") from None
    return client


class _Jumps:
    """One SSH connection per chain of jump hosts, shared by every host behind it: each host's
    connection is a direct-tcpip channel through it. Counted: the last host to close closes it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._chains = {}  # tuple of hops -> _Chain

    def channel(self, jumps, hop, accept_new_host_keys, timeout):
        """A channel to hop's address and port through the last of `jumps`; holds the chain until
        release(jumps)."""
        client = self._acquire(jumps, accept_new_host_keys, timeout)
        try:
            return client.get_transport().open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                                       timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.release(jumps)
            raise ConnectFailed(f"unreachable: {hop.hostname}:{hop.port} through {jumps[-1].name}: "
                                f"{str(e) or type(e).__name__}") from None

    def _acquire(self, jumps, accept_new_host_keys, timeout):
        with self._lock:
            chain = self._chains.setdefault(jumps, _Chain())
            chain.users += 1
        try:
            with chain.connecting:  # the first host connects; those behind the same chain wait for it
                if chain.error:
                    raise ConnectFailed(chain.error)
                if chain.client is None:
                    *outer, last = jumps
                    sock = self.channel(tuple(outer), last, accept_new_host_keys, timeout) if outer else None
                    try:
                        chain.client = _open_client(last, accept_new_host_keys, timeout, sock=sock,
                                                    via=f" (jump host {last.name})")
                    except ConnectFailed as e:
                        chain.error = str(e)  # the hosts waiting behind it fail the same way, at once
                        if outer:
                            self.release(tuple(outer))
                        raise
            return chain.client
        except ConnectFailed:
            self.release(jumps)
            raise

    def release(self, jumps):
        with self._lock:
            chain = self._chains[jumps]
            chain.users -= 1
            if chain.users:
                return
            del self._chains[jumps]
        if chain.client is not None:
            chain.client.close()
            if len(jumps) > 1:
                self.release(jumps[:-1])


class _Chain:
    def __init__(self):
        self.client = None  # paramiko.SSHClient of the chain's last jump host, once connected
        self.users = 0  # hosts (and longer chains) holding it
        self.error = None  # why connecting failed, for the hosts that were waiting
        self.connecting = threading.Lock()


_JUMPS = _Jumps()


class SSHConnection:
    def __init__(self, host, accept_new_host_keys, timeout):
        self.host = host
        hop = target(host)
        sock = _JUMPS.channel(host.jumps, hop, accept_new_host_keys, timeout) if host.jumps else None
        self._jumps = host.jumps  # the chain this connection holds, until close()
        try:
            self.client = _open_client(hop, accept_new_host_keys, timeout, sock=sock,
                                       via=f" (through {host.jumps[-1].name})" if host.jumps else "")
        except ConnectFailed:
            self._release_jumps()
            raise

    def _release_jumps(self):
        if self._jumps:
            _JUMPS.release(self._jumps)
            self._jumps = ()  # once, however often close() is called

    def start_session(self, script, timeout, shell_slot=contextlib.nullcontext()):
        """A ScriptSession running `script` as the one SSH command of the run, started inside
        `shell_slot` (a context manager that limits how many login shells start at once); it
        must be ready (holding the lock) within `timeout` seconds."""
        with shell_slot:
            try:
                channel = self.client.get_transport().open_session(timeout=timeout)
                # exec_command waits for sshd's answer without a deadline of its own: a stopped
                # sshd would hold it forever, so a timer closes the channel, which wakes it.
                watchdog = threading.Timer(timeout, channel.close)
                watchdog.start()
                try:
                    channel.set_combine_stderr(True)
                    self._exec(channel, script)
                finally:
                    watchdog.cancel()
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise ConnectFailed(f"no session from sshd within {timeout:.0f} s: {e or type(e).__name__}") from None

            def recv(remaining):
                channel.settimeout(remaining)
                return channel.recv(65536)

            def exit_status():
                return channel.recv_exit_status() if channel.status_event.wait(CLOSE_SECONDS) else None

            session = ScriptSession(channel.sendall, channel.shutdown_write, recv, exit_status)
            session.start(timeout)
        return session

    def _exec(self, channel, session_script):
        """Starts the session command: the preflight, then the session (through sudo with become)."""
        host = self.host
        password = _become_password if host.become else None
        channel.exec_command(commands.login(session_script, host.name, host.venv_from or host.python, host.root,
                                            host.user,
                                            become_user=host.become_user if host.become else None,
                                            become_password=password is not None))
        if password is not None:
            channel.sendall(password.encode() + b"\n")

    def close(self):
        self.client.close()
        self._release_jumps()
