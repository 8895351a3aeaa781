"""Orchestration of a command across hosts: connect, gather facts, apply, verify. The only
module that sequences remote work; what to run comes from desired/plan/commands."""

import dataclasses
import getpass
import hashlib
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from fleet import artifacts, commands, connection, desired, facts, hostenv, plan, protocol, releases, rollout, ui, verify
from fleet.protocol import Status

MAX_PARALLEL_HOSTS = 128
# Login shells started at once. Where hosts' shells serialise on a shared lock (pyenv or conda
# init over a shared home), each waiting shell polls it and steals CPU from the one holding it:
# starting a few at a time drains the queue faster than starting all. (bench/, docs/performance.md)
LOGIN_SHELLS_AT_ONCE = 8
# Seconds Envoy has to show a batch as draining after its cluster file changed (it reloads at once).
DRAIN_TIMEOUT_SECONDS = 15
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
    steps: dict = field(default_factory=dict)  # label -> protocol.Status
    ports: list = field(default_factory=list)  # verify.PortCheck
    logs: dict = field(default_factory=dict)  # process -> log tail
    rolled_back: list = field(default_factory=list)  # processes put back to their previous version
    error: str | None = None
    plan: object = None
    state: object = None  # the desired.HostState planned, built for the host's machine
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
    releases: dict = field(default_factory=dict)  # process name -> the release it runs (None: none recorded)
    drift: dict = field(default_factory=dict)  # process name -> how it differs from the inventory
    not_compared: dict = field(default_factory=dict)  # process name -> why its drift is not known
    systemd: bool = False  # the host runs systemd as PID 1


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
    host: object  # inventory.Host


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
            if self.options.lock and not self.options.check:  # only runs that may change hosts
                hostenv.prepare(host, shell)  # venv: true: the services' dependencies
            self._links[host.name] = _Link(conn, shell, host)
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

    def shell(self, host_name):
        """The host's open session, or None if it was not reached."""
        link = self._links.get(host_name)
        return link.shell if link else None

    def host(self, host_name):
        link = self._links.get(host_name)
        return link.host if link else None

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


class _HostThreads:
    """The process's threads for per-host work, kept for every later phase, and started before
    a phase hands them work: a thread started while the others hold the GIL (handshakes, parsing
    output) took 3-5 ms to come up, so each phase reached its last host tens of milliseconds
    after its first. Threads still busy with an earlier phase's item (one that raised left the
    others running) do not count as free. Daemon threads: one left on a stuck host never holds
    up the exit."""

    def __init__(self):
        self.work = queue.SimpleQueue()
        self.count = 0
        self.idle = 0
        self.lock = threading.Lock()

    def submit_all(self, fn, items):
        with self.lock:
            # Up to MAX_PARALLEL_HOSTS threads in all: beyond that, items wait for a free one.
            for _ in range(min(len(items) - self.idle, MAX_PARALLEL_HOSTS - self.count)):
                threading.Thread(target=self._serve, name=f"fleet-host-{self.count}", daemon=True).start()
                self.count += 1
                self.idle += 1
        futures = [Future() for _ in items]
        for future, item in zip(futures, items):
            self.work.put((future, fn, item))
        return futures

    def _serve(self):
        while True:
            future, fn, item = self.work.get()
            with self.lock:
                self.idle -= 1
            result = error = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(item)
                except BaseException as e:  # as concurrent.futures does: the caller's result() raises it
                    error = e
            # Free again before the result is out: the caller's next phase counts this thread.
            with self.lock:
                self.idle += 1
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


_host_threads = _HostThreads()


def parallel(items, fn):
    """fn(item) for every item at once (up to MAX_PARALLEL_HOSTS at a time); the results in order.
    fn must not call parallel() itself: it would wait for threads its caller holds."""
    futures = _host_threads.submit_all(fn, list(items))
    try:
        return [future.result() for future in futures]
    finally:
        for future in futures:
            future.cancel()


