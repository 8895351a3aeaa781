"""systemd unit files for service processes on hosts that run systemd. Pure: renders text.

A unit does what fleet's supervisor (fleet/supervisor.py) does elsewhere, with the same files
where they overlap: cwd ROOT, FLEET_PROC=ROOT/NAME in the environment (fleet's "is this pid ours"
marker), ROOT/run/NAME.pid naming the running process, output appended to ROOT/log/NAME.log,
SIGTERM then SIGKILL after the grace period, a
restart after any exit that a stop did not ask for (Restart=always, as the supervisor: a server
that exits 0 on its own is as gone as one that crashed), and enabled at boot
(WantedBy=multi-user.target). Differences: systemd 252 (Debian 12) has no growing restart delay
(RestartSteps= needs 254), so a crashing unit restarts every RestartSec= without giving up
(StartLimitIntervalSec=0, like the supervisor's cap); and append: does not rotate the log.
desired.py renders each process's unit to ROOT/units/NAME.service; the host scripts
(commands.py: start_proc, stop_procs, procstate) install, stop and read it where the host runs
systemd and the session is root (docs/operations.md, "systemd units").

Every value goes through a quoting function for the syntax of its setting; a value that cannot
be written safely (a newline, a control character, a relative path) raises UnitError.
"""

import hashlib
import re

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # no "@": that would make a template unit
USER = re.compile(r"^[a-z_][a-z0-9_-]{0,30}\$?$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnitError(ValueError):
    """A value that no unit file can carry as given."""


def _printable(value, what):
    if not isinstance(value, str):
        raise UnitError(f"{what}: expected text, got {value!r}")
    if CONTROL.search(value):
        raise UnitError(f"{what}: newlines and control characters are not allowed: {value!r}")
    return value


def quote_word(value, what="value", exec_line=False):
    """One word of ExecStart= or one VAR=value of Environment=, double-quoted. Inside quotes
    systemd undoes C escapes (so \\ and " are escaped), expands specifiers (% becomes %%) and,
    on Exec lines only, $VAR (so $ becomes $$). A lone ; separates commands on Exec lines even
    quoted, so it is written as systemd's escape \\; instead."""
    _printable(value, what)
    if exec_line and value == ";":
        return "\\;"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def _absolute(value, what):
    _printable(value, what)
    if not value.startswith("/"):
        raise UnitError(f"{what}: expected an absolute path, got {value!r}")
    return value


def quote_path(value, what="path"):
    """An absolute path for settings that take the rest of the line (WorkingDirectory=,
    StandardOutput=append:): no quoting there, so no whitespace, quotes or backslashes either
    (a trailing backslash would continue the line); specifiers are expanded, so % becomes %%."""
    _absolute(value, what)
    if re.search(r"[\s\"'\\]", value):
        raise UnitError(f"{what}: spaces, quotes and backslashes are not allowed in a unit's path: {value!r}")
    return value.replace("%", "%%")


def quote_text(value, what="text"):
    """Free text that takes the rest of the line (Description=): specifiers expanded."""
    return _printable(value, what).strip().replace("%", "%%")


def root_digest(root):
    """What tells apart the units of two fleet roots on one host (tests run several)."""
    return hashlib.sha256(root.encode()).hexdigest()[:8]


def unit_name(root, name):
    """fleet-NAME-HASH.service, HASH = root_digest(root). The host scripts (commands.py) name a
    unit the same way from $UH."""
    if not NAME.match(name or ""):
        raise UnitError(f"process name: letters, digits and _.- only, got {name!r}")
    return f"fleet-{name}-{root_digest(root)}.service"


def _seconds(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise UnitError(f"{what}: expected seconds between 0 and 86400, got {value!r}")
    return f"{value:g}"


# Run by systemd around the service (as `sh -c SCRIPT sh ARGS`): the files fleet's host scripts read
# for every process, whoever keeps it. ROOT/run/NAME.pid names the main pid while it runs (what
# wait_listen and the FLEET_PROC check read); ROOT/run/NAME.exit records how it last ended
# (`RESULT CODE STATUS TIME`, from systemd's $SERVICE_RESULT $EXIT_CODE $EXIT_STATUS), which
# `systemctl show` forgets once the restarted process runs.
_PID_SCRIPT = 'echo "$MAINPID" > "$1"'
_EXIT_SCRIPT = 'rm -f "$1"; echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$2"'


def _exec_line(words, what):
    return " ".join(quote_word(arg, f"{what} word {i}", exec_line=True) for i, arg in enumerate(words))


def render_unit(root, name, command, *, user=None, grace=15, restart_sec=1, environment=None):
    """The text of the unit that runs `command` (a list: executable and arguments) as process
    NAME of the fleet root ROOT. restart_sec: 1, the supervisor's first restart delay."""
    unit_name(root, name)
    root = _absolute(root, "root").rstrip("/") or "/"
    if not command:
        raise UnitError("command: expected at least an executable")
    _absolute(command[0], "executable")  # no PATH lookup, and no Exec prefix such as "-" or "+"
    pid_file = f"{root}/run/{name}.pid"
    exit_file = f"{root}/run/{name}.exit"
    env = {"FLEET_PROC": f"{root}/{name}"}
    for key, value in (environment or {}).items():
        if not ENV_KEY.match(key) or key == "FLEET_PROC":
            raise UnitError(f"environment: bad variable name {key!r}")
        env[key] = value
    lines = [
        "[Unit]",
        f"Description=fleet {quote_text(name)} ({quote_text(root)})",
        "After=network-online.target",
        "Wants=network-online.target",
        # Never give up restarting; RestartSec= below paces it.
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={_exec_line(command, 'command')}",
        f"ExecStartPost={_exec_line(['/bin/sh', '-c', _PID_SCRIPT, 'sh', pid_file], 'ExecStartPost')}",
        f"ExecStopPost={_exec_line(['/bin/sh', '-c', _EXIT_SCRIPT, 'sh', pid_file, exit_file], 'ExecStopPost')}",
        f"WorkingDirectory={quote_path(root, 'root')}",
        *[f"Environment={quote_word(f'{key}={value}', f'environment {key}')}" for key, value in env.items()],
        "UMask=0077",
        f"StandardOutput=append:{quote_path(f'{root}/log/{name}.log', 'log')}",
        "StandardError=inherit",
        "Restart=always",
        f"RestartSec={_seconds(restart_sec, 'restart_sec')}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={_seconds(grace, 'grace')}",
    ]
    if user is not None:
        if not USER.match(user) and not user.isdigit():
            raise UnitError(f"user: expected a user name or uid, got {user!r}")
        lines.append(f"User={user}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def process_unit(root, name, command, grace):
    """The unit of one of fleet's processes: `command` is a shell command line, run as fleet's
    supervisor runs it (`sh -c 'exec COMMAND'`), stopped with the same grace."""
    return render_unit(root, name, ["/bin/sh", "-c", f"exec {command}"], grace=grace)
