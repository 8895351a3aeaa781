"""Shell scripts run on hosts, built as plain strings. Pure; nothing here runs.

Every remote command costs a login shell (~150 ms on our hosts), so fleet starts exactly one per
host per run: session() below, a small shell loop that holds the host's deploy lock and runs the
step scripts (facts, apply, stop) that the controller sends over stdin, one after the other."""

import shlex

q = shlex.quote

RUN_MARKER = "@@run"
LOCKED_EXIT = 75

# Functions shared by every step. A process is ours only if its environment carries
# FLEET_PROC=<root>/<name>: a recycled pid is never mistaken for a service.
_PRELUDE = r"""
alive() { [ -n "$1" ] && [ "$1" != - ] && kill -0 "$1" 2>/dev/null && tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null | grep -qxF "FLEET_PROC=$R/$2"; }
procstate() {
  pid=$(cat "$R/run/$1.pid" 2>/dev/null); fp=$(cat "$R/run/$1.fp" 2>/dev/null)
  if alive "$pid" "$1"; then a=1; else a=0; fi
  echo "@@proc $1 ${pid:--} $a ${fp:--}"
}
listeners() { if command -v netstat >/dev/null 2>&1; then netstat -tnlp 2>/dev/null; else ss -tnlp 2>/dev/null; fi; }
report_listeners() { echo "@@netstat"; listeners; echo "@@end"; }
stop_proc() {
  pid=$(cat "$R/run/$1.pid" 2>/dev/null)
  if alive "$pid" "$1"; then
    kill -TERM "$pid" 2>/dev/null; i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$R/run/$1.pid" "$R/run/$1.fp"
}
start_proc() {
  mkdir -p "$R/run" "$R/log"
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) fleet start $2" >> "$R/log/$1.log"
  # 9>&-: the service must not inherit the deploy lock.
  ( cd "$R" && FLEET_PROC="$R/$1" exec setsid sh -c 'exec '"$3" >> "$R/log/$1.log" 2>&1 < /dev/null 9>&- ) &
  echo $! > "$R/run/$1.pid"; echo "$2" > "$R/run/$1.fp"; printf '%s\n' "$3" > "$R/run/$1.cmd"
}
# Is port $1 (in hex) listened on by pid $2? Read from /proc with shell builtins: netstat -p walks
# every process of the machine, and each fork counts when a host starts many services at once.
listening() {
  inodes=
  for table in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$table" ] || continue
    while read -r _ local _ st _ _ _ _ _ inode _; do
      [ "$st" = 0A ] && [ "${local##*:}" = "$1" ] && inodes="$inodes $inode"
    done < "$table"
  done
  [ -n "$inodes" ] || return 1
  fds=$(ls -l "/proc/$2/fd" 2>/dev/null)
  for inode in $inodes; do case "$fds" in *"socket:[$inode]"*) return 0 ;; esac; done
  return 1
}
wait_listen() {
  name=$1; timeout=$2; shift 2; pid=$(cat "$R/run/$name.pid"); waited=0; step=1
  hexports=; for port in "$@"; do hexports="$hexports $(printf '%04X' "$port")"; done
  while :; do
    # kill -0, not alive: until setsid execs, the fresh pid's environment lacks FLEET_PROC.
    if ! kill -0 "$pid" 2>/dev/null; then echo "@@fail $name exited before listening"; return 1; fi
    ok=1; for hex in $hexports; do listening "$hex" "$pid" || { ok=0; break; }; done
    [ $ok = 1 ] && return 0
    if [ $waited -ge $((timeout*10)) ]; then echo "@@fail $name not listening on port(s) $* after ${timeout}s"; return 1; fi
    # Back off from 0.1 s to 0.5 s between looks: fewer wake-ups while many services start.
    sleep "0.$step"; waited=$((waited+step)); [ $step -lt 5 ] && step=$((step+1))
  done
}
log_tail() { echo "@@log $1"; tail -n 20 "$R/log/$1.log" 2>/dev/null; echo "@@end"; }
receive() { dd bs=65536 iflag=fullblock,count_bytes count="$2" of="$S/$1" status=none && [ "$(wc -c < "$S/$1")" -eq "$2" ]; }
place() {
  mkdir -p "$(dirname "$2")" && chmod "$3" "$S/$1" && { [ ! -f "$2" ] || cp -p "$2" "$B/$1"; } && mv -f "$S/$1" "$2"
}
save_previous() { if alive "$(cat "$R/run/$1.pid" 2>/dev/null)" "$1"; then cp "$R/run/$1.cmd" "$B/$1.cmd" && cp "$R/run/$1.fp" "$B/$1.fp"; fi; }
restore() { [ ! -f "$B/$1" ] || mv -f "$B/$1" "$2"; }
"""