def deploy(fleet, states, services, inventory, console, surge_state=None, restate=None):
    """Deploys one wave to every host in `states`; returns (outcomes, end-to-end checks).

    Every host's facts and plan first; then, in parallel, every change except restarts of
    backends that serve behind a running Envoy; then those, batch by batch, each batch drained
    from Envoy first and back in rotation before the next (fleet/rollout.py). A service with a
    single backend surges instead: surge_state(service, port) is its twin's desired state.
    restate(state, machine): the state compiled again for a host's machine (for_machine)."""
    listen = {}  # host name -> addresses its Envoys listen on
    for s in services:
        listen.setdefault(s.ingress.host, set()).add(s.ingress.listen_address)
    with ui.Progress(console, list(states)) as progress:
        outcomes = {o.host: o for o in parallel(
            list(states.values()), lambda state: _prepare_host(fleet, state, listen.get(state.host.name, ()),
                                                               progress, restate))}
        states = dict(states, **{o.host: o.state for o in outcomes.values() if o.state is not None})
        if fleet.options.check:
            return list(outcomes.values()), []
        removed = [(s, _removed_backends(s, states, outcomes, inventory)) for s in services]
        rolls = [(s, _rolling_hosts(s, states, outcomes)) for s in services]
        rolled = {(name, task) for s, hosts in rolls for name in hosts for task in
                  rollout.backend_tasks(states[name], s)}
        recorder = Releases(fleet, states, services, outcomes, inventory, progress)
        # A host with no part in a roll or a scale-in is done when its apply is: its ports are
        # checked and its release recorded while the others still work. (The ingress host of a
        # rolled service gets its cluster file rewritten during the roll, and back as it was.)
        later = {name for _, hosts in rolls for name in hosts} if not any(gone for _, gone in removed) else set(states)
        unsettled = set()

        def apply(outcome):
            _apply(fleet, outcome, outcome.plan.without({t for n, t in rolled if n == outcome.host}), progress)
            if outcome.host in later:
                return
            try:
                _finish_host(outcome, states, progress)
            except Exception:  # checked again after the rolls, where an error ends the run as it did before
                unsettled.add(outcome.host)
                return
            recorder.record_if_settled(outcome)

        parallel([o for o in outcomes.values() if o.report is not None], apply)
        for service, gone in removed:
            if gone:
                _scale_in(fleet, service, gone, outcomes, inventory)
        for service, hosts in rolls:
            if hosts and len(service.backends) == 1 and surge_state is not None:
                _surge(fleet, service, hosts[0], states, outcomes, inventory, surge_state, progress)
            elif hosts:
                _roll(fleet, service, hosts, states, outcomes, inventory, progress)
        for outcome in outcomes.values():
            if outcome.host in later or outcome.host in unsettled or outcome.report is None:
                _finish_host(outcome, states, progress)
        recorder.record_rest()
    started = time.perf_counter()
    checks = [(s.name, *_check_service(fleet, inventory, s)) for s in services if s.ingress.host in states]
    fleet.timings["check through Envoy"] = fleet.timings.get("check through Envoy", 0) + time.perf_counter() - started
    return list(outcomes.values()), checks


def for_machine(state, shell, restate):
    """The host's state with its machine-specific artifacts (the Envoy binary) for the machine its
    session reported: compiled again by restate(state, machine) if they were resolved for another
    one (the controller's, before any host was reached). Raises artifacts.Unavailable."""
    if restate is None or state.machine is None or shell.machine is None or shell.machine == state.machine:
        return state
    return restate(state, shell.machine)


def machine_states(fleet, states, restate):
    """Every reached host's state for its machine, before any host is changed: ({host name:
    state}, {host name: one line why it has no artifact for its machine})."""
    def one(state):
        shell = fleet.shell(state.host.name)
        try:
            return (for_machine(state, shell, restate) if shell else state), None
        except artifacts.Unavailable as e:
            return state, fleet.mask(str(e))

    found = parallel(list(states.values()), one)
    return {s.host.name: s for s, _ in found}, {s.host.name: why for s, why in found if why}


