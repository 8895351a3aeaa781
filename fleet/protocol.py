"""The one protocol between the controller and a host: every marker a host script prints and the
controller reads, defined here once, and the framing of a step.

A run holds one shell session per host (commands.session). The controller sends a step script
followed by a line `@@run`; the session runs it in a subshell and answers with its output, ended
by `@@done EXIT_CODE`. Output lines that start with `@@` are reports, parsed by facts.parse; any
other line is the free text of a failing command, kept for error messages."""

import os
from enum import Enum
from typing import NamedTuple

# Session framing.
READY = "@@ready"  # the session holds the host's deploy lock (or runs without one) and waits for steps
RUN = "@@run"  # controller -> host: the step script above this line is complete
DONE = "@@done"  # host -> controller: `@@done EXIT_CODE`, the step ended
LOCKED = "@@locked"  # `@@locked HOLDER`: another run holds the lock; the session exits LOCKED_EXIT
WAITING = "@@waiting"  # `@@waiting HOLDER`: --wait-lock, waiting for the holder
BREAKING = "@@breaking"  # `@@breaking HOLDER`: --break-lock, ending the holder's session
LOCKED_EXIT = 75
# `@@machine SYSTEM MACHINE`: the host's `uname -s` and `uname -m`, before READY (the Envoy binary
# and other machine-specific artifacts are chosen by it, runner.for_machine)
MACHINE = "@@machine"


class Sent(NamedTuple):
    """A file that follows a step's script on the session's input. The step's receiver
    (commands.receive) takes exactly `size` bytes as `member`, and the controller sends exactly
    that many (connection.ScriptSession): one list drives both, so the bytes of a file can never
    be read as script lines. `body` has `content` (bytes) or else `source` (a controller path),
    sent only while it is still the file measured (`identity`)."""

    member: str
    size: int
    mode: int
    label: str  # names the file in a failure
    body: object
    identity: tuple | None = None  # file_identity of `source` when measured

    @classmethod
    def measured(cls, member, mode, label, body):
        if body.content is not None:
            return cls(member, len(body.content), mode, label, body)
        # As it was when hashed, where that is known: a file changed since is not what its sha256 names.
        identity = getattr(body, "identity", None) or file_identity(os.stat(body.source))
        return cls(member, identity[0], mode, label, body, identity)


def file_identity(st):
    """What a write, a truncation or a replacement of a file changes: its size first."""
    return st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


# Reports inside a step's output.
FILE = "@@file"  # `@@file present|absent PATH`
CONTENT = "@@content"  # `@@content PATH`, base64 lines, END
PROC = "@@proc"  # `@@proc NAME PID|- ALIVE(0|1) FINGERPRINT|-`
# `@@supervised NAME SUPERVISOR_ALIVE(0|1) KEY=VALUE...`: after PROC, its supervisor and the state
# line it keeps in ROOT/run/NAME.state (fleet/supervisor.py; no fields if there is none).
SUPERVISED = "@@supervised"
NETSTAT = "@@netstat"  # netstat -tnlp (or ss -tnlp) lines, END
INIT = "@@init"  # `@@init systemd|other`: whether the host runs systemd as PID 1
ADDRESSES = "@@addresses"  # `@@addresses ADDR ...`: the host's own IP addresses
STEP = "@@step"  # `@@step TASK_LABEL STATUS`
FAIL = "@@fail"  # `@@fail NAME REASON`
LOG = "@@log"  # `@@log NAME`, this run's output of the process, END
STOPPED = "@@stopped"  # `@@stopped NAME`
NOT_RUNNING = "@@notrunning"  # `@@notrunning NAME`
ROLLED_BACK = "@@rolledback"  # `@@rolledback NAME`: its previous version is running again
SWITCH_FINISHED = "@@switched"  # `@@switched TXID EXIT`: a switch that ended while no controller listened
RECOVERED = "@@recovered"  # `@@recovered TXID`: an interrupted switch, rolled back by this run
UNFINISHED = "@@unfinished"  # `@@unfinished TXID`: an interrupted switch seen by a read-only run
BECOME_END = "@@become-end"  # controller -> host, ahead of the session: the become password's end
PLATFORM = "@@platform"  # `@@platform MACHINE LIBC LIBC_VERSION PYTHON_VERSION` (fleet/hostenv.py)
VENV = "@@venv"  # `@@venv WHEEL_SET` (empty: no venv built by fleet)
WHEELS = "@@wheels"  # `@@wheels NAME ...`: the wheels already under ROOT/wheels
OUTCOME = "@@outcome"  # `@@outcome EXIT`: last line of a switch's journal
# Releases and logs (fleet/releases.py, `fleet releases`, `rollback`, `logs`).
RELEASE = "@@release"  # `@@release SERVICE ID`, the base64 of its manifest.json, END
CURRENT = "@@current"  # `@@current SERVICE ID`: the release the service runs on this host
RECORDED = "@@recorded"  # `@@recorded SERVICE ID`: a release was written and made current
ARTIFACT = "@@artifact"  # `@@artifact DIR inuse|unused`: an ROOT/artifacts/DIR, and whether a run/ file names it
PRUNED = "@@pruned"  # `@@pruned PATH`: a release or artifact directory removed
LOG_CHUNK = "@@logchunk"  # `@@logchunk NAME INODE OFFSET`, the base64 of log bytes from OFFSET, END
END = "@@end"  # ends a block (CONTENT, NETSTAT, LOG, RELEASE, LOG_CHUNK)


REPORT = "@@"  # what every marker starts with


def is_report(line):
    """A protocol line, as opposed to free text printed by a command."""
    return line.startswith(REPORT)


def frame(script):
    """A step as sent to the session."""
    return f"{script.rstrip(chr(10))}\n{RUN}\n".encode()


def done_code(line):
    """The exit code of a `@@done N` line, or None for any other line."""
    if line.startswith(DONE + " "):
        return int(line[len(DONE) + 1:])
    return None


class Status(str, Enum):
    """What a step did on a host."""

    OK = "ok"  # already as desired
    CHANGED = "changed"
    FAILED = "failed"
    WOULD_CHANGE = "would change"  # --check
    RUNNING = "running"  # under way (progress only)

    def __str__(self):
        return self.value
