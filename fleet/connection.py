"""Connectors: how fleet reaches a host. The only module that talks to hosts.

ssh: one paramiko connection per host, reused for every command and tunnel of a run.
local: this machine, through /bin/sh, for the embedded default inventory.
"""

import io
import os
import socket
import subprocess
import tarfile
import threading
from dataclasses import dataclass

import paramiko


class ConnectFailed(Exception):
    """The host could not be reached or authenticated; the message says why, in one line."""


@dataclass(frozen=True)
class Result:
    exit_code: int
    output: str  # stdout and stderr, interleaved as produced


def connect(host, accept_new_host_keys=False, timeout=10.0):
    if host.connection == "local":
        return LocalConnection()
    return SSHConnection(host, accept_new_host_keys, timeout)


def write_tar(stream, payload):
    """Streams (member name, FileSpec) pairs as an uncompressed tar: no temp file, no full copy in memory."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for member, spec in payload:
            info = tarfile.TarInfo(member)
            info.mode = spec.mode
            if spec.content is not None:
                info.size = len(spec.content)
                tar.addfile(info, io.BytesIO(spec.content))
            else:
                info.size = os.path.getsize(spec.source)
                with open(spec.source, "rb") as f:
                    tar.addfile(info, f)


class LocalConnection:
    def run(self, script, payload=(), on_line=None):
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        feeder = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
        feeder.start()
        output = _collect((line.decode(errors="replace") for line in proc.stdout), on_line)
        feeder.join()
        return Result(exit_code=proc.wait(), output=output)

    def open_tcp(self, port):
        return socket.create_connection(("127.0.0.1", port), timeout=5)

    def close(self):
        pass


def _feed(stdin, payload):
    try:
        if payload:
            write_tar(stdin, payload)
        stdin.close()
    except BrokenPipeError:
        pass  # the script ended early; its output says why


class _ChannelWriter:
    def __init__(self, channel):
        self.channel = channel

    def write(self, data):
        self.channel.sendall(data)
        return len(data)


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
        except (OSError, EOFError) as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise ConnectFailed(f"unreachable: {host.address}:{host.port}: {reason}") from None

    def run(self, script, payload=(), on_line=None):
        channel = self.client.get_transport().open_session()
        channel.set_combine_stderr(True)
        channel.exec_command(script)
        feeder = threading.Thread(target=self._feed, args=(channel, payload), daemon=True)
        feeder.start()
        output = _collect(_channel_lines(channel), on_line)
        feeder.join()
        return Result(exit_code=channel.recv_exit_status(), output=output)

    @staticmethod
    def _feed(channel, payload):
        try:
            if payload:
                write_tar(_ChannelWriter(channel), payload)
            channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the script ended early; its output says why

    def open_tcp(self, port):
        """A channel to 127.0.0.1:port as seen from the host (its admin interfaces bind there)."""
        try:
            return self.client.get_transport().open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0),
                                                             timeout=5)
        except paramiko.SSHException as e:
            raise OSError(f"tunnel to 127.0.0.1:{port} on {self.host.name} refused: {e}") from None

    def close(self):
        self.client.close()


def _channel_lines(channel):
    pending = b""
    while True:
        data = channel.recv(65536)
        if not data:
            break
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace") + "\n"
    if pending:
        yield pending.decode(errors="replace")


def _collect(lines, on_line):
    collected = []
    for line in lines:
        collected.append(line)
        if on_line:
            on_line(line.rstrip("\n"))
    return "".join(collected)
