"""Proof that a deploy holds: ports listened on by the right processes, Envoy's view of its
backends, and a real grpc.health.v1 call through the Envoy listener."""

import importlib
import posixpath
import threading
import time
from dataclasses import dataclass

from fleet import commands
from fleet.connection import ConnectFailed

# grpc and the generated health stubs cost ~50 ms to import; only the end of a deploy needs them.
_GRPC_MODULES = ("grpc", "grpc_health.v1.health_pb2", "grpc_health.v1.health_pb2_grpc")

ADMIN_SECONDS = 5.0  # one request to Envoy's admin, connect to last byte
ADMIN_STEP_SLACK_SECONDS = 10.0  # the host's Python starting, the session's round trip


@dataclass(frozen=True)
class PortCheck:
    process: str
    port: int
    ok: bool
    detail: str


def check_ports(state, report):
    """Every port of every process must be listened on by that process's recorded pid."""
    checks = []
    for proc in state.processes:
        found = report.procs.get(proc.name)
        pid = found.pid if found and found.alive else None
        for port in proc.ports:
            owners = [l for l in report.listeners if l.port == port]
            if pid is None:
                checks.append(PortCheck(proc.name, port, False, f"{proc.name} is not running"))
            elif any(l.pid == pid for l in owners):
                program = next(l.program for l in owners if l.pid == pid)
                checks.append(PortCheck(proc.name, port, True, f"{program} pid {pid}"))
            elif owners:
                other = owners[0]
                checks.append(PortCheck(proc.name, port, False,
                                        f"port {port} is held by {other.program or '?'} pid {other.pid}, "
                                        f"not {proc.name} pid {pid}"))
            else:
                checks.append(PortCheck(proc.name, port, False, f"nothing listens on port {port}"))
    return checks


@dataclass(frozen=True)
class Endpoint:
    address: str  # host:port
    healthy: bool
    health_flags: str
    rq_total: int


def parse_clusters(text, cluster):
    """Endpoints of one cluster from Envoy's /clusters text output."""
    fields = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster:
            fields.setdefault(parts[1], {})[parts[2]] = parts[3]
    # Only hosts carry health_flags; other rows (e.g. circuit breaker priorities) do not.
    return [Endpoint(address=addr, healthy=f["health_flags"] == "healthy", health_flags=f["health_flags"],
                     rq_total=int(f.get("rq_total", 0)))
            for addr, f in sorted(fields.items()) if "health_flags" in f]


def admin_socket(host, service):
    """Envoy's admin interface: a Unix socket of mode 0600 (templates/envoy/bootstrap.yaml.j2),
    so no other user of the host can reach it, unlike a TCP port on 127.0.0.1."""
    return posixpath.join(host.root, "envoy", service.name, "admin.sock")


def admin_get(shell, host, service, path):
    """GET `path` from the service's Envoy admin, through the host's session; the body."""
    result = shell.run(commands.envoy_admin_get(host.python, admin_socket(host, service), path, ADMIN_SECONDS),
                       ADMIN_SECONDS + ADMIN_STEP_SLACK_SECONDS, "Envoy admin")
    if result.exit_code != 0:
        lines = [l for l in result.output.splitlines() if l.strip()]
        raise OSError(lines[-1] if lines else f"exit code {result.exit_code}")
    return result.output


def envoy_endpoints(shell, host, service, cluster):
    return parse_clusters(admin_get(shell, host, service, "/clusters"), cluster)


def preload_grpc():
    """Imports grpc in the background while the deploy waits on its hosts."""
    threading.Thread(target=lambda: [importlib.import_module(m) for m in _GRPC_MODULES], daemon=True).start()


def grpc_health(address, port, service="", timeout=3.0):
    """Status name of a grpc.health.v1 Check against address:port."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{address}:{port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_until(probe, timeout, interval=0.25):
    """Calls probe() until it returns (True, detail) or timeout seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = probe()
        if ok or time.monotonic() >= deadline:
            return ok, detail
        time.sleep(interval)


def check_through_envoy(shell, host, service, address, cluster, expected_backends, timeout=20.0):
    """Waits until Envoy sees every backend healthy, then asks grpc.health.v1 through the listener."""

    def endpoints_healthy():
        try:
            endpoints = envoy_endpoints(shell, host, service, cluster)
        except (OSError, ConnectFailed) as e:  # admin not up yet, or the host stopped answering
            return False, f"Envoy admin on {host.name} not answering: {e}"
        healthy = [e.address for e in endpoints if e.healthy]
        missing = sorted(set(expected_backends) - set(healthy))
        if missing:
            flags = {e.address: e.health_flags for e in endpoints}
            return False, "unhealthy in Envoy: " + ", ".join(f"{m} ({flags.get(m, 'absent')})" for m in missing)
        return True, f"{len(healthy)}/{len(expected_backends)} backends healthy in Envoy"

    ok, detail = wait_until(endpoints_healthy, timeout)
    if not ok:
        return False, detail

    def health():
        import grpc

        try:
            status = grpc_health(address, service.ingress.port)
        except grpc.RpcError as e:
            return False, f"grpc.health.v1 Check through Envoy failed: {e.code().name} {e.details()}"
        return status == "SERVING", f"grpc.health.v1 through {address}:{service.ingress.port}: {status}"

    ok, health_detail = wait_until(health, 5.0)
    return ok, f"{detail}; {health_detail}"
