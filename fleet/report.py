"""The machine-readable view (`--json`): one JSON document per command, built from the same
outcomes the terminal view shows. Pure."""

import json

from fleet import facts, releases


def _ports(checks):
    return [{"process": c.process, "port": c.port, "ok": c.ok, "detail": c.detail} for c in checks]


def _changes(host_plan):
    if host_plan is None:
        return None
    return {
        "send": [{"path": s.path, "task": s.task, "what": "update" if s.content is not None else "upload"}
                 for s in host_plan.send],
        "restarts": [{"process": p.name, "reason": host_plan.reasons[p.name]} for p in host_plan.restarts],
        "diffs": [{"path": path, "diff": diff} for path, diff in host_plan.diffs if diff],
    }


def host_outcome(outcome, wave=None, services=()):
    """A runner.HostOutcome of deploy or stop."""
    doc = {"host": outcome.host, "ok": outcome.ok, "error": outcome.error,
           "steps": [{"step": label, "status": status} for label, status in outcome.steps.items()],
           "changes": _changes(outcome.plan), "ports": _ports(outcome.ports),
           "rolled_back": list(outcome.rolled_back), "logs": dict(outcome.logs),
           "timings": {phase: round(seconds, 3) for phase, seconds in outcome.timings.items()}}
    if wave is not None:
        doc.update(wave=wave, services=list(services))
    return doc


def check(service, ok, detail, wave=None):
    doc = {"service": service, "ok": ok, "detail": detail}
    if wave is not None:
        doc["wave"] = wave
    return doc


def status_host(status):
    """A runner.HostStatus. A host is ok when every process runs and listens on its ports."""
    processes = []
    for name, proc in status.procs.items():
        state = facts.process_state(proc)
        supervision = proc.supervision if proc else None
        processes.append({"name": name, "state": state, "pid": proc.pid if state == "running" else None,
                          "supervised": bool(supervision and supervision.supervised),
                          "keeper": supervision.keeper if supervision else None,
                          "restarts": supervision.restarts if supervision else None,
                          "last_exit": supervision.last_exit if supervision else None,
                          "ports": _ports([c for c in status.ports if c.process == name]),
                          "release": status.releases.get(name), "drift": status.drift.get(name, []),
                          "not_compared": status.not_compared.get(name)})
    return {"host": status.host, "ok": status.error is None and all(c.ok for c in status.ports)
            and all(p["state"] == "running" for p in processes), "error": status.error,
            "drifted": bool(status.drift), "processes": processes, "systemd": status.systemd}


def host_releases(found, service):
    """A runner.HostReleases of `fleet releases`: newest first."""
    listing = found.listing
    if listing is None:
        return {"host": found.host, "error": found.error, "current": None, "releases": []}
    current = listing.current.get(service)
    return {"host": found.host, "error": None, "current": current,
            "releases": [_release(r, current) for r in reversed(listing.releases.get(service, []))]}


def _release(release, current):
    doc = release.manifest or {}
    return {"id": release.id, "current": release.id == current, "time": doc.get("time"), "who": doc.get("who"),
            "inventory": doc.get("inventory"), "error": release.error,
            "identity": releases.identity(doc) if release.manifest else None,
            "artifacts": [{"path": a["path"], "sha256": a["sha256"]} for a in doc.get("artifacts", [])],
            "files": [{"path": f["path"], "sha256": f["sha256"]} for f in doc.get("files", [])],
            "processes": [{"name": p["name"], "fingerprint": p["fingerprint"]} for p in doc.get("processes", [])]}


def envoy_view(view):
    """A service's Envoy endpoints, or the one-line reason there are none (verify.Endpoint list or str)."""
    if isinstance(view, str):
        return {"ok": False, "error": view, "endpoints": []}
    endpoints = [{"address": e.address, "healthy": e.healthy, "health_flags": e.health_flags,
                  "requests": e.rq_total} for e in view]
    return {"ok": all(e["healthy"] for e in endpoints), "error": None, "endpoints": endpoints}


def dumps(document):
    return json.dumps(document, indent=2, sort_keys=False)
