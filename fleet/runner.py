"""Orchestration of a command across hosts: connect, gather facts, apply, verify. The only
module that sequences remote work; what to run comes from desired/plan/commands."""

import getpass
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fleet import commands, connection, facts, plan, ui, verify

MAX_PARALLEL_HOSTS = 128
# Login shells started at once. Where hosts' shells serialise on a shared lock (pyenv or conda
# init over a shared home), each waiting shell polls it and steals CPU from the one holding it:
# starting a few at a time drains the queue faster than starting all. (bench/, docs/performance.md)
LOGIN_SHELLS_AT_ONCE = 8
# Deadlines, so that a host that stops answering (a stopped sshd, session or machine) fails alone,
# in bounded time, naming itself. Each is generous for a working host.
SESSION_START_SECONDS = 30  # SSH session, login shell and the lock (plus --wait-lock)
BREAK_LOCK_SECONDS = 10  # commands.session() waits this long for a broken lock's holder to go
STEP_SECONDS = 30  # facts, status: files, processes, listeners
PROCESS_STOP_SECONDS = 10  # commands.stop_proc: TERM, then KILL after 10 s
MIN_TRANSFER_BYTES_PER_SECOND = 1 << 20  # apply: files are sent at least this fast, or it fails


@dataclass
class HostOutcome:
    host: str
    steps: dict = field(default_factory=dict)  # label -> ok / changed / failed
    ports: list = field(default_factory=list)  # verify.PortCheck
    logs: dict = field(default_factory=dict)  # process -> log tail
    rolled_back: list = field(default_factory=list)  # processes put back to their previous version
    error: str | None = None
    plan: object = None
    timings: dict = field(default_factory=dict)  # phase -> seconds (connect, facts, apply)

    def counts(self):
        values = list(self.steps.values())
        return {s: values.count(s) for s in ("ok", "changed", "failed")}

    @property
    def ok(self):
        return self.error is None and "failed" not in self.steps.values() and all(c.ok for c in self.ports)


@dataclass
class HostStatus:
    host: str
    procs: dict = field(default_factory=dict)  # name -> facts.ProcState
    ports: list = field(default_factory=list)  # verify.PortCheck
    error: str | None = None


@dataclass(frozen=True)
class Options:
    check: bool = False
    accept_new_host_keys: bool = False
    lock: bool = True  # read-only commands (status) do not take the deploy lock
    wait_lock: int = 0
    break_lock: bool = False


@dataclass
class _Link:
    connection: object
    shell: object  # connection.ScriptSession


class Fleet:
    """The hosts of one command: one connection and one locked shell session per host, opened on
    first use, reused by every wave and step, closed (releasing the locks) at the end."""

    def __init__(self, options, mask=str):
        self.options = options
        self.mask = mask  # hides secret values in anything shown to the operator
        self.txid = f"{int(time.time())}-{os.getpid()}"
        self.holder = f"{getpass.getuser()}@{socket.gethostname()} txid={self.txid}"
        self._links, self._errors = {}, {}
        self._shell_slots = threading.BoundedSemaphore(LOGIN_SHELLS_AT_ONCE)
        self.timings = {}  # run-wide phases -> seconds

    def link(self, host):
        """(_Link, None), or (None, the one-line reason the host cannot be used)."""
        if host.name in self._links or host.name in self._errors:
            return self._links.get(host.name), self._errors.get(host.name)
        conn = None
        try:
            conn = connection.connect(host, accept_new_host_keys=self.options.accept_new_host_keys)
            script = commands.session(host.root, self.holder, lock=self.options.lock, wait=self.options.wait_lock,
                                      break_lock=self.options.break_lock)
            start = SESSION_START_SECONDS + self.options.wait_lock + BREAK_LOCK_SECONDS * self.options.break_lock
            shell = conn.start_session(script, start, shell_slot=self._shell_slots)
            self._links[host.name] = _Link(conn, shell)
        except connection.ConnectFailed as e:
            if conn is not None:
                conn.close()
            self._errors[host.name] = self.mask(str(e))
        return self._links.get(host.name), self._errors.get(host.name)

    def shell(self, host_name):
        """The host's open session, or None if it was not reached."""
        link = self._links.get(host_name)
        return link.shell if link else None

    def close(self):
        def close_link(link):  # in parallel: a host that stopped answering costs its bound once
            link.shell.close()
            link.connection.close()

        parallel(list(self._links.values()), close_link)
        self._links.clear()

    def abort(self):
        """Ctrl-C: drop every connection at once; hosts clean up their staging on their own."""
        for link in self._links.values():
            link.connection.close()
        self._links.clear()


