"""Parsing what the host scripts report (see commands.py): files, processes, listeners, steps."""

import base64
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProcState:
    name: str
    pid: int | None
    alive: bool
    fingerprint: str | None


@dataclass(frozen=True)
class Listener:
    port: int
    address: str
    pid: int | None
    program: str


@dataclass
class Report:
    present: dict = field(default_factory=dict)  # path -> bool
    contents: dict = field(default_factory=dict)  # path -> bytes
    procs: dict = field(default_factory=dict)  # name -> ProcState
    listeners: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # (task label, status)
    failures: list = field(default_factory=list)  # (name, reason)
    logs: dict = field(default_factory=dict)  # process name -> log tail
    stopped: list = field(default_factory=list)
    not_running: list = field(default_factory=list)
    rolled_back: list = field(default_factory=list)


def parse(text):
    report = Report()
    lines = iter(text.splitlines())
    for line in lines:
        if not line.startswith("@@"):
            continue
        kind, _, rest = line[2:].partition(" ")
        if kind == "file":
            state, _, path = rest.partition(" ")
            report.present[path] = state == "present"
        elif kind == "content":
            body = _block(lines)
            report.present[rest] = True
            report.contents[rest] = base64.b64decode("".join(body))
        elif kind == "proc":
            name, pid, alive, fp = rest.split(" ")
            report.procs[name] = ProcState(name=name, pid=int(pid) if pid.isdigit() else None, alive=alive == "1",
                                           fingerprint=None if fp == "-" else fp)
        elif kind == "netstat":
            report.listeners = parse_listeners(_block(lines))
        elif kind == "step":
            label, _, status = rest.partition(" ")
            report.steps.append((label, status))
        elif kind == "fail":
            name, _, reason = rest.partition(" ")
            report.failures.append((name, reason))
        elif kind == "log":
            report.logs[rest] = "\n".join(_block(lines))
        elif kind == "stopped":
            report.stopped.append(rest)
        elif kind == "notrunning":
            report.not_running.append(rest)
        elif kind == "rolledback":
            report.rolled_back.append(rest)
    return report


def _block(lines):
    body = []
    for line in lines:
        if line == "@@end":
            break
        body.append(line)
    return body


_SS_PID = re.compile(r'\("([^"]*)",pid=(\d+)')


def parse_listeners(lines):
    """TCP listeners from `netstat -tnlp` or `ss -tnlp` output."""
    found = []
    for line in lines:
        cols = line.split(None, 6)  # the program name (last column) may hold spaces
        if len(cols) == 7 and cols[0] in ("tcp", "tcp6") and cols[5] == "LISTEN":
            pid, _, program = cols[6].strip().partition("/")
            found.append(Listener(port=_port(cols[3]), address=cols[3].rsplit(":", 1)[0],
                                  pid=int(pid) if pid.isdigit() else None, program=program))
        elif len(cols) >= 5 and cols[0] == "LISTEN":
            match = _SS_PID.search(line)
            found.append(Listener(port=_port(cols[3]), address=cols[3].rsplit(":", 1)[0],
                                  pid=int(match.group(2)) if match else None,
                                  program=match.group(1) if match else ""))
    return found


def _port(local_address):
    return int(local_address.rsplit(":", 1)[1])
