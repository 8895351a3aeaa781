"""Prints bench/results.json (or the file given) as the markdown tables of docs/performance.md."""

import json
import os
import sys

PHASES = ("cold", "unchanged", "changed")
TOOLS = {"fleet": "fleet", "pyinfra": "pyinfra", "ansible": "Ansible"}


def floor_of(floor, phase):
    """What no tool can beat: SSH to every host and one command there, plus what the phase must
    do (cold: push the bytes and start the services, on different hosts at once; changed: restart
    the services)."""
    base = floor["ssh_handshake_all_s"] + floor["one_command_all_s"]
    start = floor.get("start_services_loopback_s", floor["start_services_s"])
    return base + {"cold": max(floor["push_bytes_s"], start), "unchanged": 0, "changed": start}[phase]


def seconds(row, tool, phase):
    result = row.get(tool, {}).get(phase)
    return result["seconds"] if result and result.get("seconds") is not None else None


def cell(row, tool, phase, usual_reps):
    """The median, and how many runs it is of where that is not the sitting's usual number."""
    value = seconds(row, tool, phase)
    if value is None:
        return "not run" if tool in row.get("not_run", ()) or tool not in row else "failed"
    reps = row.get("reps", {}).get(tool)
    runs = row[tool][phase]["runs"]
    if reps and len(runs) != reps:
        note = f" ({len(runs)} of {reps})"
    elif len(runs) == 1:
        note = " (1 run)"
    else:
        note = f" ({len(runs)} runs)" if len(runs) != usual_reps else ""
    return f"{value:.2f} s{note}"


def ratio(row, tool, other, phase):
    mine, theirs = seconds(row, tool, phase), seconds(row, other, phase)
    return f"{mine / theirs:.2f}" if mine is not None and theirs else "-"


def tools_of(rows):
    return [t for t in TOOLS if any(t in row or t in row.get("not_run", ()) for row in rows.values())]


def table(rows, usual_reps):
    tools = tools_of(rows)
    lines = ["| N | run | " + " | ".join(TOOLS[t] for t in tools) + " | fleet / pyinfra | fleet / Ansible | "
             "fleet CPU | fleet peak memory |",
             "|---|---|" + "---|" * len(tools) + "---|---|---|---|"]
    for n, row in rows.items():
        for phase in PHASES:
            fleet = row.get("fleet", {}).get(phase, {})
            cpu, peak = fleet.get("cpu_s"), fleet.get("peak_mb")
            lines.append(f"| {n} | {phase} | " + " | ".join(cell(row, t, phase, usual_reps) for t in tools)
                         + f" | {ratio(row, 'fleet', 'pyinfra', phase)} | {ratio(row, 'fleet', 'ansible', phase)}"
                         f" | {f'{cpu:.2f} s' if cpu is not None else '-'}"
                         f" | {f'{peak:.0f} MB' if peak is not None else '-'} |")
    return "\n".join(lines)