def _prepare_host(fleet, state, listen_addresses, progress, restate=None):
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
        outcome.state = state = for_machine(state, link.shell, restate)
    except artifacts.Unavailable as e:
        outcome.error = fleet.mask(f"{e}; nothing was changed here")
        outcome.steps["artifacts"] = Status.FAILED
        progress.step(name, "artifacts", Status.FAILED, outcome.error)
        return outcome
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
    result = shell.run(commands.facts(state, recover=fleet.options.lock), STEP_SECONDS, "facts")
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
        tasks = rollout.backend_tasks(states[backend.host], service)
        restarting = [p for p in outcome.plan.restarts if p.task in tasks]
        running = [p for p in restarting if p.name in outcome.report.procs and outcome.report.procs[p.name].alive]
        if restarting and running == restarting:
            hosts.append(backend.host)
    return hosts


def _removed_backends(service, states, outcomes, inventory):
    """Backends the service's running Envoy still has that the inventory no longer lists:
    (address, inventory host name or None), read from the cluster file now on the ingress host."""
    ingress = outcomes.get(service.ingress.host)
    if ingress is None or ingress.report is None:
        return []
    current = ingress.report.contents.get(rollout.cds_path(states[service.ingress.host].host.root, service.name))
    if current is None:
        return []
    wanted = {f"{inventory.hosts[b.host].address}:{b.port}" for b in service.backends}
    by_address = {h.address: name for name, h in inventory.hosts.items()}
    return [(a, by_address.get(a.rsplit(":", 1)[0])) for a in rollout.endpoints(current) if a not in wanted]


def _scale_in(fleet, service, gone, outcomes, inventory):
    """Backends removed from the service: out of Envoy first (the new cluster file, applied with
    the other changes, no longer lists them), then their processes stop gracefully."""
    cluster = envoy_cluster(service)
    problem = _wait_envoy(fleet, service, cluster, lambda view: not any(a in view for a, _ in gone),
                          DRAIN_TIMEOUT_SECONDS, "out of rotation")
    for address, name in gone:
        label = f"stop {service.name} (removed from the service)"
        outcome = outcomes.setdefault(name or address, HostOutcome(host=name or address))
        if name is None:
            outcome.error = f"{address} left {service.name}'s Envoy, but no inventory host has that address: " \
                            f"stop {service.name} there yourself"
            continue
        if problem:
            outcome.steps[label] = Status.FAILED
            outcome.error = f"{service.name} left running: {problem}"
            continue
        link, error = fleet.link(inventory.hosts[name])
        if link is None:
            outcome.steps[label], outcome.error = Status.FAILED, error
            continue
        try:
            report = facts.parse(link.shell.run(commands.stop([[service.name]]), STEP_SECONDS + PROCESS_STOP_SECONDS,
                                                "stop").output)
        except connection.ConnectFailed as e:
            outcome.steps[label], outcome.error = Status.FAILED, fleet.mask(str(e))
            continue
        outcome.steps[label] = Status.CHANGED if service.name in report.stopped else Status.OK


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
        result = outcome.shell.run(switch.script, apply_seconds(host_plan), "apply", payload=switch.payload,
                                   on_line=on_line, on_bytes=progress.sending(
                                       name, sum(host_plan.size(s) for s in host_plan.send if s.content is None)))
        outcome.shell.run(commands.forget_switch(fleet.txid), STEP_SECONDS, "forget the switch")
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
    cds = _cluster_file(states, service)
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


