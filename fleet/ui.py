"""What the operator sees: live per-host progress, summary tables, diffs. Rich on a terminal,
plain lines elsewhere (CI logs, pipes)."""

import sys
import threading

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as Bars, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from fleet import facts, releases

STATUS_STYLE = {"ok": "green", "changed": "yellow", "would change": "yellow", "failed": "bold red", "running": "cyan"}


# Without a terminal (CI logs, pipes) nothing is wrapped: tables take the width their rows need.
UNWRAPPED_WIDTH = 1000
# Transfers smaller than this finish too fast for a bar to tell anything.
BYTES_BAR_MIN = 1 << 20


def make_console(stderr=False):
    """The operator's view; on stderr when stdout carries --json."""
    console = Console(highlight=False, soft_wrap=True, stderr=stderr)
    if not console.is_terminal:
        console.width = UNWRAPPED_WIDTH
    return console


def error(message):
    """The one-line error for bad input, on stderr."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), message))


class Progress:
    """Per-host rows (the step under way, counts of steps ok / changed / failed so far), hosts done
    of N, and a bar per large transfer with its rate and time left. On a terminal the view stays
    on screen when the run ends, so which steps changed on which host remains visible."""

    def __init__(self, console, hosts):
        self.console = console
        self.rows = {h: {"step": "waiting", "ok": 0, "changed": 0, "failed": 0} for h in hosts}
        self.changed_steps = {h: [] for h in hosts}  # labels changed or failed, for the final view
        self.finished = False
        self.lock = threading.Lock()
        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console)
        self.hosts_done = self.bars.add_task("hosts done", total=len(hosts))
        self.transfers = Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self.live = Live(self._view(), console=console, refresh_per_second=8, transient=False) \
            if console.is_terminal else None

    def __enter__(self):
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.finished = True
            self.live.update(self._view())
            self.live.stop()

    def finish(self, host, outcome):
        """Marks a host done; returns its outcome."""
        with self.lock:
            self.bars.advance(self.hosts_done)
            self._refresh()
        return outcome

    def sending(self, host, total):
        """A callback for bytes sent to a host (None for small transfers): advances its bar."""
        if not self.live or total < BYTES_BAR_MIN:
            return None
        task = self.transfers.add_task(f"{host} sending", total=total)

        def sent(count):
            self.transfers.advance(task, count)
        return sent

    def step(self, host, label, status, detail=""):
        with self.lock:
            row = self.rows[host]
            row["step"] = f"{label} {status}" + (f": {detail}" if detail else "")
            if status in ("ok", "changed", "failed"):
                row[status] += 1
            if status in ("changed", "would change", "failed"):
                self.changed_steps[host].append(Text(label, STATUS_STYLE[status]))
            if self.live:
                self._refresh()
            else:
                self.console.print(Text.assemble(f"{host:<14} {label:<34} ", (status, STATUS_STYLE.get(status, "")),
                                                 f"  {detail}" if detail else ""))

    def _refresh(self):
        if self.live:
            self.live.update(self._view())

    def _view(self):
        parts = [self._table(), self.bars]
        if self.transfers.tasks:
            parts.append(self.transfers)
        return Group(*parts)

    def _table(self):
        table = Table(box=None, show_header=True, header_style="bold")
        for column in ("host", "step", "ok", "changed", "failed"):
            table.add_column(column)
        for host, row in self.rows.items():
            step = Text(row["step"])
            if self.finished:  # what happened on the host, rather than its last step
                step = Text(", ").join(self.changed_steps[host]) if self.changed_steps[host] else Text("no changes")
            table.add_row(host, step, str(row["ok"]), f"[yellow]{row['changed']}[/]",
                          f"[red]{row['failed']}[/]" if row["failed"] else "0")
        return table


def summary(console, outcomes, checks):
    table = Table(title="deploy summary", header_style="bold")
    for column in ("host", "ok", "changed", "failed", "ports verified", "notes"):
        table.add_column(column)
    for outcome in outcomes:
        counts = outcome.counts()
        ports = [c for c in outcome.ports]
        verified = f"{sum(c.ok for c in ports)}/{len(ports)}" if ports else "-"
        table.add_row(outcome.host, str(counts["ok"]), f"[yellow]{counts['changed']}[/]",
                      f"[red]{counts['failed']}[/]" if counts["failed"] else "0", verified,
                      Text(outcome.error or ""))
    console.print(table)
    for outcome in outcomes:
        for check in outcome.ports:
            if not check.ok:
                console.print(Text.assemble(("✗ ", "red"), f"{outcome.host}: {check.process} port {check.port}: "
                                                           f"{check.detail}"))
        for name, tail in outcome.logs.items():
            console.print(Text.assemble(("✗ ", "red"), f"{outcome.host}: {name} log (last lines):"))
            console.print(tail, markup=False)
    for service, ok, detail in checks:
        console.print(Text.assemble(("✓ ", "green") if ok else ("✗ ", "red"), f"{service}: {detail}"))


def check_report(console, plans, failures):
    """--check: what a deploy would change, with diffs of rendered files."""
    for host, plan in plans.items():
        if not plan.changed:
            console.print(Text.assemble((host, "green"), ": no changes"))
            continue
        console.print(Text.assemble((host, "yellow"), ": would change"))
        for spec in plan.send:
            what = "update" if spec.content is not None else "upload"
            console.print(f"  {what} {spec.path}  ({spec.task})")
        for proc in plan.restarts:
            console.print(f"  (re)start {proc.name}: {plan.reasons[proc.name]}")
        for path, diff in plan.diffs:
            if diff:
                console.print(Syntax(diff, "diff", theme="ansi_dark", background_color="default"))
    for host, reason in failures.items():
        console.print(Text.assemble((host, "red"), f": {reason}"))


def status_report(console, statuses, views, not_checked=None):
    """Processes (dead ones first) with their ports, then Envoy's view of each service's backends;
    not_checked: service -> why its Envoy was not asked (its host left out by --limit)."""
    table = Table(title="processes", header_style="bold")
    for column in ("host", "process", "state", "pid", "restarts", "last exit", "ports", "release", "drift"):
        table.add_column(column)
    rows = []
    for status in statuses:
        if status.error:
            rows.append((0, status.host, "-", Text("unreachable", "red"), "-", "-", "-", Text(status.error), "-", "-"))
            continue
        for name, proc in status.procs.items():
            state = facts.process_state(proc)
            alive = state == "running"
            supervision = proc.supervision if proc else None
            ports = [c for c in status.ports if c.process == name]
            port_text = ", ".join(f"{c.port} {'✓' if c.ok else '✗'}" for c in ports)
            rows.append((1 if alive else 0, status.host, name, Text(state, "green" if alive else "red"),
                         str(proc.pid) if alive else "-", str(supervision.restarts) if supervision else "-",
                         (supervision.last_exit or "-") if supervision else "-", port_text,
                         status.releases.get(name) or "-",
                         _drift_text(status.drift.get(name), status.not_compared.get(name))))
    for row in sorted(rows, key=lambda r: r[0]):
        table.add_row(*row[1:])
    console.print(table)
    for status in statuses:
        if status.systemd:
            units = sorted(n for n, p in status.procs.items() if p and p.supervision and p.supervision.keeper == "systemd")
            console.print(Text.assemble(("- ", "dim"), f"{status.host} runs systemd; "
                                        + (f"units keep {', '.join(units)}, " if units else "no units of fleet's, ")
                                        + "fleet's supervisor the rest (docs/operations.md)"))
    for service, view in views.items():
        if isinstance(view, str):
            console.print(Text.assemble(("✗ ", "red"), f"{service} Envoy: {view}"))
            continue
        envoy = Table(title=f"{service}: Envoy's view", header_style="bold")
        for column in ("endpoint", "health", "requests"):
            envoy.add_column(column)
        for endpoint in sorted(view, key=lambda e: e.healthy):
            health = "[green]healthy[/]" if endpoint.healthy else f"[red]{endpoint.health_flags}[/]"
            envoy.add_row(endpoint.address, health, str(endpoint.rq_total))
        console.print(envoy)
    for service, why in (not_checked or {}).items():
        console.print(Text.assemble(("- ", "dim"), f"{service} Envoy: {why}"))


def stop_report(console, outcomes):
    for outcome in outcomes:
        if outcome.error:
            console.print(Text.assemble(("✗ ", "red"), f"{outcome.host}: {outcome.error}"))
        for label, status in outcome.steps.items():
            word = {"changed": "stopped", "ok": "was not running", "failed": "FAILED to stop"}[status]
            console.print(f"{outcome.host}: {label[5:]} {word}")


def timings(console, outcomes, run_phases):
    """Per-host phases (median and slowest host) and run-wide phases, in seconds."""
    table = Table(title="where the time went", header_style="bold")
    for column in ("phase", "median host", "slowest host", "hosts"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    for phase in ("connect", "facts", "apply"):
        values = sorted(o.timings[phase] for o in outcomes if phase in o.timings)
        if values:
            slowest = max(outcomes, key=lambda o: o.timings.get(phase, -1))
            table.add_row(phase, f"{values[len(values) // 2]:.2f}", f"{values[-1]:.2f} ({slowest.host})",
                          str(len(values)))
    for phase, seconds in run_phases.items():
        table.add_row(phase, "", f"{seconds:.2f}", "run")
    console.print(table)


def _drift_text(reasons, not_compared=None):
    if reasons:
        return Text("drifted: " + "; ".join(reasons), "yellow")
    return Text(f"not compared: {not_compared}", "dim") if not_compared else Text("as inventory", "green")


def releases_report(console, service, found):
    """`fleet releases`: per host, newest first, the current one marked."""
    table = Table(title=f"{service}: releases", header_style="bold")
    for column in ("host", "release", "time", "who", "", "same as"):
        table.add_column(column)
    for host in found:
        if host.error:
            table.add_row(host.host, Text("unreachable", "red"), Text(host.error), "", "", "")
            continue
        listed = host.listing.releases.get(service, [])
        if not listed:
            table.add_row(host.host, "-", "no release recorded", "", "", "")
        current = host.listing.current.get(service)
        seen = {}  # identity -> the oldest release with it: a rollback records one like an older one
        same = {}
        for release in listed:
            if release.manifest:
                key = releases.identity(release.manifest)
                same[release.id] = seen.get(key, "")
                seen.setdefault(key, release.id)
        for release in reversed(listed):
            doc = release.manifest or {}
            table.add_row(host.host, release.id, doc.get("time", ""), doc.get("who", Text(release.error or "", "red")),
                          Text("current", "green") if release.id == current else "", same.get(release.id, ""))
    console.print(table)


def log_line(host, process, line):
    """One log line, `HOST PROCESS | LINE`, as is (no markup: logs hold brackets); process None:
    a line about the host itself, on stderr."""
    if process is None:
        sys.stderr.write(f"{host}: {line}\n")
        sys.stderr.flush()
        return
    sys.stdout.write(f"{host} {process} | {line}\n")
    sys.stdout.flush()
