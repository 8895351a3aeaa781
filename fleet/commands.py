"""Shell scripts run on hosts, built as values. Pure; nothing here runs.

Every remote command costs a login shell (~150 ms on hosts whose shell rc runs pyenv or conda
init), so fleet starts exactly one per host per run: session() below, a small shell loop that
holds the host's deploy lock and runs the step scripts (facts, apply, stop) that the controller
sends over stdin, one after the other (fleet/protocol.py frames them).

Quoting is structural: script lines are built with shell.line(), which quotes every word that is
not shell.Raw, so no name, path or value from an inventory can become shell syntax. The fixed
shell code below (_PRELUDE) refers to values only through quoted variables and arguments."""

import posixpath
import re
import time
from dataclasses import dataclass

from fleet import protocol as P, systemd
from fleet.shell import Raw, assign, line, script, word

# Seconds a process has to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 10

def _with_markers(text):
    """Fixed shell text with each %NAME% replaced by protocol.NAME: markers are defined once."""
    return re.sub(r"%([A-Z_]+)%", lambda m: getattr(P, m.group(1)), text)


# Functions shared by every step and by a switch (apply) running detached. A process is ours only
# if its environment carries FLEET_PROC=<root>/<name> (its supervisor's: FLEET_SUPERVISOR=...):
# a recycled pid is never mistaken for it.
_PRELUDE = Raw(_with_markers(r"""
# value FILE: its first line in $v, or empty; a builtin read, where $(cat FILE) costs two forks
# (facts read a handful of these per process on every host, every run).
value() { v=; [ -r "$1" ] && { IFS= read -r v < "$1" || :; }; }
NL='
'  # a newline, to split a command's output in two
heard=; heard_for=  # see answered
running() { value "$R/run/$1.pid"; alive "$v" "$1"; }
# Something restarts it when it exits: its unit is active (or waiting to restart), or its supervisor lives.
supervised() { if installed "$1"; then unit_active "$1"; else value "$R/run/$1.sup"; alive "$v" "$1" FLEET_SUPERVISOR; fi; }
# systemd keeps a process where the host runs it as PID 1, this session is root (units need it)
# and desired rendered a unit for it (ROOT/units/NAME.service, fleet/systemd.py); installed as
# /etc/systemd/system/fleet-NAME-$UH.service, enabled at boot. Everywhere else fleet's supervisor.
systemd_host() { [ -d /run/systemd/system ] && [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1; }
unit() { echo "fleet-$1-$UH.service"; }
by_unit() { [ -f "$R/units/$1.service" ] && systemd_host; }
installed() { [ -f "/etc/systemd/system/$(unit "$1")" ] && systemd_host; }
unit_show() { timeout 20 systemctl show -p ActiveState -p SubState -p NRestarts "$(unit "$1")" 2>/dev/null; }
unit_active() { case "$(unit_show "$1" | grep '^ActiveState=')" in *=active|*=activating|*=reloading|*=deactivating) return 0 ;; esac; return 1; }
# alive PID NAME [MARKER]: PID lives, is this user's (everything fleet starts runs as the session's
# user; another user's process may set the marker for itself) and its environment holds
# MARKER=$R/NAME (FLEET_PROC if not given).
alive() { [ -n "$1" ] && [ "$1" != - ] && [ -O "/proc/$1" ] && kill -0 "$1" 2>/dev/null && environ_has "$1" "${3:-FLEET_PROC}=$R/$2"; }
# environ_has PID ENTRY: one of PID's environment entries is exactly ENTRY. grep -z reads the
# entries as they are, NUL-separated; a grep without -z (exit 2) gets one line per entry from tr,
# newlines inside a value turned into \001 first. Either way a value holding a newline cannot
# pose as an entry of its own.
environ_has() {
  grep -qzxF -e "$2" "/proc/$1/environ" 2>/dev/null; r=$?
  [ "$r" = 2 ] || return "$r"
  tr '\n\0' '\001\n' < "/proc/$1/environ" 2>/dev/null | grep -qxF -e "$2"
}
# Gone, or a zombie not yet reaped by the shell that started it. With the shell's read (no fork):
# stop_procs asks this ten times a second for every process it waits for.
gone() {
  kill -0 "$1" 2>/dev/null || return 0
  s=; { IFS= read -r s < "/proc/$1/stat"; } 2>/dev/null
  s=${s##*) }; [ "${s%% *}" = Z ]
}
procstate() {
  value "$R/run/$1.pid"; pid=$v; value "$R/run/$1.fp"; fp=$v
  if alive "$pid" "$1"; then a=1; else a=0; fi
  echo "%PROC% $1 ${pid:--} $a ${fp:--}"
  if installed "$1"; then unitstate "$1"; return; fi
  # Its supervisor: alive or not, and the state line it keeps (state, restarts, last exit, ...).
  if supervised "$1"; then a=1; else a=0; fi
  value "$R/run/$1.state"; echo "%SUPERVISED% $1 $a $v"
}
# The same line for a unit, from systemctl show and the ROOT/run/NAME.exit its ExecStopPost= writes
# (`RESULT CODE STATUS TIME`): a unit waiting to restart is in backoff, one that failed for good is dead.
unitstate() {
  show=$(unit_show "$1"); active=$(echo "$show" | sed -n 's/^ActiveState=//p'); sub=$(echo "$show" | sed -n 's/^SubState=//p')
  n=$(echo "$show" | sed -n 's/^NRestarts=//p'); a=1
  case "$active/$sub" in
    */auto-restart) st=backoff ;; active/*|activating/*|reloading/*) st=running ;; deactivating/*) st=stopping ;;
    failed/*) st=dead; a=0 ;; *) st=stopped; a=0 ;;
  esac
  read -r _ code status at 2>/dev/null < "$R/run/$1.exit" || code=
  case "$code" in exited) last="exit:$status" ;; killed|dumped) last="SIG$status" ;; *) last=-; at=- ;; esac
  echo "%SUPERVISED% $1 $a state=$st supervisor=systemd unit=$(unit "$1") restarts=${n:-0} last_exit=$last last_exit_at=${at:--}"
}
report_init() { if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then echo "%INIT% systemd"; else echo "%INIT% other"; fi; }
listeners() { if command -v netstat >/dev/null 2>&1; then netstat -tnlp 2>/dev/null; else ss -tnlp 2>/dev/null; fi; }
report_listeners() { echo "%NETSTAT%"; listeners; echo "%END%"; }
report_addresses() {
  printf '%s ' "%ADDRESSES%"
  if command -v ip >/dev/null 2>&1; then ip -o addr show 2>/dev/null | while read -r _ _ _ a _; do printf '%s ' "${a%/*}"; done
  else hostname -I 2>/dev/null | tr '\n' ' '; fi
  echo
}
# Stops every named process of ours at once. SIGTERM goes to its supervisor, which passes it on,
# gives the process the grace (run/NAME.stop), SIGKILLs it after that and exits without restarting
# it; or, for a process an older fleet started without one, to the process itself. Whatever is
# still there after the grace (and 5 s for a supervisor to reap) gets SIGKILL; a supervisor's
# process dies with it.
# A unit is stopped and disabled (it does not come back at boot either), every unit at once, by
# systemctl within the grace and 15 s more; its main process, if still there then, gets SIGKILL.
stop_procs() {
  pids=; units=
  for name in "$@"; do
    value "$R/run/$name.pid"; pid=$v
    if installed "$name"; then
      units="$units $(unit "$name")"; alive "$pid" "$name" && pids="$pids $pid"
    else
      if supervised "$name"; then value "$R/run/$name.sup"; pid=$v; echo "$GRACE" > "$R/run/$name.stop"
      else alive "$pid" "$name" || pid=; fi
      [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && pids="$pids $pid"
    fi
    for f in pid fp hot started; do [ ! -e "$R/run/$name.$f" ] || rm -f "$R/run/$name.$f"; done
  done
  # shellcheck disable=SC2086
  [ -z "$units" ] || timeout $((GRACE + 15)) systemctl disable --now --quiet $units 2>/dev/null ||
    echo "%FAIL% ${units# } systemctl could not stop and disable the unit(s):$units"
  waited=0
  for pid in $pids; do
    while ! gone "$pid" && [ "$waited" -lt $((GRACE * 10 + 50)) ]; do sleep 0.1; waited=$((waited + 1)); done
    gone "$pid" || kill -KILL "$pid" 2>/dev/null
  done
}
# The supervisor's commands ($SUP, run by the host's $PY), imported as a module so that Python keeps
# its bytecode beside it: run as a script, its 900 lines were compiled again at every call. -S: no
# site, which it does not need. Its `--mark TEXT` (and `mark`) notes where the output of a start
# begins in ROOT/log/NAME.log (a failed start shows only what it printed) and logs TEXT there.
sup() { "$PY" -S -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); import supervisor; sys.exit(supervisor.main())' "${SUP%/*}" "$@"; }
# dead_run NAME: a supervisor killed with -9 takes its Envoy along and removes nothing, and the
# Envoy's /dev/shm region is the machine's. Where NAME's state line still names a base id and no
# supervisor lives, the supervisor's own `stop` removes it (supervisor.py forget_dead_run).
dead_run() {
  value "$R/run/$1.state"
  case " $v " in *" base_id="[0-9]*) [ ! -f "$SUP" ] || supervised "$1" || sup stop "$R" "$1" >/dev/null 2>&1 ;; esac
}
# The log of process $1 in $log, its directory made (a redirection to it comes before the supervisor).
log_of() { log="$R/log/$1.log"; [ -d "$R/log" ] || mkdir -p "$R/run" "$R/log"; }
remember() { echo "$2" > "$R/run/$1.fp"; printf '%s\n' "$3" > "$R/run/$1.cmd"; echo "${4:-0}" > "$R/run/$1.hot"; }
# run/NAME.started: the pid this start began (from the supervisor's state line; empty if none), the
# one wait_listen waits for: a new Envoy epoch that dies hands NAME.pid back to the old epoch,
# which must not pass for the new version.
started() {
  s=; case $2 in *" spawned="[0-9]*) s=${2##* spawned=}; s=${s%% *} ;; esac
  case $s in *[!0-9]*) s= ;; esac
  printf '%s\n' "$s" > "$R/run/$1.started"
}
# answered NAME OUTPUT: what `sup start` or `sup reload` printed: its state line (see started)
# and, asked with --listen, its answer after it in $heard (for NAME: $heard_for).
answered() {
  heard=; heard_for=$1; a=${2%%"$NL"*}; [ "$a" = "$2" ] || heard=${2#*"$NL"}
  started "$1" "$a"
}
# start_proc NAME FINGERPRINT COMMAND HOT [SECONDS PORT...]: as its systemd unit where it has one
# and systemd can take it (by_unit, start_unit below); else under fleet's supervisor ($SUP, run by
# the host's $PY): in a session of its own, with cwd $R and FLEET_PROC=$R/NAME, restarted whenever
# it exits; it returns once run/NAME.pid names the process. HOT=1: with Envoy's hot restart (see
# restart_proc). With SECONDS the supervisor goes on to wait (at most SECONDS) for the process to
# listen on every PORT, and leaves its answer for the wait_listen that follows: one interpreter
# on the host where a switch starts a single process and waits for it, not two.
# 9>&-: neither may inherit the deploy lock (the supervisor closes every inherited fd as well).
start_proc() {
  log_of "$1"; heard=
  # Envoy (HOT=1) stays with fleet's supervisor: its epochs are the supervisor's to hand over.
  if [ "${4:-0}" != 1 ] && by_unit "$1"; then
    sup mark "$R" "$1" "fleet start $2"
    start_unit "$1" "$log"; cat "$R/run/$1.pid" > "$R/run/$1.started" 2>/dev/null
  else
    answered "$1" "$(supervise start "fleet start $2" "$@")"
  fi
  remember "$@"
}
# supervise ACTION TEXT NAME FINGERPRINT COMMAND HOT [SECONDS PORT...]: `sup start` (with the
# grace, and Envoy's hot restart where HOT=1) or `sup reload` of NAME running COMMAND, its output
# to NAME's log ($log), marked TEXT there; with SECONDS, --listen SECONDS PORT... (see start_proc).
supervise() {
  a=$1 m=$2 n=$3 c=$5 h=${6:-0}; shift 6
  [ $# = 0 ] || set -- --listen "$@"
  if [ "$a" = start ]; then set -- --grace "$GRACE" "$@"; [ "$h" != 1 ] || set -- --hot-restart "$@"; fi
  FLEET_SUPERVISOR="$R/$n" sup "$a" "$R" "$n" --mark "$m" "$@" -- sh -c "exec $c" 2>> "$log" < /dev/null 9>&-
}
# restart_proc NAME FINGERPRINT COMMAND HOT [SECONDS PORT...]: the new version in place of the
# running one. HOT=1 (Envoy) under a supervisor started that way: its next epoch starts beside the
# running one, takes over its listening sockets and lets it drain, so no connection is refused.
# Otherwise, or if the supervisor cannot, stop, then start. SECONDS PORT...: as start_proc.
# After a reload that failed once it had marked the log, NAME's log is shown from that mark on:
# the reload's own error is part of the story if the start fails too.
restart_proc() {
  reload_pos=
  if [ "${4:-0}" = 1 ] && supervised "$1"; then
    log_of "$1"; value "$R/run/$1.logpos"; marked=$v
    if out=$(supervise reload "fleet hot restart $2" "$@"); then
      answered "$1" "$out"; remember "$@"; return 0
    fi
    value "$R/run/$1.logpos"; [ "$v" = "$marked" ] || reload_pos=$v
  fi
  stop_procs "$1"; start_proc "$@"; start_code=$?
  # Not past the start's own mark: a log rotated since the reload's starts afresh.
  value "$R/run/$1.logpos"
  [ -z "$reload_pos" ] || [ "$reload_pos" -gt "${v:-0}" ] || echo "$reload_pos" > "$R/run/$1.logpos"
  return "$start_code"
}
# Installs the unit of process $1 (a copy: it must not depend on $R being there early at boot),
# enables and (re)starts it without waiting on systemd's job; returns once run/$1.pid (its
# ExecStartPost=) names the process, or after 10 s (wait_listen then says it exited).
start_unit() {
  u=$(unit "$1"); rm -f "$R/run/$1.pid"
  if cp "$R/units/$1.service" "/etc/systemd/system/$u.tmp" && chmod 644 "/etc/systemd/system/$u.tmp" &&
     mv -f "/etc/systemd/system/$u.tmp" "/etc/systemd/system/$u" && timeout 30 systemctl daemon-reload &&
     timeout 30 systemctl enable --quiet "$u" && timeout 30 systemctl restart --no-block "$u"; then
    waited=0; while ! running "$1" && [ "$waited" -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
  else
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) fleet could not install or start unit $u" >> "$2"
  fi
}
# wait_listen NAME TIMEOUT PORT...: the process the last start of NAME began listens on every PORT
# within TIMEOUT seconds, or a %FAIL% line says why not. The supervisor's `listening` looks every
# 50 ms and reads the kernel's listener tables only when the process's sockets changed: each read
# walks the machine's whole connection hash, and a cold deploy has every host waiting at once.
wait_listen() {
  name=$1; timeout=$2; shift 2
  if [ -n "$heard" ] && [ "$heard_for" = "$name" ]; then  # the start asked already (start_proc's SECONDS)
    why=$heard; heard=; [ "$why" = ok ] && return 0
  else
    why=$(sup listening "$R" "$name" --timeout "$timeout" "$@") && return 0
  fi
  echo "%FAIL% $name ${why:-could not be checked: supervisor.py listening failed}"; return 1
}
log_tail() {
  echo "%LOG% $1"; pos=$(cat "$R/run/$1.logpos" 2>/dev/null)
  tail -c "+$((${pos:-0} + 1))" "$R/log/$1.log" 2>/dev/null | tail -n 20; echo "%END%"
}
# make_dirs DIR...: makes those that are missing, with one mkdir for all of them (a switch makes the
# directories of every file it places, and run/ and log/, before it places any).
make_dirs() {
  for d in "$@"; do [ -d "$d" ] || { mkdir -p "$@"; return; }; done
}
# Puts staging member $1 (its mode set as it was received) at path $2, keeping the file it replaces
# for a rollback. Its directory exists (make_dirs).
place() {
  { [ ! -f "$2" ] || cp -p "$2" "$J/previous/$1"; } && mv -f "$S/$1" "$2"
}
save_previous() {
  if running "$1"; then
    cp "$R/run/$1.cmd" "$J/previous/$1.cmd" && cp "$R/run/$1.fp" "$J/previous/$1.fp" &&
      { [ ! -f "$R/run/$1.hot" ] || cp "$R/run/$1.hot" "$J/previous/$1.hot"; }
  fi
}
restore() { [ ! -f "$J/previous/$1" ] || mv -f "$J/previous/$1" "$2"; }
# Starts the previous version of process $1 again (its files were restored), if there was one.
# The pid the last start of $1 began, ended (SIGTERM, SIGKILL after the grace): a new Envoy epoch
# that did not come up in time must not take the listeners over later, after the rollback.
end_started() {
  value "$R/run/$1.started"; alive "$v" "$1" || return 0
  kill -TERM "$v" 2>/dev/null; w=0
  while ! gone "$v" && [ "$w" -lt $((GRACE * 10)) ]; do sleep 0.1; w=$((w + 1)); done
  gone "$v" || kill -KILL "$v" 2>/dev/null
}
start_previous() {
  [ -f "$J/previous/$1.cmd" ] || return 1
  restart_proc "$1" "$(cat "$J/previous/$1.fp")" "$(cat "$J/previous/$1.cmd")" "$(cat "$J/previous/$1.hot" 2>/dev/null)"
}
# A switch (apply) that ended, or was cut off, while no controller was listening: report it,
# and with `act` (this session holds the lock) roll an interrupted one back.
recover() {
  for d in "$R"/.switch/*; do
    [ -d "$d" ] || continue
    t=${d##*/}
    if [ -f "$d/outcome" ]; then
      echo "%SWITCH_FINISHED% $t $(cat "$d/outcome")"; [ "$1" = act ] && rm -rf "$d"
    elif [ "$1" = act ]; then
      sh "$d/switch.sh" rollback > "$d/recovery" 2>&1; grep '^%REPORT%' "$d/recovery"; rm -rf "$d"
    else
      echo "%UNFINISHED% $t"
    fi
  done
  [ "$1" = act ] && [ -e "$R/.staging" ] && rm -rf "$R/.staging"
  return 0
}
"""))


