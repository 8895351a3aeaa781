"""Parsing what the host scripts report (see commands.py): files, processes, listeners, steps."""

import base64
import dataclasses
import re
from dataclasses import dataclass, field

from fleet import protocol as P


@dataclass(frozen=True)
class Supervision:
    """What a process's supervisor recorded (fleet/supervisor.py, ROOT/run/NAME.state)."""

    state: str  # running, backoff, stopping, stopped; dead: no supervisor lives; absent: none ever started
    restarts: int
    last_exit: str | None  # exit:N, SIGNAME, exec:ERROR; None before the first exit
    keeper: str = "fleet"  # what restarts it: "fleet" (its supervisor) or "systemd" (its unit)

    @property
    def supervised(self):
        """A supervisor lives (and restarts the process whenever it exits)."""
        return self.state in ("running", "backoff", "stopping")


@dataclass(frozen=True)
class ProcState:
    name: str
    pid: int | None
    alive: bool
    fingerprint: str | None
    supervision: Supervision | None = None  # None: the host did not say (an older fleet's report)


@dataclass(frozen=True)
class Listener:
    port: int
    address: str
    pid: int | None
    program: str


def process_state(proc):
    """What `fleet status` calls a process (a ProcState, or None if the host reported none):
    running; backoff (it keeps exiting, its supervisor waits to start it again); stopped (by fleet
    stop); dead (gone, and nothing will restart it); not started."""
    if proc is None:
        return "not started"
    if proc.alive:
        return "running"
    supervision = proc.supervision
    if supervision is not None and supervision.state in ("backoff", "stopped"):
        return supervision.state
    if proc.pid is not None or (supervision is not None and supervision.state != "absent"):
        return "dead"
    return "not started"


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
    addresses: list = field(default_factory=list)  # the host's own IP addresses
    systemd: bool = False  # the host runs systemd as PID 1
    switches: list = field(default_factory=list)  # (txid, what): earlier switches this run found and settled
    releases: dict = field(default_factory=dict)  # service -> its current release id on the host


def parse(text):
    report = Report()
    lines = iter(text.splitlines())
    for line in lines:
        marker, _, rest = line.partition(" ")
        if marker == P.FILE:
            state, _, path = rest.partition(" ")
            report.present[path] = state == "present"
        elif marker == P.CONTENT:
            body = block(lines)
            report.present[rest] = True
            report.contents[rest] = base64.b64decode("".join(body))
        elif marker == P.PROC:
            name, pid, alive, fp = rest.split(" ")
            report.procs[name] = ProcState(name=name, pid=int(pid) if pid.isdigit() else None, alive=alive == "1",
                                           fingerprint=None if fp == "-" else fp)
        elif marker == P.SUPERVISED:
            name = rest.partition(" ")[0]
            if name in report.procs:
                report.procs[name] = dataclasses.replace(report.procs[name], supervision=parse_supervision(rest))
        elif marker == P.NETSTAT:
            report.listeners = parse_listeners(block(lines))
        elif marker == P.INIT:
            report.systemd = rest == "systemd"
        elif marker == P.ADDRESSES:
            report.addresses = rest.split()
        elif marker == P.STEP:
            label, _, status = rest.partition(" ")
            report.steps.append((label, P.Status(status)))
        elif marker == P.FAIL:
            name, _, reason = rest.partition(" ")
            report.failures.append((name, reason))
        elif marker == P.LOG:
            report.logs[rest] = "\n".join(block(lines))
        elif marker == P.STOPPED:
            report.stopped.append(rest)
        elif marker == P.NOT_RUNNING:
            report.not_running.append(rest)
        elif marker == P.ROLLED_BACK:
            report.rolled_back.append(rest)
        elif marker == P.SWITCH_FINISHED:
            txid, _, code = rest.partition(" ")
            report.switches.append((txid, "ended while no controller was connected"
                                    + (" (ok)" if code == "0" else f" (failed, exit {code}; see the host's log)")))
        elif marker == P.RECOVERED:
            report.switches.append((rest, "was cut off mid-switch; rolled back to the previous version"))
        elif marker == P.UNFINISHED:
            report.switches.append((rest, "was cut off mid-switch; the next deploy rolls it back"))
        elif marker == P.CURRENT:
            service, _, release_id = rest.partition(" ")
            report.releases[service] = release_id
    return report


def parse_supervision(rest):
    """`NAME SUPERVISOR_ALIVE KEY=VALUE...` (protocol.SUPERVISED). The state is corrected by what
    lives, as `supervisor.py status` does: a recorded state other than stopped, without a live
    supervisor, is `dead`; no state line at all is `absent`."""
    _, alive, *words = rest.split(" ")
    fields = dict(w.split("=", 1) for w in words if "=" in w)
    state = fields.get("state", "absent")
    if state not in ("absent", "stopped") and alive != "1":
        state = "dead"
    restarts = fields.get("restarts", "0")
    last_exit = fields.get("last_exit", "-")
    return Supervision(state=state, restarts=int(restarts) if restarts.isdigit() else 0,
                       last_exit=None if last_exit == "-" else last_exit,
                       keeper="systemd" if fields.get("supervisor") == "systemd" else "fleet")


def block(lines):
    """The lines of a report's block, up to its protocol.END (releases.py reads its own blocks too)."""
    body = []
    for line in lines:
        if line == P.END:
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


@dataclass(frozen=True)
class LogChunk:
    name: str  # the process whose log it is
    inode: str  # of the file read, or "-" if there is none yet
    next_offset: int  # where the next read of that file starts
    data: bytes


def parse_log_chunks(text):
    """The `@@logchunk NAME INODE NEXT` blocks of commands.log_tail / log_follow, in order."""
    chunks = []
    lines = iter(text.splitlines())
    for line in lines:
        marker, _, rest = line.partition(" ")
        if marker == P.LOG_CHUNK:
            name, inode, offset = rest.split(" ")
            if not (inode == "-" or inode.isdigit()) or not offset.isdigit():
                raise ValueError(f"bad log position: {line!r}")
            chunks.append(LogChunk(name, inode, int(offset), base64.b64decode("".join(block(lines)))))
    return chunks


class LogStream:
    """One process's log as read piece by piece: where to read next, and whole lines (a line cut
    by a read waits for its end; a rotation ends it)."""

    def __init__(self):
        self.inode, self.offset, self.pending = "-", 0, b""

    def take(self, chunk):
        """The complete lines that `chunk` ends."""
        lines = []
        if chunk.inode != self.inode and self.pending:
            lines.append(self.pending)
            self.pending = b""
        self.inode, self.offset = chunk.inode, chunk.next_offset
        *whole, self.pending = (self.pending + chunk.data).split(b"\n")
        return [l.decode(errors="replace") for l in lines + whole]

    def rest(self):
        """The unfinished last line, if any (shown when not following)."""
        rest, self.pending = self.pending, b""
        return [rest.decode(errors="replace")] if rest else []