def _surge(fleet, service, host, states, outcomes, inventory, surge_state, progress):
    """A single backend restarts behind a twin: SERVICE-surge, the new release on the surge port,
    takes the calls while the backend drains and restarts; then the twin drains and stops."""
    ingress, outcome, cds = outcomes[service.ingress.host], outcomes[host], _cluster_file(states, service)
    cluster, backend = envoy_cluster(service), service.backends[0]
    port = service.rollout.surge_port or rollout.surge_port(backend.port)
    address, twin_address = (f"{inventory.hosts[host].address}:{p}" for p in (backend.port, port))
    twin = surge_state(service, port)
    twin_name = twin.processes[0].name
    label = f"{service.name} surge"
    progress.step(host, label, Status.RUNNING, f"starting {twin_name} on port {port}")
    twin_outcome = HostOutcome(host=host, shell=outcome.shell)
    try:
        twin_report = facts.parse(outcome.shell.run(commands.facts(twin), STEP_SECONDS, "facts").output)
    except connection.ConnectFailed as e:
        outcome.error = fleet.mask(str(e))
        return
    if not _apply(fleet, twin_outcome, plan.plan_host(twin, twin_report, mask=fleet.mask), progress):
        outcome.logs.update(twin_outcome.logs)
        outcome.error = f"not restarted: its surge instance {twin_name} did not come up: {twin_outcome.error}"
        for task in rollout.backend_tasks(states[host], service):
            if outcome.steps.get(task) == Status.CHANGED:
                outcome.steps[task] = Status.FAILED
        return
    with_twin = rollout.surged(cds.content, address, twin_address)
    problem = _set_cluster(fleet, ingress, cds, rollout.drained(with_twin, {address})) or _wait_envoy(
        fleet, service, cluster, lambda v: v.get(twin_address) == "healthy" and "eds_status_draining" in
        v.get(address, ""), service.rollout.healthy_timeout, "switched to the surge instance")
    if not problem:
        _apply(fleet, outcome, outcome.plan.only(rollout.backend_tasks(states[host], service)), progress)
    # Back to the backend: its new release, or the previous one its switch restored.
    problem = _set_cluster(fleet, ingress, cds, rollout.drained(with_twin, {twin_address})) or _wait_envoy(
        fleet, service, cluster, lambda v: v.get(address) == "healthy", service.rollout.healthy_timeout,
        "back on the backend") or problem
    try:
        outcome.shell.run(commands.stop([[twin_name]]), STEP_SECONDS + PROCESS_STOP_SECONDS, "stop")
    except connection.ConnectFailed as e:
        problem = problem or fleet.mask(str(e))
    problem = _set_cluster(fleet, ingress, cds, cds.content) or problem
    if problem and outcome.error is None:
        outcome.error = f"surge of {service.name}: {problem}"
    progress.step(host, label, Status.FAILED if problem else Status.OK, problem or f"{twin_name} stopped")


def _cluster_file(states, service):
    """The desired cluster file (FileSpec) of the service's Envoy."""
    ingress = states[service.ingress.host]
    return next(f for f in ingress.files if f.path == rollout.cds_path(ingress.host.root, service.name))


def _set_cluster(fleet, ingress, cds, content):
    """Writes the service's cluster file on its ingress host; the running Envoy takes it."""
    spec = dataclasses.replace(cds, content=content, sha256=hashlib.sha256(content).hexdigest())
    step = plan.HostPlan(state=ingress.plan.state, send=[spec])
    try:
        switch = commands.apply(step, fleet.txid)
        result = ingress.shell.run(switch.script, apply_seconds(step), "cluster file", payload=switch.payload)
        ingress.shell.run(commands.forget_switch(fleet.txid), STEP_SECONDS, "forget the switch")
    except connection.ConnectFailed as e:
        return f"ingress host {ingress.host}: {e}"
    return None if result.exit_code == 0 else f"could not write the cluster file on {ingress.host}: " \
                                                f"{_last_line(result.output)}"


def _wait_envoy(fleet, service, cluster, condition, timeout, what):
    """Waits until Envoy's view of the cluster ({address: health flags}) satisfies condition."""
    shell = fleet.shell(service.ingress.host)
    host = fleet.host(service.ingress.host)

    def probe():
        try:
            view = {e.address: e.health_flags for e in verify.envoy_endpoints(shell, host, service, cluster)}
        except (OSError, connection.ConnectFailed) as e:
            return False, f"Envoy admin not answering: {e}"
        return condition(view), view

    ok, detail = verify.wait_until(probe, timeout, interval=0.1)
    return None if ok else f"backends not {what} in Envoy within {timeout}s: {detail}"


def _finish_host(outcome, states, progress):
    if outcome.report is not None:  # a backend removed by a scale-in has neither report nor state
        _verify_ports(outcome, states[outcome.host], progress)
    progress.finish(outcome.host, outcome)


def _verify_ports(outcome, state, progress):
    outcome.ports = verify.check_ports(state, outcome.report)
    bad = [c for c in outcome.ports if not c.ok]
    progress.step(outcome.host, "verify ports", Status.FAILED if bad else Status.OK,
                  "; ".join(c.detail for c in bad) or f"{len(outcome.ports)} ports listened on by their processes")