def prelude(root):
    """What every session and switch starts with: the root, the stop grace, a umask that keeps
    every file fleet creates (staging, logs, lock holder, rendered secrets) private to its owner,
    and the shared functions. Step scripts run inside a session, so they can use all of it."""
    # The prelude's functions are called by the steps that come after it (SC2317 cannot see that).
    return script(Raw("# shellcheck disable=SC2317"), assign("R", root), Raw(f"GRACE={int(STOP_GRACE_SECONDS)}"),
                  assign("UH", systemd.root_digest(root)),
                  Raw("umask 077"), _PRELUDE)


def session(root, holder, lock=True, wait=0, break_lock=False):
    """The one remote command of a run: takes the host's lock (flock, released when the session
    ends however it ends), then runs each step script sent on stdin, ended by a protocol.RUN
    line, in a subshell, answering protocol.DONE with its exit code. Ends at end of input."""
    # The root is fleet's: private to its user even where something else created it first.
    lines = [prelude(root), Raw(f'[ -d "$R" ] || mkdir -p "$R" || {{ echo "{P.FAIL} session cannot create $R"; exit 1; }}'),
             Raw('chmod 700 "$R" 2>/dev/null || :'),
             # Every step runs in the root, which only this user can write: a `python -c` imports from
             # its working directory first, and the login's home (or, run locally, wherever fleet was
             # started) may not be as private.
             Raw(f'cd "$R" || {{ echo "{P.FAIL} session cannot enter $R"; exit 1; }}')]
    if lock:
        if break_lock:
            acquire = Raw(f'echo "{P.BREAKING} $holder"; pid=${{holder##*pid=}}; pid=${{pid%% *}}; '
                          '[ -n "$pid" ] && { kill -TERM "-$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null; }; '
                          'flock -w 10 9')
        elif wait:
            acquire = Raw(f'echo "{P.WAITING} $holder"; flock -w {int(wait)} 9')
        else:
            acquire = Raw("false")
        lines += [
            Raw('exec 9>>"$R/.lock"'),
            Raw("if ! flock -n 9; then"),
            Raw('  holder=$(cat "$R/.lock.holder" 2>/dev/null)'),
            Raw(f'  {acquire} || {{ echo "@@locked $holder"; exit {P.LOCKED_EXIT}; }}'),
            Raw("fi"),
            # since: the controller's clock as it builds the session, before any wait for a login
            # slot or the lock (a `date` on every host, every run, otherwise).
            line(Raw("printf '%s pid=%s since=%s\\n'"), f"holder={holder}", Raw('"$$"'),
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), Raw('> "$R/.lock.holder"')),  # 0600: umask 077
        ]
    lines += [
        Raw(f'echo "{P.MACHINE} $(uname -sm)"'),
        Raw(f'echo "{P.READY}"'),
        Raw("while :; do"),
        Raw("  script=; complete="),
        Raw("  while IFS= read -r line; do"),
        Raw(f'    if [ "$line" = {P.RUN} ]; then complete=1; break; fi'),
        Raw('    script="$script$line'),
        Raw('"'),
        Raw("  done"),
        Raw('  [ -n "$complete" ] || break'),
        Raw(f'  ( eval "$script" ); echo "{P.DONE} $?"'),
        Raw("done"),
    ]
    return script(*lines)