def parallel(items, fn):
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_HOSTS, len(items)))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def deploy(fleet, states, services, inventory, console):
    """Deploys one wave to every host in `states`; returns (outcomes, end-to-end checks)."""
    with ui.Progress(console, list(states)) as progress:
        outcomes = parallel(list(states.values()), lambda state: _deploy_host(fleet, state, progress))
    if fleet.options.check:
        return outcomes, []
    started = time.perf_counter()
    checks = [(s.name, *_check_service(fleet, inventory, s)) for s in services if s.ingress.host in states]
    fleet.timings["check through Envoy"] = fleet.timings.get("check through Envoy", 0) + time.perf_counter() - started
    return outcomes, checks


def _deploy_host(fleet, state, progress):
    name = state.host.name
    outcome = HostOutcome(host=name)
    progress.step(name, "connect", "running")
    started = time.perf_counter()
    link, outcome.error = fleet.link(state.host)
    outcome.timings["connect"] = time.perf_counter() - started
    if link is None:
        outcome.steps["connect"] = "failed"
        progress.step(name, "connect", "failed", outcome.error)
        return outcome
    try:
        _deploy_linked(fleet, link.shell, state, outcome, progress)
    except connection.ConnectFailed as e:
        outcome.error = fleet.mask(str(e))
        progress.step(name, "connection", "failed", outcome.error)
    return outcome


def _deploy_linked(fleet, shell, state, outcome, progress):
    name = state.host.name
    progress.step(name, "facts", "running")
    started = time.perf_counter()
    result = shell.run(commands.facts(state), STEP_SECONDS, "facts")
    outcome.timings["facts"] = time.perf_counter() - started
    if result.exit_code != 0:
        outcome.error = fleet.mask(f"gathering facts failed (exit {result.exit_code}): {_last_line(result.output)}")
        progress.step(name, "facts", "failed", outcome.error)
        return
    report = facts.parse(result.output)
    host_plan = plan.plan_host(state, report, mask=fleet.mask)
    outcome.plan = host_plan
    for label, status in host_plan.task_status().items():
        outcome.steps[label] = status
        if status == "ok" or fleet.options.check:
            progress.step(name, label, "ok" if status == "ok" else "would change")
    if fleet.options.check:
        return
    if host_plan.changed:
        def on_line(line):
            if line.startswith("@@step "):
                label, _, status = line[7:].partition(" ")
                progress.step(name, label, status)

        progress.step(name, "apply", "running")
        started = time.perf_counter()
        result = shell.run(commands.apply(host_plan, fleet.txid), apply_seconds(host_plan), "apply",
                           payload=host_plan.payload, on_line=on_line)
        outcome.timings["apply"] = time.perf_counter() - started
        report = facts.parse(result.output)
        done = dict(report.steps)
        for label, status in outcome.steps.items():
            if status == "changed" and label not in done:
                outcome.steps[label] = "failed"
        outcome.logs = {proc: fleet.mask(tail) for proc, tail in report.logs.items()}
        outcome.rolled_back = report.rolled_back
        reasons = [f"{n}: {r}" for n, r in report.failures]
        reasons += [f"{n}: previous version restored and running" for n in report.rolled_back]
        if reasons:
            outcome.error = fleet.mask("; ".join(reasons))
        elif result.exit_code != 0:
            outcome.error = fleet.mask(f"apply failed (exit {result.exit_code}): {_last_line(result.output)}")
        if outcome.error:
            progress.step(name, "apply", "failed", outcome.error)
    outcome.ports = verify.check_ports(state, report)
    bad = [c for c in outcome.ports if not c.ok]
    progress.step(name, "verify ports", "failed" if bad else "ok",
                  "; ".join(c.detail for c in bad) or f"{len(outcome.ports)} ports listened on by their processes")