def session(root, holder, lock=True, wait=0, break_lock=False):
    """The one remote command of a run: takes the host's lock (flock, released when the session
    ends however it ends), then runs each step script sent on stdin, ended by a RUN_MARKER line,
    in a subshell, answering `@@done EXIT_CODE`. Ends at end of input."""
    lines = [f"R={q(root)}", _PRELUDE,
             'mkdir -p "$R" || { echo "@@fail session cannot create $R"; exit 1; }']
    if lock:
        if break_lock:
            acquire = ('echo "@@breaking $holder"; pid=${holder##*pid=}; pid=${pid%% *}; '
                       '[ -n "$pid" ] && { kill -TERM "-$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null; }; '
                       'flock -w 10 9')
        elif wait:
            acquire = f'echo "@@waiting $holder"; flock -w {int(wait)} 9'
        else:
            acquire = "false"
        lines += [
            'exec 9>>"$R/.lock"',
            "if ! flock -n 9; then",
            '  holder=$(cat "$R/.lock.holder" 2>/dev/null)',
            f'  {acquire} || {{ echo "@@locked $holder"; exit {LOCKED_EXIT}; }}',
            "fi",
            f'echo "holder={holder} pid=$$ since=$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$R/.lock.holder"',
        ]
    lines += [
        'echo "@@ready"',
        "while :; do",
        "  script=; complete=",
        "  while IFS= read -r line; do",
        f'    if [ "$line" = {RUN_MARKER} ]; then complete=1; break; fi',
        '    script="$script$line',
        '"',
        "  done",
        '  [ -n "$complete" ] || break',
        '  ( eval "$script" ); echo "@@done $?"',
        "done",
    ]
    return "\n".join(lines) + "\n"


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
    return f"{q(python)} -c {q(_ADMIN_GET)} {q(socket_path)} {q(http_path)} {float(timeout)}\n"


def facts(state):
    """What is on the host now: files, managed file contents, processes, listeners."""
    lines = []
    for f in state.files:
        if f.content is None:
            lines.append(f'if [ -e {q(f.path)} ]; then echo "@@file present {f.path}"; '
                         f'else echo "@@file absent {f.path}"; fi')
        else:
            lines.append(f'if [ -f {q(f.path)} ]; then echo "@@content {f.path}"; base64 < {q(f.path)}; '
                         f'echo "@@end"; else echo "@@file absent {f.path}"; fi')
    lines += [f"procstate {q(p.name)}" for p in state.processes]
    lines.append("report_listeners")
    return "\n".join(lines) + "\n"


def apply(plan, txid):
    """Receives the changed files, puts them in place and (re)starts what changed, then reports
    like facts(). Files arrive on stdin right after the script, each exactly its size, into a
    staging directory under the root, and are renamed into place only once all have arrived: an
    interrupted deploy never leaves a half-written file. A process whose new version does not
    come up gets its previous files and command back."""
    lines = ["failed=0", f'S="$R/.staging/{txid}"; B="$R/.rollback/{txid}"',
             # Leftovers of interrupted deploys: nobody else uses them, we hold the lock.
             'rm -rf "$R/.staging" "$R/.rollback"; mkdir -p "$S" "$B" && trap \'rm -rf "$S" "$B"\' EXIT']
    for member, spec in plan.payload:
        lines.append(f'receive {member} {plan.size(spec)} || {{ echo "@@fail transfer {spec.path} did not arrive '
                     f'whole"; exit 3; }}')
    members = {spec.path: member for member, spec in plan.payload}
    for task, sent in plan.files_by_task():
        for member, spec in sent:
            lines.append(f'place {member} {q(spec.path)} {spec.mode:o} || {{ echo "@@fail {task} cannot write '
                         f'{spec.path}"; exit 3; }}')
        lines.append(f'echo "@@step {task} changed"')
    for proc in plan.restarts:
        lines.append(f"save_previous {q(proc.name)}; stop_proc {q(proc.name)}; "
                     f"start_proc {q(proc.name)} {q(proc.fingerprint)} {q(proc.command)}")
    for proc in plan.restarts:
        wait = f"wait_listen {q(proc.name)} {proc.start_timeout} {' '.join(str(p) for p in proc.ports)}"
        restores = "; ".join(f"restore {members[p]} {q(p)}" for p in proc.files if p in members) or ":"
        lines += [
            f'if {wait}; then echo "@@step {proc.task} changed"; else',
            f"  failed=1; log_tail {q(proc.name)}",
            f'  if [ -f "$B/{proc.name}.cmd" ]; then',
            f"    stop_proc {q(proc.name)}; {restores}",
            f'    start_proc {q(proc.name)} "$(cat "$B/{proc.name}.fp")" "$(cat "$B/{proc.name}.cmd")"',
            f'    if {wait} >/dev/null; then echo "@@rolledback {proc.name}"; '
            f'else echo "@@fail {proc.name} the previous version did not come back either"; fi',
            "  fi",
            "fi",
        ]
    lines += [f"procstate {q(p.name)}" for p in plan.state.processes]
    lines += ["report_listeners", "exit $failed"]
    return "\n".join(lines) + "\n"


def stop(process_names):
    lines = []
    for name in process_names:
        lines.append(f'if alive "$(cat "$R/run/{name}.pid" 2>/dev/null)" {q(name)}; then stop_proc {q(name)}; '
                     f'echo "@@stopped {name}"; else stop_proc {q(name)}; echo "@@notrunning {name}"; fi')
    lines.append("report_listeners")
    return "\n".join(lines) + "\n"