_ADMIN_GET = r"""
import socket, sys, time
path, target, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        s.settimeout(max(deadline - time.monotonic(), 0.001))
except OSError as e:
    sys.exit(f"{path}: {type(e).__name__}: {e.strerror or e}")
head, _, body = data.partition(b"\r\n\r\n")
status = head.split(b"\r\n", 1)[0].decode(errors="replace")
if " 200 " not in status + " ":
    sys.exit(f"admin answered {status!r}")
if b"transfer-encoding: chunked" in head.lower():
    chunks = []
    while (size := int(body.split(b"\r\n", 1)[0].split(b";")[0] or b"0", 16)):
        rest = body.split(b"\r\n", 1)[1]
        chunks.append(rest[:size])
        body = rest[size + 2:]
    body = b"".join(chunks)
sys.stdout.write(body.decode(errors="replace"))
"""


def envoy_admin_get(python, socket_path, http_path, timeout):
    """GET http_path from an Envoy admin that listens on a Unix socket, with the host's Python,
    within `timeout` seconds; prints the body, or exits 1 with one line saying why."""
    return script(line(python, "-S", "-c", _ADMIN_GET, socket_path, http_path, float(timeout)))


def facts(state, recover=True):
    """What is on the host now: files, managed file contents, processes, listeners, addresses.
    First, a switch that a dropped connection left unfinished is rolled back (with the lock held;
    a read-only run only reports it)."""
    lines = [line(Raw("recover"), "act" if recover else "report")]
    lines += [_report_presence(f.path) if f.content is None else _report_content(f.path) for f in state.files]
    lines += [line(Raw("procstate"), p.name) for p in state.processes]
    lines += [Raw("report_listeners"), Raw("report_addresses"), Raw("report_init")]
    # Which services have a release: a deploy that changes nothing then records none (no second step).
    lines.append(Raw(list_releases(manifests=False)))
    return script(*lines)


