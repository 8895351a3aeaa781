"""Feature rows by key: an embedded in-memory store, or Redis.

The Redis client speaks just the RESP commands the feature service needs (MGET, MSET, EXISTS,
PING) over one socket per thread: a few dozen lines instead of a vendored client library."""

import json
import socket
import threading
from urllib.parse import urlparse


class EmbeddedStore:
    def __init__(self):
        self._rows = {}

    def is_empty(self, probe_key):
        return probe_key not in self._rows

    def put_many(self, rows):
        self._rows.update(rows)

    def get_many(self, keys):
        return [self._rows.get(k) for k in keys]


class RedisError(Exception):
    pass


class RedisStore:
    """Rows are stored as JSON lists under their keys. A password in the URL
    (redis://:PASSWORD@host:port) is sent with AUTH on connect."""

    def __init__(self, url):
        parsed = urlparse(url if "://" in url else f"redis://{url}")
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.password = parsed.password
        self._local = threading.local()

    def is_empty(self, probe_key):
        return self._call("EXISTS", probe_key) == 0

    def put_many(self, rows):
        args = []
        for key, row in rows.items():
            args += [key, json.dumps(row)]
        if args:
            self._call("MSET", *args)

    def get_many(self, keys):
        if not keys:
            return []
        return [json.loads(v) if v is not None else None for v in self._call("MGET", *keys)]

    def _call(self, *args):
        try:
            return self._exchange(args)
        except OSError:
            self._local.conn = None  # a dropped connection: reconnect once
            return self._exchange(args)

    def _exchange(self, args):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            sock = socket.create_connection(self.address, timeout=5)
            conn = self._local.conn = (sock, sock.makefile("rb"))
            if self.password:
                _send(conn, ("AUTH", self.password))
        return _send(conn, args)


def _send(conn, args):
    sock, reader = conn
    payload = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        payload += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
    sock.sendall(b"".join(payload))
    return _read_reply(reader)


def _read_reply(reader):
    line = reader.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data.decode()
    if kind == b"*":
        return [_read_reply(reader) for _ in range(int(rest))]
    raise RedisError(f"unexpected reply {line!r}")


def redacted(url):
    """url with any password replaced by ***, for logs and errors."""
    parsed = urlparse(url if "://" in url else f"redis://{url}")
    if parsed.password is None:
        return url
    userinfo, _, host = parsed.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parsed._replace(netloc=f"{user}:***@{host}").geturl()


def open_store(config):
    url = config.get("redisUrl")
    return RedisStore(url) if url else EmbeddedStore()
