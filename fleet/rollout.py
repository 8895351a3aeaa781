"""Rolling-deploy decisions, as pure functions: which backends restart together, whether the
next batch may go, and what to do when a batch does not come up. No I/O.

A batch is drained by rewriting the service's cluster file (CDS) with its endpoints marked
`health_status: DRAINING`: the running Envoy takes the file without a restart, sends no new call
to them (its admin shows `/eds_status_draining`) and lets the calls in flight finish; then they
restart, and the normal cluster file brings them back once Envoy's own grpc.health.v1 checks
pass. runner.py sequences the remote work.

A service's `rollout: {batch: B}` in the inventory: B is a number of backends (>= 1) or a
percentage of them ("25%", rounded down). Default: 25% - one backend at a time up to 7 backends,
a quarter of the capacity at most beyond - a batch is at least 1 and, with two or more backends,
at most all but one: a rolling deploy never takes a whole service out. A service with a single
backend cannot roll: it surges (a new instance up beside the old one, then the switch).

The invariant: while a batch restarts, at least N - B backends are healthy, N the service's
backends. Backends that are already unhealthy restart first, all in one batch: they serve
nothing, so restarting them costs no capacity.
"""

import copy
import posixpath
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import yaml

from fleet import render

DEFAULT_BATCH = "25%"
ROLLING, SURGE = "rolling", "surge"
DRAINING = "DRAINING"
GO, STOP, ROLLBACK = "go", "stop", "rollback"
PERCENT = re.compile(r"^([0-9]{1,3})%$")


class RolloutError(ValueError):
    """A bad `rollout` spec; the message starts with the key (the caller adds file:line)."""


@dataclass(frozen=True)
class Plan:
    mode: str  # ROLLING or SURGE
    size: int  # B: the most backends out at once
    batches: Tuple[Tuple[str, ...], ...]


@dataclass(frozen=True)
class Decision:
    action: str  # GO, STOP or ROLLBACK
    reason: str = ""
    hosts: Tuple[str, ...] = ()  # the backends the action is about (the batch to roll back)


def parse_spec(spec):
    """The validated batch setting of a `rollout` mapping (None: the default)."""
    if spec is None:
        return DEFAULT_BATCH
    if not isinstance(spec, dict):
        raise RolloutError(f"rollout: expected a mapping like {{batch: 1}}, got {spec!r}")
    unknown = sorted(set(spec) - {"batch"})
    if unknown:
        raise RolloutError(f"rollout.{unknown[0]}: unknown key (known: batch)")
    batch = spec.get("batch", DEFAULT_BATCH)
    if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
        return batch
    match = PERCENT.match(batch) if isinstance(batch, str) else None
    if match and 1 <= int(match.group(1)) <= 100:
        return batch
    raise RolloutError(f'rollout.batch: expected a whole number >= 1 or a percentage like "25%", got {batch!r}')


def batch_size(spec, backend_count):
    """B for a service of `backend_count` backends: at least 1, at most all but one."""
    batch = parse_spec(spec)
    if isinstance(batch, str):
        size = backend_count * int(PERCENT.match(batch).group(1)) // 100
    else:
        size = batch
    return max(1, min(size, backend_count - 1))


def plan(backends: Sequence[str], changed: Sequence[str], unhealthy: Sequence[str] = (), spec=None) -> Plan:
    """The batches that restart `changed` (a subset of `backends`), in the inventory's order:
    the unhealthy ones first, together, then the healthy ones B at a time."""
    if len(set(backends)) != len(backends):
        raise ValueError(f"backends listed twice: {list(backends)}")
    unknown = [b for b in list(changed) + list(unhealthy) if b not in backends]
    if unknown:
        raise ValueError(f"not backends of the service: {unknown}")
    size = batch_size(spec, len(backends))
    restart = [b for b in backends if b in set(changed)]
    if len(backends) == 1:
        return Plan(SURGE, 1, (tuple(restart),) if restart else ())
    down = tuple(b for b in restart if b in set(unhealthy))
    up = [b for b in restart if b not in set(unhealthy)]
    batches = [down] if down else []
    batches += [tuple(up[i:i + size]) for i in range(0, len(up), size)]
    return Plan(ROLLING, size, tuple(batches))


