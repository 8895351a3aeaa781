"""Orchestration of a command across hosts: connect, gather facts, apply, verify. The only
module that sequences remote work; what to run comes from desired/plan/commands."""

import dataclasses
import getpass
import hashlib
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fleet import commands, connection, facts, hostenv, plan, protocol, rollout, ui, verify
from fleet.protocol import Status

MAX_PARALLEL_HOSTS = 128
AGENT_SOURCE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")).read()
AGENT_VERSION = hashlib.sha256(AGENT_SOURCE.encode()).hexdigest()[:16]
AGENT_IDLE_SECONDS = 900
# Login shells started at once. Where hosts' shells serialise on a shared lock (pyenv or conda
# init over a shared home), each waiting shell polls it and steals CPU from the one holding it:
# starting a few at a time drains the queue faster than starting all. (bench/, docs/performance.md)
LOGIN_SHELLS_AT_ONCE = 8
# Seconds Envoy has to show a batch as draining after its cluster file changed (it reloads at once).
DRAIN_TIMEOUT_SECONDS = 15


@dataclass
class HostOutcome:
    host: str
    steps: dict = field(default_factory=dict)  # label -> protocol.Status
    ports: list = field(default_factory=list)  # verify.PortCheck
    logs: dict = field(default_factory=dict)  # process -> log tail
    rolled_back: list = field(default_factory=list)  # processes put back to their previous version
    error: str | None = None
    plan: object = None
    report: object = None  # the host's latest facts.Report
    shell: object = None  # its connection.ScriptSession
    timings: dict = field(default_factory=dict)  # phase -> seconds (connect, facts, apply)

    def counts(self):
        values = list(self.steps.values())
        return {str(s): values.count(s) for s in (Status.OK, Status.CHANGED, Status.FAILED)}

    @property
    def ok(self):
        return self.error is None and Status.FAILED not in self.steps.values() and all(c.ok for c in self.ports)


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
        self.locked = {}  # host name -> why: another run holds its deploy lock
        self.agents = connection.AgentCache()
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
            use_agent = host.agent and host.connection == "ssh"
            shell, via_agent = conn.start_session(script, self.agents.get(host, AGENT_VERSION) if use_agent else None,
                                                  shell_slot=self._shell_slots)
            if self.options.lock and not self.options.check:  # only runs that may change hosts
                hostenv.prepare(host, shell)  # venv: true: the services' dependencies, before the agent runs
            self._links[host.name] = _Link(conn, shell)
            if use_agent and not via_agent:
                self._start_agent(host, shell)
        except connection.ConnectFailed as e:
            if conn is not None:
                conn.close()
            self._errors[host.name] = self.mask(str(e))
            if isinstance(e, connection.Locked):
                self.locked[host.name] = self._errors[host.name]
        return self._links.get(host.name), self._errors.get(host.name)

    def lock_all(self, hosts):
        """Connects to every host and takes its deploy lock, before any host is changed, so two
        deploys never interleave across hosts. Returns {host name: holder} for the hosts another
        run holds (the caller then changes nothing); unreachable hosts are left to the deploy,
        which reports them and goes on with the others."""
        parallel(list(hosts), self.link)
        return {h.name: self.locked[h.name] for h in hosts if h.name in self.locked}

    def _start_agent(self, host, shell):
        """Starts the host's agent inside this session, so the next run needs no login shell."""
        token = secrets.token_hex(32)
        result = shell.run(commands.start_agent(host.python, AGENT_SOURCE, token, AGENT_IDLE_SECONDS))
        started = [line.split()[1] for line in result.output.splitlines() if line.startswith("@@agent ")]
        if started:
            self.agents.put(host, AGENT_VERSION, int(started[0]), token)

    def connection(self, host_name):
        link = self._links.get(host_name)
        return link.connection if link else None

    def close(self):
        for link in self._links.values():
            link.shell.close()
            link.connection.close()
        self._links.clear()
        self.agents.save()

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
    """Deploys one wave to every host in `states`; returns (outcomes, end-to-end checks).

    Every host's facts and plan first; then, in parallel, every change except restarts of
    backends that serve behind a running Envoy; then those, batch by batch, each batch drained
    from Envoy first and back in rotation before the next (fleet/rollout.py)."""
    listen = {}  # host name -> addresses its Envoys listen on
    for s in services:
        listen.setdefault(s.ingress.host, set()).add(s.ingress.listen_address)
    with ui.Progress(console, list(states)) as progress:
        outcomes = {o.host: o for o in parallel(
            list(states.values()), lambda state: _prepare_host(fleet, state, listen.get(state.host.name, ()),
                                                               progress))}
        if fleet.options.check:
            return list(outcomes.values()), []
        rolls = [(s, _rolling_hosts(s, states, outcomes)) for s in services]
        rolled = {(name, task) for s, hosts in rolls for name in hosts for task in
                  rollout.backend_tasks(states[name], s)}
        parallel([o for o in outcomes.values() if o.report is not None],
                 lambda o: _apply(fleet, o, o.plan.without({t for n, t in rolled if n == o.host}), progress))
        for service, hosts in rolls:
            if hosts:
                _roll(fleet, service, hosts, states, outcomes, inventory, progress)
        for outcome in outcomes.values():
            if outcome.report is not None:
                _verify_ports(outcome, states[outcome.host], progress)
            progress.finish(outcome.host, outcome)
    started = time.perf_counter()
    checks = [(s.name, *_check_service(fleet, inventory, s)) for s in services if s.ingress.host in states]
    fleet.timings["check through Envoy"] = fleet.timings.get("check through Envoy", 0) + time.perf_counter() - started
    return list(outcomes.values()), checks