def _report_presence(path, name=None):
    """`@@file present|absent NAME` for the file at `path` (a value, or a shell word); NAME: path."""
    name = path if name is None else name
    return line(Raw("if [ -e"), path, Raw("]; then echo"), f"{P.FILE} present {name}", Raw("; else echo"),
                f"{P.FILE} absent {name}", Raw("; fi"))


def _report_content(path, name=None):
    """`@@content NAME` and the file's base64, or `@@file absent NAME`."""
    name = path if name is None else name
    return line(Raw("if [ -f"), path, Raw("]; then echo"), f"{P.CONTENT} {name}", Raw("; base64 <"), path,
                Raw(f'; echo "{P.END}"; else echo'), f"{P.FILE} absent {name}", Raw("; fi"))


# Reads the files a step sends after its script from stdin, in one process for all of them (a shell
# pipeline per file was five forks each): exactly SIZE bytes per file whatever happens, so that
# the bytes of later files are never read as script lines; a write that fails (a full disk) reads
# the rest all the same. Each file is created private, gets its MODE once whole, and a file short
# of bytes is reported and removed (wheels are received where they stay: a part of one would pass
# for the whole next time). With NEED_KB, too little room under ROOT reads everything and writes nothing.
_RECEIVE = _with_markers(r"""
import fcntl, os, sys
staging, root, need_kb = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = [(sys.argv[i], int(sys.argv[i + 1]), int(sys.argv[i + 2], 8), sys.argv[i + 3]) for i in range(4, len(sys.argv), 4)]
try:  # sshd's pipe to the session: 1 MB (the most an unprivileged user may set) instead of 64 KB
    fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ (Linux)
except (OSError, AttributeError):
    pass  # not a pipe, or not Linux: the default buffer

def take(size, fd):  # size bytes of stdin into fd (if any): None, or why they were not all written
    why = None
    while size:
        chunk = os.read(0, min(size, 1 << 20))
        if not chunk:
            return "connection ended"
        size -= len(chunk)
        view = memoryview(chunk)
        while view and fd is not None and why is None:
            try:
                view = view[os.write(fd, view):]
            except OSError as e:
                why = e.strerror or str(e)
    return why

try:
    st = os.statvfs(root)
    free_kb = st.f_bavail * st.f_frsize // 1024
except OSError:
    free_kb = None
if need_kb and free_kb is not None and free_kb < need_kb:
    print(f"%FAIL% disk {root} has {free_kb} KB free; this deploy needs {need_kb} KB", flush=True)
    take(sum(size for _, size, _, _ in files), None)
    sys.exit(3)
whole = True
for name, size, mode, label in files:
    try:
        fd, why = os.open(os.path.join(staging, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), None
    except OSError as e:
        fd, why = None, f"cannot be created: {e.strerror}"
    why = take(size, fd) or why
    if fd is not None:
        try:
            os.fchmod(fd, mode)
            os.close(fd)  # where a write is only checked at close (NFS)
        except OSError as e:
            why = why or e.strerror
    if why:
        print(f"%FAIL% transfer {label} did not arrive whole: {why}", flush=True)
        whole = False
        try:
            os.unlink(os.path.join(staging, name))
        except OSError:
            pass
sys.exit(0 if whole else 3)
""")


