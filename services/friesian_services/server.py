"""What every service shares: config loading, per-rpc timers, health, and the serve loop."""

import json
import signal
import threading
import time
from concurrent import futures

import grpc
import yaml
from google.protobuf import empty_pb2

from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def load_config(path):
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a mapping of config keys")
    return config


class Timers:
    """Per-rpc call statistics in the shape getMetrics returns: a JSON list, one entry a timer."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stats = {}

    def time(self, name):
        return _Timing(self, name)

    def record(self, name, seconds):
        with self._lock:
            s = self._stats.setdefault(name, {"name": name, "count": 0, "totalMs": 0.0, "maxMs": 0.0})
            ms = seconds * 1000.0
            s["count"] += 1
            s["totalMs"] += ms
            s["maxMs"] = max(s["maxMs"], ms)

    def to_json(self):
        with self._lock:
            rows = [dict(s, meanMs=s["totalMs"] / s["count"]) for s in self._stats.values()]
        return json.dumps(sorted(rows, key=lambda r: r["name"]))

    def reset(self):
        with self._lock:
            self._stats.clear()


class Metered:
    """getMetrics / resetMetrics, shared by every service; `message` is the package's ServerMessage."""

    def __init__(self, message):
        self.timers = Timers()
        self._message = message

    def getMetrics(self, request, context):
        return self._message(str=self.timers.to_json())

    def resetMetrics(self, request, context):
        self.timers.reset()
        return empty_pb2.Empty()


class _Timing:
    def __init__(self, timers, name):
        self.timers, self.name = timers, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timers.record(self.name, time.perf_counter() - self.start)


def _health(service_names):
    """grpc.health.v1 (the standard servicer): SERVING for "" and the service's own full names,
    NOT_SERVING for all of them once it drains (enter_graceful_shutdown)."""
    servicer = health.HealthServicer()
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


# Envoy takes a backend out of rotation after unhealthy_threshold failed checks, health_check_interval
# apart (roles/envoy/defaults.yaml: 2 × 2 s), plus up to a check timeout (1 s) for the last answer:
# a draining service keeps serving new calls that long, so none reaches it after it stops accepting.
DEFAULT_DRAIN_SECONDS = 5.0
DEFAULT_GRACE_SECONDS = 5.0


def _config_seconds(config, key, default):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise SystemExit(f"config key {key}: expected seconds between 0 and 3600, got {value!r}")
    return float(value)


def serve(config, register, service_names):
    """Binds servicePort and serves until SIGTERM/SIGINT, then stops gracefully:
    1. grpc.health.v1 answers NOT_SERVING for every service at once (Envoy's health checks take
       the backend out of rotation), while new and in-flight calls are still served for
       drainSeconds (a second signal cuts this short);
    2. the server stops accepting calls and gives those in flight graceSeconds to finish.
    reusePort: true lets a second instance bind the same port (both must set it) so that a single
    backend can be replaced without a moment in which nothing listens."""
    port = int(config["servicePort"])
    address = f"{config.get('bindAddress', '0.0.0.0')}:{port}"
    workers = int(config.get("modelParallelism", 4)) * 2
    drain = _config_seconds(config, "drainSeconds", DEFAULT_DRAIN_SECONDS)
    grace = _config_seconds(config, "graceSeconds", DEFAULT_GRACE_SECONDS)
    reuse_port = config.get("reusePort", False)
    if not isinstance(reuse_port, bool):
        raise SystemExit(f"config key reusePort: expected true or false, got {reuse_port!r}")
    # so_reuseport off by default: a second instance on a taken port must fail, not silently share it.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", int(reuse_port))])
    register(server)
    health = _health(service_names)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise SystemExit(f"cannot listen on {address}: {e}")
    server.start()
    print(f"serving {', '.join(service_names)} on {address}", flush=True)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_):
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    stop.wait()
    health.enter_graceful_shutdown()
    print(f"draining: health NOT_SERVING, still serving for {drain:g}s", flush=True)
    hurry.wait(drain)
    print(f"stopping: finishing calls in flight for up to {grace:g}s", flush=True)
    server.stop(grace=grace).wait()
    print("stopped", flush=True)