def _prepare_host(fleet, state, listen_addresses, progress):
    """Connect, gather facts and plan; the outcome carries the plan and the facts report."""
    name = state.host.name
    outcome = HostOutcome(host=name)
    progress.step(name, "connect", Status.RUNNING)
    started = time.perf_counter()
    link, outcome.error = fleet.link(state.host)
    outcome.timings["connect"] = time.perf_counter() - started
    if link is None:
        outcome.steps["connect"] = Status.FAILED
        progress.step(name, "connect", Status.FAILED, outcome.error)
        return outcome
    outcome.shell = link.shell
    try:
        _plan_linked(fleet, link.shell, state, listen_addresses, outcome, progress)
    except connection.ConnectFailed as e:
        outcome.error = fleet.mask(str(e))
        outcome.report = None
        progress.step(name, "connection", Status.FAILED, outcome.error)
    return outcome


def _plan_linked(fleet, shell, state, listen_addresses, outcome, progress):
    name = state.host.name
    progress.step(name, "facts", Status.RUNNING)
    started = time.perf_counter()
    result = shell.run(commands.facts(state, recover=fleet.options.lock))
    outcome.timings["facts"] = time.perf_counter() - started
    if result.exit_code != 0:
        outcome.error = fleet.mask(f"gathering facts failed (exit {result.exit_code}): {_last_line(result.output)}")
        progress.step(name, "facts", Status.FAILED, outcome.error)
        return
    report = facts.parse(result.output)
    for txid, what in report.switches:
        progress.step(name, "earlier deploy", Status.OK, f"{txid} {what}")
    foreign = sorted(a for a in listen_addresses if not _is_own_address(a, report.addresses))
    if foreign:
        outcome.error = (f"listen_address {', '.join(foreign)} is not an address of this host (it has: "
                         f"{', '.join(report.addresses) or 'none reported'}); nothing was changed here")
        outcome.steps["facts"] = Status.FAILED
        progress.step(name, "facts", Status.FAILED, outcome.error)
        return
    outcome.plan = plan.plan_host(state, report, mask=fleet.mask)
    outcome.report = report
    for label, status in outcome.plan.task_status().items():
        outcome.steps[label] = status
        if status == Status.OK or fleet.options.check:
            progress.step(name, label, status if status == Status.OK else Status.WOULD_CHANGE)


def _rolling_hosts(service, states, outcomes):
    """Backends of the service that restart while serving behind its running Envoy: these roll.
    The others (nothing running yet, or no Envoy in front to drain them) change at once."""
    ingress = outcomes.get(service.ingress.host)
    if ingress is None or ingress.report is None:
        return []
    envoy = ingress.report.procs.get(f"envoy-{service.name}")
    if envoy is None or not envoy.alive:
        return []
    hosts = []
    for backend in service.backends:
        outcome = outcomes.get(backend.host)
        if outcome is None or outcome.report is None:
            continue
        found = outcome.report.procs.get(service.name)
        restarts = {p.name for p in outcome.plan.restarts}
        if service.name in restarts and found is not None and found.alive:
            hosts.append(backend.host)
    return hosts


