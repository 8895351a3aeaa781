"""Orchestration of a command across hosts: connect, gather facts, apply, verify. The only
module that sequences remote work; what to run comes from desired/plan/commands."""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fleet import commands, connection, facts, plan, ui, verify

MAX_PARALLEL_HOSTS = 128


@dataclass
class HostOutcome:
    host: str
    steps: dict = field(default_factory=dict)  # label -> ok / changed / failed
    ports: list = field(default_factory=list)  # verify.PortCheck
    logs: dict = field(default_factory=dict)  # process -> log tail
    error: str | None = None
    plan: object = None

    def counts(self):
        values = list(self.steps.values())
        return {s: values.count(s) for s in ("ok", "changed", "failed")}

    @property
    def ok(self):
        return self.error is None and "failed" not in self.steps.values() and all(c.ok for c in self.ports)


@dataclass(frozen=True)
class Options:
    check: bool = False
    accept_new_host_keys: bool = False


class Session:
    """One connection per host for the whole command, opened in parallel and closed at the end."""

    def __init__(self, options):
        self.options = options
        self.connections = {}

    def try_connect(self, host):
        """(connection, None), or (None, the one-line reason the host could not be reached)."""
        try:
            conn = connection.connect(host, accept_new_host_keys=self.options.accept_new_host_keys)
        except connection.ConnectFailed as e:
            return None, str(e)
        self.connections[host.name] = conn
        return conn, None

    def close(self):
        for conn in self.connections.values():
            conn.close()


def parallel(items, fn):
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_HOSTS, len(items))) as pool:
        return list(pool.map(fn, items))


def deploy(states, services, inventory, options, console):
    """Deploys to every host in `states`; returns (outcomes, end-to-end checks)."""
    session = Session(options)
    txid = f"{int(time.time())}-{os.getpid()}"
    try:
        with ui.Progress(console, list(states)) as progress:
            outcomes = parallel(list(states.values()),
                                lambda state: _deploy_host(session, state, txid, options, progress))
        if options.check:
            return outcomes, []
        checks = [(s.name, *_check_service(session, inventory, s)) for s in services if s.ingress.host in states]
        return outcomes, checks
    finally:
        session.close()


def _deploy_host(session, state, txid, options, progress):
    name = state.host.name
    outcome = HostOutcome(host=name)
    progress.step(name, "connect", "running")
    conn, outcome.error = session.try_connect(state.host)
    if conn is None:
        progress.step(name, "connect", "failed", outcome.error)
        return outcome
    progress.step(name, "facts", "running")
    result = conn.run(commands.facts(state))
    if result.exit_code != 0:
        outcome.error = f"gathering facts failed (exit {result.exit_code}): {_last_line(result.output)}"
        progress.step(name, "facts", "failed", outcome.error)
        return outcome
    report = facts.parse(result.output)
    host_plan = plan.plan_host(state, report)
    outcome.plan = host_plan
    for label, status in host_plan.task_status().items():
        outcome.steps[label] = status
        if status == "ok" or options.check:
            progress.step(name, label, "ok" if status == "ok" else "would change")
    if options.check:
        return outcome
    if host_plan.changed:
        def on_line(line):
            if line.startswith("@@step "):
                label, _, status = line[7:].partition(" ")
                progress.step(name, label, status)

        progress.step(name, "apply", "running")
        result = conn.run(commands.apply(host_plan, txid), payload=host_plan.payload, on_line=on_line)
        report = facts.parse(result.output)
        done = dict(report.steps)
        for label, status in outcome.steps.items():
            if status == "changed" and label not in done:
                outcome.steps[label] = "failed"
        outcome.logs = report.logs
        if report.failures:
            outcome.error = "; ".join(f"{n}: {r}" for n, r in report.failures)
        elif result.exit_code != 0:
            outcome.error = f"apply failed (exit {result.exit_code}): {_last_line(result.output)}"
        if outcome.error:
            progress.step(name, "apply", "failed", outcome.error)
    outcome.ports = verify.check_ports(state, report)
    bad = [c for c in outcome.ports if not c.ok]
    progress.step(name, "verify ports", "failed" if bad else "ok",
                  "; ".join(c.detail for c in bad) or f"{len(outcome.ports)} ports listened on by their processes")
    return outcome


def envoy_cluster(service):
    return f"{service.name}_service"


def _check_service(session, inventory, service):
    conn = session.connections.get(service.ingress.host)
    if conn is None:
        return False, f"not checked: its ingress host {service.ingress.host} was not reached"
    expected = [f"{inventory.hosts[b.host].address}:{b.port}" for b in service.backends]
    return verify.check_through_envoy(conn, service, inventory.ingress_address(service), envoy_cluster(service),
                                      expected)


def _last_line(output):
    lines = [l for l in output.splitlines() if l.strip() and not l.startswith("@@")]
    return lines[-1] if lines else "no output"


@dataclass
class HostStatus:
    host: str
    procs: dict = field(default_factory=dict)  # name -> facts.ProcState
    ports: list = field(default_factory=list)  # verify.PortCheck
    error: str | None = None


def _on_each_host(session, states, result_type, work):
    """Connects to every host in parallel and calls work(conn, state, result) where that worked."""
    def one(state):
        result = result_type(host=state.host.name)
        conn, result.error = session.try_connect(state.host)
        if conn is not None:
            work(conn, state, result)
        return result

    return parallel(list(states.values()), one)


def status(states, services, inventory, options):
    """Process state and listeners per host, and Envoy's view of each service's endpoints."""
    session = Session(options)
    try:
        def host_status(conn, state, result):
            report = facts.parse(conn.run(commands.facts(state)).output)
            result.procs = {p.name: report.procs.get(p.name) for p in state.processes}
            result.ports = verify.check_ports(state, report)

        statuses = _on_each_host(session, states, HostStatus, host_status)
        views = {}
        for service in services:
            conn = session.connections.get(service.ingress.host)
            try:
                views[service.name] = verify.envoy_endpoints(conn, service.ingress.admin_port, envoy_cluster(service)) \
                    if conn else f"ingress host {service.ingress.host} not reached"
            except OSError as e:
                views[service.name] = f"Envoy admin not answering: {e}"
        return statuses, views
    finally:
        session.close()


def stop(states, options):
    """Stops every process fleet started for these states, Envoy before the backends it fronts."""
    session = Session(options)
    try:
        def stop_host(conn, state, outcome):
            names = [p.name for p in reversed(state.processes)]
            result = conn.run(commands.stop(state.host.root, names))
            report = facts.parse(result.output)
            for name in names:
                outcome.steps[f"stop {name}"] = "changed" if name in report.stopped else \
                    "ok" if name in report.not_running else "failed"
            if result.exit_code != 0:
                outcome.error = f"stop failed (exit {result.exit_code}): {_last_line(result.output)}"

        return _on_each_host(session, states, HostOutcome, stop_host)
    finally:
        session.close()
