"""fleet's host agent: lets later runs skip the login shell that every SSH command costs.

Started on a host by a run's first SSH session (see commands.start_agent), it listens on
127.0.0.1 only. A client (fleet, through an SSH direct-tcpip channel) sends one header line,
`fleet-agent-1 TOKEN LENGTH`, then LENGTH bytes of a session script; the agent runs that script
with /bin/sh in a session of its own, wired to the connection, and forgets it. Without the
right 256-bit token (known only to the controller that started the agent) nothing runs. The
agent exits after IDLE seconds without a connection.

Standard library only: it runs with the host's Python, where fleet is not installed.
Usage: python3 agent.py ROOT IDLE_SECONDS   (the token comes on stdin)
"""

import hmac
import os
import signal
import socket
import subprocess
import sys

PROTOCOL = b"fleet-agent-1"
MAX_SCRIPT = 1 << 20


def serve(root, idle, token):
    state = os.path.join(root, ".agent")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    _write(os.path.join(state, "port"), str(server.getsockname()[1]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    server.settimeout(idle)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                return
            with conn:
                _handle(conn, token)
    finally:
        try:
            with open(os.path.join(state, "port")) as f:
                mine = f.read() == str(server.getsockname()[1])
            if mine:
                os.unlink(os.path.join(state, "port"))
        except OSError:
            pass


def _handle(conn, token):
    conn.settimeout(5)
    try:
        header = _read_line(conn)
        name, given, length = header.split(b" ")
        length = int(length)
        if name != PROTOCOL or not hmac.compare_digest(given, token) or not 0 < length <= MAX_SCRIPT:
            return
        script = _read_exactly(conn, length)
    except (OSError, ValueError):
        return
    conn.settimeout(None)
    subprocess.Popen(["/bin/sh", "-c", script.decode()], stdin=conn, stdout=conn, stderr=subprocess.STDOUT,
                     start_new_session=True)


def _read_line(conn):
    data = b""
    while not data.endswith(b"\n"):
        byte = conn.recv(1)  # byte by byte: what follows the header belongs to the script
        if not byte or len(data) > 200:
            raise ValueError("bad header")
        data += byte
    return data[:-1]


def _read_exactly(conn, length):
    chunks, remaining = [], length
    while remaining:
        chunk = conn.recv(min(remaining, 65536))
        if not chunk:
            raise ValueError("short script")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _write(path, text):
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    secret = sys.stdin.readline().strip().encode()
    sys.stdin.close()
    serve(sys.argv[1], float(sys.argv[2]), secret)