def _is_own_address(address, own):
    return address in ("0.0.0.0", "::") or address.startswith("127.") or address == "::1" or address in own


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
            except (connection.ConnectFailed, artifacts.Unavailable) as e:
                result.error = fleet.mask(str(e))
        return result

    return parallel(list(states.values()), one)


def status(fleet, states, services, restate=None):
    """Process state and listeners per host, the release each process runs and how it drifts from
    the inventory, and Envoy's view of each service's endpoints."""
    names = [s.name for s in services]
    def host_status(shell, state, result):
        try:
            state = for_machine(state, shell, restate)
        except artifacts.NotFetched as e:  # the rest of the host is compared against the controller's build
            result.not_compared = {p.name: str(e) for p in state.processes if set(p.files) & set(state.machine_files)}
        report = facts.parse(shell.run(commands.facts(state, recover=False), STEP_SECONDS, "status").output)
        result.procs = {p.name: report.procs.get(p.name) for p in state.processes}
        result.ports = verify.check_ports(state, report)
        result.drift = {name: why for name, why in releases.drift(plan.plan_host(state, report)).items()
                        if name not in result.not_compared}
        current = releases.parse_listing(shell.run(commands.list_releases(manifests=False), STEP_SECONDS, "releases").output).current
        result.releases = {p.name: current.get(releases.service_of(p.task, names)) for p in state.processes}
        result.systemd = report.systemd

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
        # Envoys first (they front the backends), then everything else, each group at once.
        envoys = [n for n in names if n.startswith("envoy-")]
        supervisor = (state.host.python, state.supervisor) if state.supervisor else None
        result = shell.run(commands.stop([envoys, [n for n in names if n not in envoys]], supervisor),
                           STEP_SECONDS + 2 * PROCESS_STOP_SECONDS, "stop")
        report = facts.parse(result.output)
        for name in names:
            outcome.steps[f"stop {name}"] = Status.CHANGED if name in report.stopped else \
                Status.OK if name in report.not_running else Status.FAILED
        if result.exit_code != 0:
            outcome.error = f"stop failed (exit {result.exit_code}): {_last_line(result.output)}"

    return _on_each_host(fleet, states, HostOutcome, stop_host)


# -- releases, rollback, logs (fleet/releases.py, docs/operations.md) ---------------------------

# Seconds between two reads of the logs `fleet logs -f` follows, and after which a host that has
# not answered a read is named (and still waited for: it may come back).
LOG_POLL_SECONDS = 0.5
LOG_STALL_SECONDS = 10


@dataclass
class HostReleases:
    host: str
    listing: object = None  # releases.Listing
    state: object = None  # desired.HostState of a rollback
    error: str | None = None


@dataclass
class HostLogs:
    host: str
    streams: dict = field(default_factory=dict)  # process -> facts.LogStream
    lines: list = field(default_factory=list)  # (process, line)
    error: str | None = None


