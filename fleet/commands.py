"""Shell scripts run on hosts, built as plain strings: one script per host per phase, because
every remote command costs a login shell (~150 ms on our hosts). Pure; nothing here runs."""

import posixpath
import shlex

q = shlex.quote

# Functions shared by every script. A process is ours only if its environment carries
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
    while alive "$pid" "$1" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    alive "$pid" "$1" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$R/run/$1.pid" "$R/run/$1.fp"
}
start_proc() {
  mkdir -p "$R/run" "$R/log"
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) fleet start $2" >> "$R/log/$1.log"
  ( cd "$R" && FLEET_PROC="$R/$1" exec setsid sh -c 'exec '"$3" >> "$R/log/$1.log" 2>&1 < /dev/null ) &
  echo $! > "$R/run/$1.pid"; echo "$2" > "$R/run/$1.fp"; printf '%s\n' "$3" > "$R/run/$1.cmd"
}
listening() { listeners | grep -Eq "[:.]$1 +[^ ]+ +LISTEN +$2/|[:.]$1 .*pid=$2,"; }
wait_listen() {
  name=$1; timeout=$2; shift 2; pid=$(cat "$R/run/$name.pid"); i=0
  while :; do
    # kill -0, not alive: until setsid execs, the fresh pid's environment lacks FLEET_PROC.
    if ! kill -0 "$pid" 2>/dev/null; then echo "@@fail $name exited before listening"; return 1; fi
    ok=1; for port in "$@"; do listening "$port" "$pid" || { ok=0; break; }; done
    [ $ok = 1 ] && return 0
    i=$((i+1)); if [ $i -ge $((timeout*10)) ]; then echo "@@fail $name not listening on port $port after ${timeout}s"; return 1; fi
    sleep 0.1
  done
}
log_tail() { echo "@@log $1"; tail -n 20 "$R/log/$1.log" 2>/dev/null; echo "@@end"; }
"""


def _header(root):
    return f"R={q(root)}\n{_PRELUDE}"


def facts(state):
    """What is on the host now: files, managed file contents, processes, listeners."""
    lines = [_header(state.host.root)]
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
    """Moves the sent files into place and (re)starts what changed, then reports like facts().

    Files arrive as a tar stream on stdin into a staging directory under the root and are put in
    place with rename, so an interrupted deploy never leaves a half-written file behind."""
    root = plan.state.host.root
    staging = posixpath.join(root, ".staging", txid)
    lines = [_header(root), "failed=0"]
    if plan.payload:
        lines += [f"S={q(staging)}", 'mkdir -p "$S" && trap \'rm -rf "$S"\' EXIT',
                  'tar -xf - -C "$S" || { echo "@@fail transfer files did not arrive whole"; exit 3; }']
    for task, members in plan.files_by_task():
        for member, spec in members:
            lines.append(f"mkdir -p {q(posixpath.dirname(spec.path))} && chmod {spec.mode:o} \"$S/{member}\" "
                         f"&& mv -f \"$S/{member}\" {q(spec.path)} || {{ echo \"@@fail {task} cannot write "
                         f"{spec.path}\"; exit 3; }}")
        lines.append(f'echo "@@step {task} changed"')
    for proc in plan.restarts:
        lines.append(f"stop_proc {q(proc.name)}; start_proc {q(proc.name)} {q(proc.fingerprint)} {q(proc.command)}")
    for proc in plan.restarts:
        ports = " ".join(str(p) for p in proc.ports)
        lines.append(f'if wait_listen {q(proc.name)} {proc.start_timeout} {ports}; then echo "@@step {proc.task} '
                     f'changed"; else failed=1; log_tail {q(proc.name)}; fi')
    lines += [f"procstate {q(p.name)}" for p in plan.state.processes]
    lines += ["report_listeners", 'exit $failed']
    return "\n".join(lines) + "\n"


def stop(root, process_names):
    lines = [_header(root)]
    for name in process_names:
        lines.append(f'if alive "$(cat "$R/run/{name}.pid" 2>/dev/null)" {q(name)}; then stop_proc {q(name)}; '
                     f'echo "@@stopped {name}"; else stop_proc {q(name)}; echo "@@notrunning {name}"; fi')
    lines.append("report_listeners")
    return "\n".join(lines) + "\n"