def apply_seconds(host_plan):
    """The apply step's deadline: sending its files at the slowest acceptable rate, then for each
    restarted process a stop, its start timeout, and the same again should it be rolled back."""
    transfer = sum(host_plan.size(spec) for _, spec in host_plan.payload) / MIN_TRANSFER_BYTES_PER_SECOND
    restarts = sum(2 * (PROCESS_STOP_SECONDS + p.start_timeout) for p in host_plan.restarts)
    return STEP_SECONDS + transfer + restarts


def envoy_cluster(service):
    return f"{service.name}_service"


def _check_service(fleet, inventory, service):
    shell = fleet.shell(service.ingress.host)
    if shell is None:
        return False, f"not checked: its ingress host {service.ingress.host} was not reached"
    expected = [f"{inventory.hosts[b.host].address}:{b.port}" for b in service.backends]
    return verify.check_through_envoy(shell, inventory.hosts[service.ingress.host], service,
                                      inventory.ingress_address(service), envoy_cluster(service), expected)


def _last_line(output):
    lines = [l for l in output.splitlines() if l.strip() and not l.startswith("@@")]
    return lines[-1] if lines else "no output"


def _on_each_host(fleet, states, result_type, work):
    """Opens every host in parallel and calls work(shell, state, result) where that worked."""
    def one(state):
        result = result_type(host=state.host.name)
        link, result.error = fleet.link(state.host)
        if link is not None:
            try:
                work(link.shell, state, result)
            except connection.ConnectFailed as e:
                result.error = fleet.mask(str(e))
        return result

    return parallel(list(states.values()), one)


def status(fleet, states, services):
    """Process state and listeners per host, and Envoy's view of each service's endpoints."""
    def host_status(shell, state, result):
        report = facts.parse(shell.run(commands.facts(state), STEP_SECONDS, "status").output)
        result.procs = {p.name: report.procs.get(p.name) for p in state.processes}
        result.ports = verify.check_ports(state, report)

    statuses = _on_each_host(fleet, states, HostStatus, host_status)
    views = {}
    for service in services:
        ingress = service.ingress.host
        if ingress not in states:
            continue  # --limit left its Envoy out
        shell = fleet.shell(ingress)
        try:
            views[service.name] = verify.envoy_endpoints(shell, states[ingress].host, service, envoy_cluster(service)) \
                if shell else f"ingress host {ingress} not reached"
        except (OSError, connection.ConnectFailed) as e:
            views[service.name] = fleet.mask(f"Envoy admin on {ingress} not answering: {e}")
    return statuses, views


def stop(fleet, states):
    """Stops every process fleet started for these states, Envoy before the backends it fronts."""
    def stop_host(shell, state, outcome):
        names = [p.name for p in reversed(state.processes)]
        result = shell.run(commands.stop(names), STEP_SECONDS + PROCESS_STOP_SECONDS * len(names), "stop")
        report = facts.parse(result.output)
        for name in names:
            outcome.steps[f"stop {name}"] = "changed" if name in report.stopped else \
                "ok" if name in report.not_running else "failed"
        if result.exit_code != 0:
            outcome.error = f"stop failed (exit {result.exit_code}): {_last_line(result.output)}"

    return _on_each_host(fleet, states, HostOutcome, stop_host)