class Releases:
    """Records, on every host whose part succeeded, a release of each service that changed anywhere
    (so a release id is on every host of the service), or, where a service has no release yet,
    of that one; then prunes (releases.prune_selection). A host that itself changed every service
    it runs is recorded as soon as its part is over (record_if_settled): nothing another host does
    can change what is recorded there. The rest once every host is done (record_rest)."""

    def __init__(self, fleet, states, services, outcomes, inventory, progress):
        self.fleet, self.states, self.services, self.outcomes = fleet, states, services, outcomes
        self.inventory, self.progress = inventory, progress
        self.names = list(inventory.services)
        self.when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # one time for the deploy, as its applies begin
        self.who = f"{getpass.getuser()}@{socket.gethostname()}"
        self.recorded = set()  # host names

    def _here(self, outcome):
        return [s for s in self.services if outcome.host in s.hosts()]

    def _changed(self, outcomes):
        return {s.name for s in self.services if any(
            status == Status.CHANGED and releases.service_of(label, self.names) == s.name
            for o in outcomes for label, status in o.steps.items())}

    def record_if_settled(self, outcome):
        here = self._here(outcome)
        names = {s.name for s in here}
        if names and names <= self._changed([outcome]):
            try:
                self._record(outcome, here, names)
            except Exception:  # record_rest tries again once the rolls are done; an error there ends the run
                self.recorded.discard(outcome.host)

    def record_rest(self):
        changed = self._changed(self.outcomes.values())
        parallel([o for o in self.outcomes.values() if o.host in self.states and o.host not in self.recorded],
                 lambda o: self._record(o, self._here(o), changed))

    def _record(self, outcome, here, changed):
        self.recorded.add(outcome.host)
        state, progress = self.states[outcome.host], self.progress
        if not here or not outcome.ok:
            return
        if all(s.name not in changed and s.name in outcome.report.releases for s in here):
            progress.step(outcome.host, "release", Status.OK, "unchanged")  # nothing to record or prune
            return
        steps = []
        for service in here:
            doc, copies = releases.manifest(state, service.name, self.names, self.fleet.txid, self.when, self.who,
                                            self.inventory.path)
            steps.append(commands.record_release(service.name, self.fleet.txid, releases.encode(doc), copies,
                                                 only_if_none=service.name not in changed))
        try:
            listing, problem = _record_and_prune(outcome.shell, "".join(steps), here, state)
        except connection.ConnectFailed as e:
            listing, problem = None, str(e)
        if problem:
            outcome.error = self.fleet.mask(f"release not recorded: {problem}")
            outcome.steps["release"] = Status.FAILED
            progress.step(outcome.host, "release", Status.FAILED, outcome.error)
            return
        detail = ", ".join(f"{s} {i}" for s, i in listing.recorded) or "unchanged"
        if listing.pruned:
            detail += f"; pruned {len(listing.pruned)}: {', '.join(listing.pruned)}"
        # Bookkeeping, not a change to what runs: never counted as a changed step.
        progress.step(outcome.host, "release", Status.OK, detail)


def _record_and_prune(shell, record_script, services, state):
    """(releases.Listing with what was recorded and pruned, None), or (None, why not)."""
    result = shell.run(record_script + commands.list_releases(artifacts=True), STEP_SECONDS, "record the release")
    if result.exit_code != 0:
        failures = facts.parse(result.output).failures
        return None, "; ".join(f"{name} {reason}" for name, reason in failures) or _last_line(result.output)
    listing = releases.parse_listing(result.output)
    gone, unused = releases.prune_selection(listing, {s.name: s.keep_releases for s in services}, state.host.root,
                                            [f.path for f in state.files])
    if gone or unused:
        listing.pruned = releases.parse_listing(shell.run(commands.prune(gone, unused), STEP_SECONDS, "prune").output).pruned
    return listing, None


def _bare(hosts):
    """Host states that only name their host (commands that read what is on it)."""
    return {h.name: desired.HostState(host=h) for h in hosts}


def list_releases(fleet, hosts, service):
    """Per host: releases.Listing of the service, or the error that kept it from being read."""
    def read(shell, state, result):
        result.listing = releases.parse_listing(shell.run(commands.list_releases(service), STEP_SECONDS, "releases").output)

    return _on_each_host(fleet, _bare(hosts), HostReleases, read)