def _apply(fleet, outcome, host_plan, progress):
    """Applies a plan (or part of one) through the host's session; records what happened."""
    if not host_plan.changed or outcome.error:
        return not outcome.error
    name = outcome.host

    def on_line(line):
        marker, _, rest = line.partition(" ")
        if marker == protocol.STEP:
            label, _, status = rest.partition(" ")
            progress.step(name, label, status)

    progress.step(name, "apply", Status.RUNNING)
    started = time.perf_counter()
    try:
        switch = commands.apply(host_plan, fleet.txid)
        result = outcome.shell.run(switch.script, payload=switch.payload, on_line=on_line, on_bytes=progress.sending(
            name, sum(host_plan.size(s) for s in host_plan.send if s.content is None)))
        outcome.shell.run(commands.forget_switch(fleet.txid))
    except connection.ConnectFailed as e:
        outcome.error = fleet.mask(str(e))
        progress.step(name, "connection", Status.FAILED, outcome.error)
        return False
    outcome.timings["apply"] = outcome.timings.get("apply", 0) + time.perf_counter() - started
    report = facts.parse(result.output)
    outcome.report = report
    done = dict(report.steps)
    changed = host_plan.task_status()
    for label, status in changed.items():
        if status == Status.CHANGED and label not in done:
            outcome.steps[label] = Status.FAILED
    outcome.logs.update({proc: fleet.mask(tail) for proc, tail in report.logs.items()})
    outcome.rolled_back += report.rolled_back
    reasons = [f"{n}: {r}" for n, r in report.failures]
    reasons += [f"{n}: previous version restored and running" for n in report.rolled_back]
    if reasons:
        outcome.error = fleet.mask("; ".join(reasons))
    elif result.exit_code != 0:
        outcome.error = fleet.mask(f"apply failed (exit {result.exit_code}): {_last_line(result.output)}")
    if outcome.error:
        progress.step(name, "apply", Status.FAILED, outcome.error)
    return outcome.error is None


def _roll(fleet, service, hosts, states, outcomes, inventory, progress):
    """Restarts the service's backends on `hosts` batch by batch behind its Envoy: drain, switch,
    back in rotation and healthy, next. A batch that fails stops the rollout there (its hosts were
    rolled back by their switch); the remaining backends keep the release they run."""
    ingress = outcomes[service.ingress.host]
    cds = next(f for f in states[service.ingress.host].files if f.path == rollout.cds_path(
        states[service.ingress.host].host.root, service.name))
    cluster = envoy_cluster(service)
    address = {b.host: f"{inventory.hosts[b.host].address}:{b.port}" for b in service.backends}
    batches = rollout.plan([b.host for b in service.backends], hosts, spec={"batch": service.rollout.batch}).batches
    for number, batch in enumerate(batches, 1):
        label = f"{service.name} rollout {number}/{len(batches)}"
        addresses = {address[h] for h in batch}
        for host in batch:
            progress.step(host, label, Status.RUNNING, "draining from Envoy")
        problem = _set_cluster(fleet, ingress, cds, rollout.drained(cds.content, addresses)) or _wait_envoy(
            fleet, service, cluster, lambda view: all("eds_status_draining" in view.get(a, "") for a in addresses),
            DRAIN_TIMEOUT_SECONDS, "drained")
        if not problem:
            results = parallel(batch, lambda h: _apply(
                fleet, outcomes[h], outcomes[h].plan.only(rollout.backend_tasks(states[h], service)), progress))
            failed = [h for h, ok in zip(batch, results) if not ok]
            # Back in rotation either way: the new version, or the previous one the switch restored.
            problem = _set_cluster(fleet, ingress, cds, cds.content) or _wait_envoy(
                fleet, service, cluster, lambda view: all(view.get(a) == "healthy" for a in addresses),
                service.rollout.healthy_timeout, "healthy")
            if failed:
                problem = f"batch {number} failed on {', '.join(failed)}"
        if problem:
            rest = [h for later in batches[number:] for h in later]
            for host in batch:
                if outcomes[host].error is None:
                    outcomes[host].error = f"rollout of {service.name} stopped: {problem}"
            for host in rest:
                for task in rollout.backend_tasks(states[host], service):
                    if outcomes[host].steps.get(task) == Status.CHANGED:
                        outcomes[host].steps[task] = Status.FAILED
                outcomes[host].error = (f"not restarted: the rollout of {service.name} stopped at batch {number} "
                                        f"({problem}); this backend keeps its running release")
            return
        for host in batch:
            progress.step(host, label, Status.OK, "back in rotation, healthy in Envoy")