def receive(python, staging, files, need_kb=0):
    """The script line that receives `files` ([protocol.Sent]) from stdin into the
    staging directory (a shell word), run by the host's `python`; the step exits 3 unless all
    arrived whole. A receiver that failed otherwise (no interpreter, a crash) may have left bytes
    of the files unread, which the session would take for script lines: it ends the session
    (the controller reports the host's connection lost, with this line)."""
    words = [w for sent in files for w in (sent.member, int(sent.size), f"{sent.mode:o}", sent.label)]
    return line(python, "-S", "-c", _RECEIVE, staging, Raw('"$R"'), int(need_kb), *words,
                Raw(f'|| {{ r=$?; [ "$r" = 3 ] || {{ echo "{P.FAIL} transfer the receiver failed (exit $r): '
                    'the session ends, its input is out of step"; kill -KILL $$; }; exit 3; }'))


@dataclass(frozen=True)
class Switch:
    """An apply step: the script the session runs, and the payload it reads after it (the changed
    files, then the switch script that the host runs detached from the connection)."""

    script: str
    payload: list  # [protocol.Sent]: what the script's receiver takes, in order


@dataclass(frozen=True)
class _Text:
    content: bytes
    source: None = None


def apply(plan, txid):
    """Receives the changed files into staging, then switches: a script run detached from the
    connection, with its output journalled under ROOT/.switch/TXID, renames the files into place,
    restarts what changed and waits for it to listen; a process whose new version does not come up
    gets its previous files and command back. The switch holds the deploy lock (it inherits the
    session's lock descriptor) until it ends, so a dropped connection or a killed controller never
    leaves it half done; the next run reports how it ended, or rolls back one that was cut off
    (a host reboot): see recover in the prelude."""
    txid = str(txid)
    switch_script = _switch(plan, txid).encode()
    files = [P.Sent.measured(member, spec.mode, spec.path, spec) for member, spec in plan.payload]
    files.append(P.Sent.measured("switch.sh", 0o600, "switch script", _Text(switch_script)))
    need_kb = sum(sent.size for sent in files) // 1024 + 1024  # room for the files, plus 1 MB
    steps = [
        # A controller that is gone must not stop this step halfway: writes to it just fail.
        Raw("trap '' PIPE"),
        assign("S", Raw('"$R"/.staging/'), txid),
        assign("J", Raw('"$R"/.switch/'), txid),
        # Staging never outlives the step; the switch directory only once the switch has started.
        Raw("trap 'rm -rf \"$S\"; [ -f \"$J/switch.sh\" ] || rm -rf \"$J\"' EXIT"),
        # Until the receiver has read the files, the step must not end: their bytes would be read
        # as the session's next lines. If the directories cannot be made, it drains them.
        Raw('[ ! -e "$R/.staging" ] || rm -rf "$R/.staging"; mkdir -p "$S" "$J/previous"; made=$?'),
        receive(plan.state.host.python, Raw('"$S"'), files, need_kb),
        Raw('[ "$made" = 0 ] || exit 3'),
        Raw('mv "$S/switch.sh" "$J/switch.sh"'),
        # Its own session, output to the journal only: nothing it does depends on the connection.
        Raw('setsid sh "$J/switch.sh" > "$J/journal" 2>&1 < /dev/null &'),
        Raw('wait $!; code=$?'),
        # The journal stays until the controller has read it (forget_switch): if it never does,
        # the next run reports how this switch ended.
        Raw('cat "$J/journal"'),
        Raw('exit "$code"'),
    ]
    return Switch(script=script(*steps), payload=files)