def rollback_states(fleet, hosts, service, to=None):
    """({host name: desired.HostState} returning every host to release `to`, or to the one before
    its current release; {host name: that release id}; []), or (None, None, [one line per host that
    cannot: unreachable, no such release, a stored copy changed, an artifact gone]). Reads only:
    nothing is changed on any host."""
    listed = list_releases(fleet, hosts, service)
    problems, targets = [], {}
    for found in listed:
        if found.error:
            problems.append(f"{found.host}: {found.error}")
            continue
        target = to or releases.previous(found.listing, service)
        release = found.listing.find(service, target) if target else None
        ids = ", ".join(found.listing.ids(service)) or "none"
        if target is None:
            problems.append(f"{found.host}: no release of {service} before its current one "
                            f"({found.listing.current.get(service, 'none')}; releases: {ids})")
        elif release is None:
            problems.append(f"{found.host}: no release {target} of {service} (releases there: {ids})")
        elif release.manifest is None:
            problems.append(f"{found.host}: release {target} of {service}: {release.error}")
        else:
            targets[found.host] = release.manifest
    if problems:
        return None, None, problems

    def read(shell, state, result):
        doc = targets[state.host.name]
        report = facts.parse(shell.run(commands.read_release(service, doc["id"], [f["copy"] for f in doc["files"]],
                                                             [a["path"] for a in doc["artifacts"]]),
                                       STEP_SECONDS, "read the release").output)
        gone = [a["path"] for a in doc["artifacts"] if not report.present.get(a["path"])]
        if gone:
            result.error = f"release {doc['id']} of {service} needs {', '.join(gone)}, which is no longer on the host"
            return
        try:
            result.state = releases.host_state(state.host, doc, report.contents)
        except releases.ReleaseError as e:
            result.error = str(e)

    read_back = _on_each_host(fleet, _bare(hosts), HostReleases, read)
    problems = [f"{r.host}: {r.error}" for r in read_back if r.error]
    if problems:
        return None, None, problems
    return {r.host: r.state for r in read_back}, {h: doc["id"] for h, doc in targets.items()}, []


def log_tails(fleet, targets, count):
    """targets: {Host: [process names]}. Per host name: ({process: facts.LogStream}, [(process,
    line)] of the last `count` lines of each log) or the error; the streams go on from there."""
    def read(shell, state, result):
        names = targets[state.host]
        streams = {name: facts.LogStream() for name in names}
        for chunk in facts.parse_log_chunks(shell.run(commands.log_tail(names, count), STEP_SECONDS, "logs").output):
            result.lines += [(chunk.name, line) for line in streams[chunk.name].take(chunk)]
        result.streams = streams

    return _on_each_host(fleet, _bare(targets), HostLogs, read)


def follow_logs(fleet, targets, tails, emit):
    """Reads what every log of `tails` (log_tails) gains, every LOG_POLL_SECONDS, through each host's
    session (targets as for log_tails), and calls
    emit(host, process, line) in this thread, until interrupted (Ctrl-C). A host whose read has
    not answered for LOG_STALL_SECONDS is named once (emit(host, None, why)); one whose
    connection failed is named and dropped."""
    found = queue.Queue()
    busy = {}  # host -> when its outstanding read started
    hosts = {h.name: h for h in targets}
    links = {t.host: fleet.link(hosts[t.host])[0] for t in tails if t.error is None}

    def poll(tail):
        shell = links[tail.host].shell
        try:
            while True:
                positions = [(name, s.inode, s.offset) for name, s in tail.streams.items()]
                busy[tail.host] = time.monotonic()
                output = shell.run(commands.log_follow(positions), STEP_SECONDS, "follow logs").output
                busy.pop(tail.host, None)
                for chunk in facts.parse_log_chunks(output):
                    for line in tail.streams[chunk.name].take(chunk):
                        found.put((tail.host, chunk.name, line))
                time.sleep(LOG_POLL_SECONDS)
        # The connection is gone (lost, or dropped by Ctrl-C): writes to it fail in these ways.
        except (connection.ConnectFailed, OSError, EOFError, ValueError) as e:
            found.put((tail.host, None, f"stopped following: {fleet.mask(str(e) or type(e).__name__)}"))
        finally:
            busy.pop(tail.host, None)
            found.put((tail.host, None, None))

    following = set(links)
    for tail in tails:
        if tail.host in links:
            threading.Thread(target=poll, args=(tail,), daemon=True).start()
    stalled = set()
    while following:
        try:
            host, name, line = found.get(timeout=LOG_POLL_SECONDS)
            if line is None:
                following.discard(host)
            else:
                emit(host, name, line)
        except queue.Empty:
            pass
        now, waiting = time.monotonic(), dict(busy)  # a copy: the threads change busy meanwhile
        for host, since in waiting.items():
            if now - since > LOG_STALL_SECONDS and host not in stalled:
                stalled.add(host)
                emit(host, None, f"not answering for {LOG_STALL_SECONDS}s (still waiting for it)")
        stalled &= set(waiting)
