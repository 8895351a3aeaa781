"""Feature rows by key: an embedded in-memory store, or Redis (redis-py)."""

import json
from urllib.parse import urlparse

import redis

# What a store raises when Redis cannot answer (connection refused, auth, timeout).
RedisError = redis.RedisError


class EmbeddedStore:
    def __init__(self):
        self._rows = {}

    def is_empty(self, probe_key):
        return probe_key not in self._rows

    def put_many(self, rows):
        self._rows.update(rows)

    def get_many(self, keys):
        return [self._rows.get(k) for k in keys]


class RedisStore:
    """Rows are stored as JSON lists under their keys. The URL may carry a password
    (redis://:PASSWORD@host:port); redis-py's pool keeps a connection per concurrent caller."""

    def __init__(self, url):
        self._client = redis.Redis.from_url(url if "://" in url else f"redis://{url}",
                                            socket_connect_timeout=5, socket_timeout=5, decode_responses=True)

    def is_empty(self, probe_key):
        return self._client.exists(probe_key) == 0

    def put_many(self, rows):
        if rows:
            self._client.mset({key: json.dumps(row) for key, row in rows.items()})

    def get_many(self, keys):
        if not keys:
            return []
        return [json.loads(v) if v is not None else None for v in self._client.mget(keys)]


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