def distance_table(rows):
    """Each tool's median as a multiple of the floor of that run."""
    tools = tools_of(rows)
    lines = ["| N | run | floor | " + " | ".join(TOOLS[t] for t in tools) + " |",
             "|---|---|---|" + "---|" * len(tools)]
    for n, row in rows.items():
        for phase in PHASES:
            floor = floor_of(row["floor"], phase)
            cells = [f"{seconds(row, t, phase) / floor:.1f}x" if seconds(row, t, phase) is not None else "-"
                     for t in tools]
            lines.append(f"| {n} | {phase} | {floor:.2f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_table(rows):
    lines = ["| N | SSH handshake, all hosts | one command, all hosts | push the bytes (MB) | start N services "
             "(in the run: into the namespaces, as the user) | start N services (loopback, own sitting) |",
             "|---|---|---|---|---|---|"]
    for n, row in rows.items():
        f = row["floor"]
        loopback = f.get("start_services_loopback_s")
        lines.append(f"| {n} | {f['ssh_handshake_all_s']:.2f} s | {f['one_command_all_s']:.2f} s | "
                     f"{f['push_bytes_s']:.2f} s ({f['push_mb']:.0f}) | {f['start_services_s']:.2f} s | "
                     f"{f'{loopback:.2f} s' if loopback is not None else '-'} |")
    return "\n".join(lines)


def timings_table(rows):
    lines = []
    for n, row in rows.items():
        timings = row.get("fleet_timings")
        if not timings:
            continue
        phases = sorted({p for t in timings.values() for h in t["hosts"].values() for p in h})
        run_wide = [p for p in timings["cold"]["run"] if p != "total"]
        lines += [f"N={n}, one more fleet run of each kind with `--timings` (per host: median / slowest):", "",
                  "| phase | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
        for phase in phases:
            cells = []
            for kind in PHASES:
                values = sorted(h[phase] for h in timings[kind]["hosts"].values() if phase in h)
                cells.append(f"{values[len(values) // 2]:.2f} / {values[-1]:.2f} s" if values else "-")
            lines.append(f"| {phase} (per host) | " + " | ".join(cells) + " |")
        for phase in run_wide + ["total"]:
            lines.append(f"| {phase} | " + " | ".join(
                f"{timings[k]['run'][phase]:.2f} s" if phase in timings[k]["run"] else "-" for k in PHASES) + " |")
        # What --timings does not see: Python start-up, imports, and connecting and locking every host.
        lines.append("| start-up, imports, connect and lock all hosts (wall - total) | " + " | ".join(
            f"{timings[k]['wall'] - timings[k]['run']['total']:.2f} s" for k in PHASES) + " |")
        lines.append("| wall | " + " | ".join(f"{timings[k]['wall']:.2f} s" for k in PHASES) + " |")
        lines.append("")
    return "\n".join(lines)


def failures(rows):
    lines = []
    for n, row in rows.items():
        for tool in TOOLS:
            for failure in row.get(tool, {}).get("failures", []):
                took = f" after {failure['seconds']:.2f} s" if failure.get("seconds") else ""
                lines.append(f"- N={n} {TOOLS[tool]} rep {failure['rep']} {failure['phase']}{took}: "
                             f"{failure['error'].strip()[:160]}")
    return "\n".join(lines)


TARGETS = {"cold": 0.8, "unchanged": 0.5, "changed": 1.0}  # issue 12: fleet / pyinfra at N=20, plain hosts


def targets(rows):
    row = rows.get("20")
    if not row or "pyinfra" not in row:
        return ""
    lines = ["Targets at N=20 (fleet / pyinfra, medians):", ""]
    for phase, limit in TARGETS.items():
        mine, theirs = seconds(row, "fleet", phase), seconds(row, "pyinfra", phase)
        if mine is None or not theirs:
            lines.append(f"- {phase}: not measured")
            continue
        held = "holds" if mine / theirs <= limit else "does not hold"
        lines.append(f"- {phase}: {mine:.2f} s / {theirs:.2f} s = {mine / theirs:.3f} (target <= {limit}): {held}")
    return "\n".join(lines) + "\n"


def report(results):
    parts = [f"Run of {results['started']} to {results.get('finished', '(cut short)')}, medians of "
             f"{results['reps']} runs unless a cell says otherwise.", ""]
    for login, title in (("plain", "Plain hosts (login: a /bin/sh user)"),
                         ("root", "Root hosts (login: root, pyenv in .bashrc)")):
        rows = results["tables"].get(login)
        if not rows:
            continue
        parts += [f"### {title}", "", table(rows, results["reps"]), ""]
        if login == "plain" and targets(rows):
            parts += [targets(rows)]
        parts += ["The floor, measured at the start of each N:", "", floor_table(rows), "",
                  "Each tool as a multiple of the floor (cold: handshakes + one command + the longer of pushing the "
                  "bytes and starting the services; unchanged: handshakes + one command; changed: handshakes + one "
                  "command + starting the services):", "", distance_table(rows), ""]
        if timings_table(rows):
            parts += [timings_table(rows)]
        if failures(rows):
            parts += ["Failed runs (not in the medians):", "", failures(rows), ""]
    return "\n".join(parts)


def load(path):
    """The results, with the services floor of its own sitting (run.py --services-floor) put into
    each row's floor, where it replaces the in-run one (which includes entering the namespace
    and switching user, for every service)."""
    with open(path) as f:
        results = json.load(f)
    for rows in results["tables"].values():
        for n, row in rows.items():
            if n in results.get("services_floor", {}):
                row["floor"]["start_services_loopback_s"] = results["services_floor"][n]
    return results


if __name__ == "__main__":
    print(report(load(sys.argv[1] if len(sys.argv) > 1 else
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))))