def forget_switch(txid):
    """The controller has read the switch's outcome: its journal can go."""
    return script(line(Raw("rm -rf"), word(Raw('"$R"/.switch/'), str(txid))))


def _switch(plan, txid):
    members = {spec.path: member for member, spec in plan.payload}
    placed = [(member, spec) for member, spec in plan.payload]
    restore_all = [line(Raw("restore"), member, spec.path) for member, spec in placed] or [Raw(":")]
    body = []
    # Where the files go, and run/ and log/ for the processes started: made in one go.
    needed = sorted({posixpath.dirname(spec.path) for _, spec in placed} |
                    ({posixpath.join(plan.state.host.root, d) for d in ("run", "log")} if plan.restarts else set()))
    if needed:
        body.append(line(Raw("make_dirs"), *needed))
    for task, sent in plan.files_by_task():
        for member, spec in sent:
            body.append(line(Raw("place"), member, spec.path, Raw("|| {"),
                             Raw("echo"), f"{P.FAIL} {task} cannot write {spec.path}", Raw("; restore_all; return 3; }")))
        body.append(line(Raw("echo"), f"{P.STEP} {task} {P.Status.CHANGED}"))
    # A single restart is followed at once by its wait: the start itself waits (start_proc's
    # SECONDS PORT...). Several start all first, then are waited for, so that they come up together.
    fused = len(plan.restarts) == 1
    for proc in plan.restarts:
        listen = [proc.start_timeout, *proc.ports] if fused else []
        body.append(line(Raw("save_previous"), proc.name, Raw("; restart_proc"), proc.name, proc.fingerprint,
                         proc.command, int(proc.hot_restart), *listen))
    for proc in plan.restarts:
        wait = line(Raw("wait_listen"), proc.name, proc.start_timeout, *proc.ports)
        restores = [line(Raw("restore"), members[p], p) for p in proc.files if p in members] or [Raw(":")]
        body += [
            Raw(f"if {wait}; then"),
            line(Raw("  echo"), f"{P.STEP} {proc.task} {P.Status.CHANGED}"),
            Raw("else"),
            line(Raw("  failed=1; log_tail"), proc.name),
            *([line(Raw("  end_started"), proc.name)] if proc.hot_restart else []),
            *[Raw(f"  {r}") for r in restores],
            Raw(f"  if start_previous {line(proc.name)}; then"),
            Raw(f"    if {wait} >/dev/null; then echo {line(f'{P.ROLLED_BACK} {proc.name}')}; "
                f"else echo {line(f'{P.FAIL} {proc.name} the previous version did not come back either')}; fi"),
            # Nothing ran before: a new process that does not come up must not linger either.
            Raw(f"  else stop_procs {line(proc.name)}"),
            Raw("  fi"),
            Raw("fi"),
        ]
    body += [line(Raw("procstate"), p.name) for p in plan.state.processes]
    body += [Raw("report_listeners")]
    rollback = list(restore_all)
    for proc in plan.restarts:
        wait = line(Raw("wait_listen"), proc.name, proc.start_timeout, *proc.ports)
        rollback.append(Raw(f"if start_previous {line(proc.name)}; then {wait} >/dev/null; fi"))
    rollback.append(line(Raw("echo"), f"{P.RECOVERED} {txid}"))
    return script(
        prelude(plan.state.host.root),
        # What start_proc starts processes with: the supervisor (sent before any process starts).
        assign("PY", plan.state.host.python),
        assign("SUP", plan.state.supervisor or ""),
        assign("J", Raw('"$R"/.switch/'), txid),
        assign("S", Raw('"$R"/.staging/'), txid),
        Raw("restore_all() {"), *[Raw(f"  {r}") for r in restore_all], Raw("}"),
        Raw("switch() {"), Raw("  failed=0"), *[Raw(f"  {b}") for b in body], Raw("  return \"$failed\""), Raw("}"),
        Raw("rollback() {"), *[Raw(f"  {r}") for r in rollback], Raw("}"),
        Raw('"${1:-switch}"; code=$?'),
        Raw('echo "$code" > "$J/outcome"'),
        Raw(f'echo "{P.OUTCOME} $code"'),
        Raw("exit $code"),
    )


def stop(process_groups, supervisor=None):
    """Stops the named processes: each group at once (SIGTERM to all, SIGKILL after the grace),
    the groups one after another (Envoy before the backends it fronts). supervisor: (the host's
    python, the supervisor's path there), to remove what the Envoy of a supervisor killed with -9
    left in /dev/shm (dead_run)."""
    lines = [assign("PY", supervisor[0]), assign("SUP", supervisor[1])] if supervisor else []
    for names in process_groups:
        for name in names:
            # A supervisor waiting to restart a crashed process counts: stopping it ends that.
            lines.append(line(Raw("if running"), name, Raw("|| supervised"), name, Raw("; then echo"),
                              f"{P.STOPPED} {name}", Raw("; else echo"),
                              f"{P.NOT_RUNNING} {name}", Raw("; fi")))
        if names:
            lines.append(line(Raw("stop_procs"), *names))
            lines += [line(Raw("dead_run"), name) for name in names]
    lines.append(Raw("report_listeners"))
    return script(*lines)



# -- releases (fleet/releases.py) --------------------------------------------------------------

def _release_dir(service, release_id=None):
    """The shell word of ROOT/releases/SERVICE[/ID]."""
    if release_id is None:
        return word(Raw('"$R"/releases/'), service)
    return word(Raw('"$R"/releases/'), service, Raw("/"), release_id)