def _set_cluster(fleet, ingress, cds, content):
    """Writes the service's cluster file on its ingress host; the running Envoy takes it."""
    spec = dataclasses.replace(cds, content=content, sha256=hashlib.sha256(content).hexdigest())
    step = plan.HostPlan(state=ingress.plan.state, send=[spec])
    try:
        switch = commands.apply(step, fleet.txid)
        result = ingress.shell.run(switch.script, payload=switch.payload)
        ingress.shell.run(commands.forget_switch(fleet.txid))
    except connection.ConnectFailed as e:
        return f"ingress host {ingress.host}: {e}"
    return None if result.exit_code == 0 else f"could not write the cluster file on {ingress.host}: " \
                                                f"{_last_line(result.output)}"


def _wait_envoy(fleet, service, cluster, condition, timeout, what):
    """Waits until Envoy's view of the cluster ({address: health flags}) satisfies condition."""
    conn = fleet.connection(service.ingress.host)

    def probe():
        try:
            view = {e.address: e.health_flags for e in verify.envoy_endpoints(conn, service.ingress.admin_port,
                                                                                 cluster)}
        except OSError as e:
            return False, f"Envoy admin not answering: {e}"
        return condition(view), view

    ok, detail = verify.wait_until(probe, timeout, interval=0.1)
    return None if ok else f"backends not {what} in Envoy within {timeout}s: {detail}"


def _verify_ports(outcome, state, progress):
    outcome.ports = verify.check_ports(state, outcome.report)
    bad = [c for c in outcome.ports if not c.ok]
    progress.step(outcome.host, "verify ports", Status.FAILED if bad else Status.OK,
                  "; ".join(c.detail for c in bad) or f"{len(outcome.ports)} ports listened on by their processes")


def _is_own_address(address, own):
    return address in ("0.0.0.0", "::") or address.startswith("127.") or address == "::1" or address in own


def envoy_cluster(service):
    return f"{service.name}_service"


def _check_service(fleet, inventory, service):
    conn = fleet.connection(service.ingress.host)
    if conn is None:
        return False, f"not checked: its ingress host {service.ingress.host} was not reached"
    expected = [f"{inventory.hosts[b.host].address}:{b.port}" for b in service.backends]
    return verify.check_through_envoy(conn, service, inventory.ingress_address(service), envoy_cluster(service),
                                      expected)


def _last_line(output):
    lines = [l for l in output.splitlines() if l.strip() and not protocol.is_report(l)]
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
        report = facts.parse(shell.run(commands.facts(state, recover=False)).output)
        result.procs = {p.name: report.procs.get(p.name) for p in state.processes}
        result.ports = verify.check_ports(state, report)

    statuses = _on_each_host(fleet, states, HostStatus, host_status)
    views = {}
    for service in services:
        conn = fleet.connection(service.ingress.host)
        try:
            views[service.name] = verify.envoy_endpoints(conn, service.ingress.admin_port, envoy_cluster(service)) \
                if conn else f"ingress host {service.ingress.host} not reached"
        except OSError as e:
            views[service.name] = f"Envoy admin not answering: {e}"
    return statuses, views


def stop(fleet, states):
    """Stops every process fleet started for these states, Envoy before the backends it fronts."""
    def stop_host(shell, state, outcome):
        names = [p.name for p in reversed(state.processes)]
        # Envoys first (they front the backends), then everything else, each group at once.
        envoys = [n for n in names if n.startswith("envoy-")]
        result = shell.run(commands.stop([envoys, [n for n in names if n not in envoys]]))
        report = facts.parse(result.output)
        for name in names:
            outcome.steps[f"stop {name}"] = Status.CHANGED if name in report.stopped else \
                Status.OK if name in report.not_running else Status.FAILED
        if result.exit_code != 0:
            outcome.error = f"stop failed (exit {result.exit_code}): {_last_line(result.output)}"

    return _on_each_host(fleet, states, HostOutcome, stop_host)
