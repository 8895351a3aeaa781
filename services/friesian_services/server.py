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
    """grpc.health.v1 (the standard servicer): SERVING for "" and the service's own full names."""
    servicer = health.HealthServicer()
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def serve(config, register, service_names):
    """Binds servicePort, serves until SIGTERM/SIGINT, then drains for up to 5 s."""
    port = int(config["servicePort"])
    address = f"{config.get('bindAddress', '0.0.0.0')}:{port}"
    workers = int(config.get("modelParallelism", 4)) * 2
    # so_reuseport off: a second instance on a taken port must fail, not silently share it.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)])
    register(server)
    health_pb2_grpc.add_HealthServicer_to_server(_health(service_names), server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise SystemExit(f"cannot listen on {address}: {e}")
    server.start()
    print(f"serving {', '.join(service_names)} on {address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    print("stopped", flush=True)