def record_release(service, release_id, manifest_json, copies, only_if_none=False):
    """Writes release `release_id` of `service` (its manifest, and copies of its rendered files:
    copies is [(path on the host, copy name)]) and makes it current; with only_if_none, only
    where the service has no current release yet (a deploy that changed nothing). The release
    directory appears whole (written beside it, then renamed)."""
    lines = [assign("D", _release_dir(service)), assign("N", _release_dir(service, release_id)),
             Raw("record() {"),
             Raw('  { [ ! -e "$N.tmp" ] || rm -rf "$N.tmp"; } && mkdir -p "$N.tmp/files" || return 1')]
    lines += [line(Raw("  cp --"), path, word(Raw('"$N.tmp"/'), copy), Raw("|| return 1")) for path, copy in copies]
    lines += [line(Raw("  printf '%s\\n'"), manifest_json, Raw('> "$N.tmp/manifest.json" || return 1')),
              # Private already: the session's umask is 077.
              Raw('  { [ ! -e "$N" ] || rm -rf "$N"; } && mv "$N.tmp" "$N" || return 1'),
              line(Raw("  printf '%s\\n'"), release_id, Raw('> "$D/current.tmp" && mv -f "$D/current.tmp" "$D/current"'),
                   Raw("|| return 1")),
              line(Raw("  echo"), f"{P.RECORDED} {service} {release_id}"),
              Raw("}")]
    failed = line(Raw("echo"), f"{P.FAIL} release {service} {release_id} could not be recorded", Raw(";"),
                  Raw('rm -rf "$N.tmp"; exit 1'))
    lines.append(Raw(f'[ -s "$D/current" ] || record || {{ {failed}; }}') if only_if_none else
                 Raw(f"record || {{ {failed}; }}"))
    return script(*lines)


def list_releases(service=None, manifests=True, artifacts=False):
    """The current release of `service` (or of every service: `@@current SERVICE ID`); with
    manifests, every release (`@@release SERVICE ID` and its manifest's base64); with artifacts,
    every ROOT/artifacts/ directory and whether a file under ROOT/run, ROOT/services or ROOT/envoy
    (a running process's command, a rendered config) names it: in use by something that may
    have no release, such as a service deployed by an older fleet."""
    where = _release_dir(service) if service else Raw('"$R"/releases/*')
    lines = []
    if manifests:
        lines += [
            Raw(f"for d in {where}/*/; do"),
            Raw('  d=${d%/}; [ -f "$d/manifest.json" ] || continue'),
            # ID.tmp: a release being written when its step was cut off.
            Raw('  id=${d##*/}; s=${d%/*}; s=${s##*/}; case $id in *.tmp) continue ;; esac'),
            Raw(f'  echo "{P.RELEASE} $s $id"; base64 < "$d/manifest.json"; echo "{P.END}"'),
            Raw("done"),
        ]
    lines.append(Raw(f'current() {{ [ -f "$1" ] || return 0; s=${{1%/current}}; s=${{s##*/}}; value "$1"; '
                     f'echo "{P.CURRENT} $s $v"; }}'))
    lines.append(Raw(f"current {where}/current") if service else Raw(f'for c in {where}/current; do current "$c"; done'))
    if artifacts:
        lines += [
            Raw('for a in "$R"/artifacts/*/; do'),
            Raw('  [ -d "$a" ] || continue; a=${a%/}; a=${a##*/}'),
            Raw('  if grep -rqsF -e "/artifacts/$a/" "$R/run" "$R/services" "$R/envoy"; then use=inuse; else use=unused; fi'),
            Raw(f'  echo "{P.ARTIFACT} $a $use"'),
            Raw("done"),
        ]
    return script(*lines)


def read_release(service, release_id, copy_names, artifact_paths):
    """The stored copies of a release (`@@content COPY`) and whether each of its artifacts is
    still on the host (`@@file present|absent PATH`): what a rollback to it needs."""
    directory = _release_dir(service, release_id)
    lines = [_report_content(word(directory, Raw("/"), name), name) for name in copy_names]
    lines += [_report_presence(path) for path in artifact_paths]
    return script(*lines) if lines else script(Raw(":"))


def prune(releases, artifact_dirs):
    """Removes release directories ((service, id) pairs) and ROOT/artifacts/ directories."""
    lines = [line(Raw("rm -rf"), _release_dir(service, release_id), Raw("&& echo"),
                  f"{P.PRUNED} releases/{service}/{release_id}") for service, release_id in releases]
    lines += [line(Raw("rm -rf"), word(Raw('"$R"/artifacts/'), name), Raw("&& echo"), f"{P.PRUNED} artifacts/{name}")
              for name in artifact_dirs]
    return script(*lines) if lines else script(Raw(":"))


# -- logs (`fleet logs`) ------------------------------------------------------------------------

# Bytes of one log sent per step: a chatty process cannot make a read unbounded.
LOG_CHUNK_BYTES = 256 * 1024
# Older (rotated) files a tail reads back through: the supervisor keeps 3 by default.
LOG_ROTATED_MAX = 9

# `chunk FILE INODE FROM`: `@@logchunk $name INODE NEXT`, then the base64 of at most
# LOG_CHUNK_BYTES of FILE from byte FROM (from 0 if the file is shorter: it was truncated).
_CHUNK = Raw(f"""chunk() {{
  size=$(stat -c %s "$1" 2>/dev/null || echo 0); from=$3
  [ "$size" -ge "$from" ] || from=0
  n=$((size - from)); [ "$n" -le {LOG_CHUNK_BYTES} ] || n={LOG_CHUNK_BYTES}
  echo "{P.LOG_CHUNK} $name $2 $((from + n))"
  tail -c +$((from + 1)) "$1" | head -c "$n" | base64; echo "{P.END}"
}}""")


def _log_file(name):
    return word(Raw('"$R"/log/'), name, Raw(".log"))


