"""Rolling restarts behind Envoy, the pure part: which backends roll, in which batches, and the
Envoy cluster file that drains a batch. runner.py sequences the remote work.

A batch is drained by rewriting the service's cluster file (CDS) with its endpoints marked
`health_status: DRAINING`: the running Envoy takes the file without a restart, sends no new call
to them (its admin shows `/eds_status_draining`) and lets the calls in flight finish; then they
restart, and the normal cluster file brings them back once Envoy's own grpc.health.v1 checks
pass. So a service always keeps N minus the batch backends in rotation."""

import posixpath

import yaml

from fleet import desired

DRAINING = "DRAINING"


def batches(hosts, rollout):
    """The hosts in batches of rollout.batch_size, in inventory order."""
    size = rollout.batch_size(len(hosts))
    return [hosts[i:i + size] for i in range(0, len(hosts), size)]


def cds_path(root, service):
    """Where the envoy role puts a service's cluster file on its ingress host."""
    return posixpath.join(root, "envoy", service, "cds.yaml")


def drained(cds, addresses):
    """The cluster file `cds` (bytes) with the endpoints at `addresses` ("host:port") draining."""
    data = yaml.safe_load(cds)
    for cluster in data["resources"]:
        for group in cluster.get("load_assignment", {}).get("endpoints", []):
            for endpoint in group.get("lb_endpoints", []):
                socket = endpoint["endpoint"]["address"]["socket_address"]
                if f"{socket['address']}:{socket['port_value']}" in addresses:
                    endpoint["health_status"] = DRAINING
    return desired.dump_yaml(data)


def backend_tasks(state, service):
    """Task labels of the service's backend role on this host (not its Envoy)."""
    return {t for t in state.tasks if t.startswith(f"{service.name}.{service.role}.")}