def before_batch(plan: Plan, batch: Sequence[str], backends: Sequence[str], healthy: Sequence[str]) -> Decision:
    """May `batch` restart now, given which backends are healthy (as Envoy reports them)?
    STOP when it would take healthy backends out and leave fewer than N - B healthy: some other
    backend is down meanwhile. A batch of backends that are all down already may always go."""
    if plan.mode == SURGE:
        return Decision(GO)  # the old instance serves until the new one is up
    left = [b for b in backends if b in set(healthy) and b not in set(batch)]
    takes_out = [b for b in batch if b in set(healthy)]
    floor = len(backends) - plan.size
    if takes_out and len(left) < floor:
        down = [b for b in backends if b not in set(healthy) and b not in set(batch)]
        return Decision(STOP, f"restarting {', '.join(batch)} would leave {len(left)} of {len(backends)} backends "
                              f"healthy, fewer than {floor}; not healthy: {', '.join(down) or 'none'}", tuple(batch))
    return Decision(GO)


def after_batch(batch: Sequence[str], results: Dict[str, Optional[str]]) -> Decision:
    """`results`: per backend of the batch, None when it came up (listens, answers
    grpc.health.v1, Envoy reports it healthy), else why not. One failure rolls the whole batch
    back to the previous release, and the rollout stops there."""
    missing = [b for b in batch if b not in results]
    if missing:
        raise ValueError(f"no result for {missing}")
    failed = [(b, results[b]) for b in batch if results[b] is not None]
    if failed:
        host, reason = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return Decision(ROLLBACK, f"{host}: {reason}{more}", tuple(batch))
    return Decision(GO)


def cds_path(root, service):
    """Where the envoy role puts a service's cluster file on its ingress host."""
    return posixpath.join(root, "envoy", service, "cds.yaml")


def _lb_endpoints(data):
    for cluster in data["resources"]:
        for group in cluster.get("load_assignment", {}).get("endpoints", []):
            for endpoint in group.get("lb_endpoints", []):
                socket = endpoint["endpoint"]["address"]["socket_address"]
                yield f"{socket['address']}:{socket['port_value']}", endpoint


def endpoints(cds):
    """The "host:port" of every endpoint in the cluster file `cds` (bytes)."""
    return [address for address, _ in _lb_endpoints(yaml.safe_load(cds))]


def drained(cds, addresses):
    """The cluster file `cds` (bytes) with the endpoints at `addresses` ("host:port") draining."""
    data = yaml.safe_load(cds)
    for address, endpoint in _lb_endpoints(data):
        if address in addresses:
            endpoint["health_status"] = DRAINING
    return render.dump_yaml(data)


def surged(cds, backend, surge):
    """The cluster file with a second endpoint `surge` ("host:port") beside `backend`: a surge
    instance that takes the backend's calls while it restarts (drain one or the other)."""
    data = yaml.safe_load(cds)
    for address, endpoint in list(_lb_endpoints(data)):
        if address == backend:
            twin = copy.deepcopy(endpoint)
            twin["endpoint"]["address"]["socket_address"]["port_value"] = int(surge.rsplit(":", 1)[1])
            group = next(g for c in data["resources"] for g in c["load_assignment"]["endpoints"]
                         if endpoint in g["lb_endpoints"])
            group["lb_endpoints"].append(twin)
    return render.dump_yaml(data)


def surge_port(port):
    """Where a single backend's surge instance listens unless the inventory says (rollout.surge_port)."""
    return port + 10000 if port + 10000 <= 65535 else port - 10000


def backend_tasks(state, service):
    """Task labels of the service's backend role on this host (not its Envoy)."""
    return {t for t in state.tasks if t.startswith(f"{service.name}.{service.role}.")}