def log_tail(names, count):
    """The last `count` lines of each process's log (ROOT/log/NAME.log, reaching back into NAME.log.1
    etc. when the current file has fewer), at most LOG_CHUNK_BYTES per file: `@@logchunk NAME INODE
    SIZE` (where a follow goes on from) and the lines' base64."""
    lines = []
    for name in names:
        lines += [
            assign("name", name), assign("f", _log_file(name)),
            Raw('ino=$(stat -c %i "$f" 2>/dev/null || echo -); size=$(stat -c %s "$f" 2>/dev/null || echo 0)'),
            Raw(f'echo "{P.LOG_CHUNK} $name $ino $size"'),
            Raw("{"),
            Raw(f'  i=1; while [ -f "$f.$i" ] && [ "$i" -le {LOG_ROTATED_MAX} ]; do i=$((i + 1)); done'),
            Raw(f'  while [ "$i" -gt 1 ]; do i=$((i - 1)); tail -c {LOG_CHUNK_BYTES} "$f.$i"; done'),
            Raw(f'  from=$((size > {LOG_CHUNK_BYTES} ? size - {LOG_CHUNK_BYTES} : 0))'),
            Raw('  [ "$ino" = - ] || tail -c +$((from + 1)) "$f" | head -c $((size - from))'),
            line(Raw("} 2>/dev/null | tail -n"), int(count), Raw(f'| base64; echo "{P.END}"')),
        ]
    return script(*lines)


def log_follow(positions):
    """What each log gained since the last read: positions is [(name, inode or "-", offset)] as the
    last `@@logchunk` lines said. A log rotated meanwhile (a new inode) gives the rest of the old
    file (now NAME.log.1) first, then the new file from its start."""
    lines = [_CHUNK]
    for name, inode, offset in positions:
        lines += [
            assign("name", name), assign("f", _log_file(name)),
            assign("ino", str(inode)), assign("off", str(int(offset))),
            Raw('now=$(stat -c %i "$f" 2>/dev/null || echo -)'),
            Raw('if [ "$now" != "$ino" ]; then'),
            Raw('  if [ "$ino" != - ] && [ "$(stat -c %i "$f.1" 2>/dev/null)" = "$ino" ]; then chunk "$f.1" "$ino" "$off"; fi'),
            Raw("  off=0"),
            Raw("fi"),
            Raw('[ "$now" = - ] || chunk "$f" "$now" "$off"'),
        ]
    return script(*lines)


# Ends what the controller sends ahead of the session when it gives sudo a password: the session
# skips lines up to it, whether or not sudo read the password (it does not when it need not).
_BECOME_END = P.BECOME_END


def login(session_script, name, python, root, user, become_user=None, become_password=False):
    """The SSH command of a session: a preflight that reports, in one line, everything the host
    lacks before anything changes; then the session, through `sudo -u become_user` if given.
    With `become_password`, the controller sends the password as the first line of input: it is
    read into a shell variable and piped to sudo -S, never part of a command line or a file."""
    lacks = [
        line(Raw("if ! command -v"), python, Raw(">/dev/null 2>&1; then"), word(Raw('lacks="$lacks, "'), python)),
        # -V answers before the interpreter starts: 1 ms, where running code took 8 (every run, every host).
        line(Raw("else v=$("), python, Raw("-V 2>&1)")),
        Raw('  case $v in "Python 3.9"*|"Python 3."[1-9][0-9]*|"Python "[4-9]*) ;;'),
        Raw('    *) lacks="$lacks, python 3.9 or newer ($v)" ;; esac'),
        Raw("fi"),
        Raw('for t in flock setsid; do command -v "$t" >/dev/null 2>&1 || lacks="$lacks, $t"; done'),
        Raw('command -v netstat >/dev/null 2>&1 || command -v ss >/dev/null 2>&1 || lacks="$lacks, netstat or ss"'),
        line(Raw('[ -z "$lacks" ] || { echo "$(id -un) on"'), name,
             Raw('"lacks ${lacks#, } (preflight; nothing was changed)"; exit 1; }')),
    ]
    fix = "set root: to a writable directory" if become_user else \
        "set root: to a directory $(id -un) can write, or become: true"
    writable = line(Raw("{ { [ -d"), root, Raw("] || mkdir -p"), root, Raw("2>/dev/null; } && [ -w"), root,
                    Raw("]; } || { echo root"), root, Raw(f'"is not writable by $(id -un): {fix}"; exit 1; }}'))
    # umask first: the preflight may be what creates the root, which must be private from the start.
    inner = script(Raw("umask 077"), Raw("lacks="), *lacks, writable, session_script)
    if not become_user:
        return inner
    sudo_user = ["-u", become_user, "--", "sh", "-c"]
    steps = [Raw('command -v sudo >/dev/null 2>&1 || { echo "no sudo on this host (become: true needs it)"; exit 1; }')]
    if become_password:
        skip = script(Raw(f'while IFS= read -r l; do [ "$l" = {_BECOME_END} ] && break; done'), inner)
        steps += [
            Raw("IFS= read -r p"),
            line(Raw("printf '%s\\n' \"$p\" | sudo -S -p '' -u"), become_user,
                 Raw("-- true >/dev/null 2>&1 || { echo"), f"sudo on {name} refused the become password",
                 Raw("; exit 1; }")),
            line(Raw("{ printf '%s\\n' \"$p\""), _BECOME_END, Raw("; unset p; exec cat; } | sudo -S -p ''"),
                 *sudo_user, str(skip)),  # str: a script is Raw, but here it is one quoted word
        ]
    else:
        steps += [
            line(Raw("if ! out=$(sudo -n -u"), become_user, Raw('-- true 2>&1); then case "$out" in *password*) echo'),
                 f"sudo on {name} wants a password: set up NOPASSWD for {user} or pass --ask-become-pass",
                 Raw(';; *) echo'), f"sudo on {name} fails:", Raw('"$out";; esac; exit 1; fi')),
            line(Raw("exec sudo -n"), *sudo_user, str(inner)),  # str: one quoted word
        ]
    return script(*steps)
