"""What a deploy changes on one host: desired state compared with the host's facts. Pure."""

import difflib
import os
from dataclasses import dataclass, field

from fleet.protocol import Status


@dataclass
class HostPlan:
    state: object  # desired.HostState
    send: list = field(default_factory=list)  # FileSpecs to send, in apply order
    restarts: list = field(default_factory=list)  # ProcessSpecs to (re)start
    reasons: dict = field(default_factory=dict)  # process name -> why it (re)starts
    diffs: list = field(default_factory=list)  # (path, unified diff text) of changed rendered files

    @property
    def payload(self):
        """(tar member name, FileSpec) for every file sent."""
        return [(f"f{i}", spec) for i, spec in enumerate(self.send)]

    @staticmethod
    def size(spec):
        if spec.content is not None:
            return len(spec.content)
        return spec.identity[0] if spec.identity else os.path.getsize(spec.source)

    def files_by_task(self):
        grouped = {}
        for member, spec in self.payload:
            grouped.setdefault(spec.task, []).append((member, spec))
        return list(grouped.items())

    @property
    def changed(self):
        return bool(self.send or self.restarts)

    def only(self, tasks):
        """This plan restricted to the given task labels (what a rolling batch applies)."""
        keep = set(tasks)
        send = [f for f in self.send if f.task in keep]
        paths = {f.path for f in send}
        restarts = [p for p in self.restarts if p.task in keep]
        return HostPlan(state=self.state, send=send, restarts=restarts,
                        reasons={p.name: self.reasons[p.name] for p in restarts},
                        diffs=[d for d in self.diffs if d[0] in paths])

    def without(self, tasks):
        return self.only(set(self.state.tasks) - set(tasks))

    def task_status(self):
        """task label -> Status.CHANGED or Status.OK, as this plan would leave it."""
        changed = {f.task for f in self.send} | {p.task for p in self.restarts}
        return {task: (Status.CHANGED if task in changed else Status.OK) for task in self.state.tasks}


def plan_host(state, report, mask=str):
    """mask hides secret values in the diffs."""
    plan = HostPlan(state=state)
    for spec in state.files:
        if spec.content is None:
            if not report.present.get(spec.path):
                plan.send.append(spec)
            continue
        current = report.contents.get(spec.path)
        if current != spec.content:
            plan.send.append(spec)
            plan.diffs.append((spec.path, mask(unified_diff(spec.path, current, spec.content, spec.secret))))
    sent = {f.path for f in plan.send}
    for proc in state.processes:
        found = report.procs.get(proc.name)
        if found is None or not found.alive:
            plan.restarts.append(proc)
            plan.reasons[proc.name] = "not running"
        elif found.fingerprint != proc.fingerprint:
            plan.restarts.append(proc)
            plan.reasons[proc.name] = "command or files changed"
        elif found.supervision is not None and not found.supervision.supervised:
            plan.restarts.append(proc)  # started by an older fleet: nothing would restart it
            plan.reasons[proc.name] = "running without fleet's supervisor"
        elif sent & set(proc.files):
            # Same fingerprint, yet a file it runs with differs on the host (edited there, or gone):
            # what runs may have read it, and its supervisor's next restart would.
            plan.restarts.append(proc)
            plan.reasons[proc.name] = "a file it restarts on differs on the host"
    return plan


def unified_diff(path, old, new, secret=False):
    """A diff of a file's contents. For a file that holds secrets, removed lines are hidden: they
    may hold an old secret value that the inventory no longer knows, so cannot mask."""
    old_lines = old.decode(errors="replace").splitlines(keepends=True) if old is not None else []
    new_lines = new.decode(errors="replace").splitlines(keepends=True)
    lines = difflib.unified_diff(old_lines, new_lines, fromfile=f"{path} (on host)" if old is not None
                                 else "/dev/null", tofile=f"{path} (new)")
    if secret:
        lines = ["-(line hidden: this file holds secrets)\n" if l.startswith("-") and not l.startswith("---")
                 else l for l in lines]
    return "".join(lines)
