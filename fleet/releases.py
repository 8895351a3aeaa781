"""Releases: what a deploy left running of one service on one host, recorded on that host so that
`fleet releases` can list it and `fleet rollback` can return to it. Pure: builds and reads
manifests, picks what to prune, compares what runs with what the inventory renders;
commands.py writes and reads the files on hosts, runner.py sequences it.

On a host (docs/operations.md, "Releases"):

    ROOT/releases/SERVICE/ID/manifest.json   the manifest (one line of JSON, below)
    ROOT/releases/SERVICE/ID/files/N         copies of the service's rendered files (mode 0600)
    ROOT/releases/SERVICE/current            the ID the service runs

ID is the txid of the run that recorded it (`SECONDS-PID`), so ids sort by time. Artifacts are
not copied: a manifest names them by their content-addressed path (ROOT/artifacts/SHA/NAME),
and pruning keeps every artifact directory a kept release names."""

import base64
import binascii
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field

from fleet import desired, facts, protocol as P

FORMAT = 1
DEFAULT_KEEP = 5
ID = re.compile(r"[0-9]{1,20}-[0-9]{1,10}")  # a run's txid, see runner.Fleet
ARTIFACT_DIR = re.compile(r"[0-9a-f]{16}")  # ROOT/artifacts/SHA: the first 16 hex digits of its sha256


class ReleaseError(ValueError):
    """A manifest that cannot be used; the message says which and why, in one line."""


@dataclass(frozen=True)
class Release:
    service: str
    id: str
    manifest: dict | None  # None when it could not be read (error says why)
    error: str | None = None


@dataclass
class Listing:
    """What a host reported about its releases and artifact directories."""

    releases: dict = field(default_factory=dict)  # service -> [Release], oldest first
    current: dict = field(default_factory=dict)  # service -> id
    artifacts: dict = field(default_factory=dict)  # artifact directory name -> in use (commands.list_releases)
    recorded: list = field(default_factory=list)  # (service, id) written by this step
    pruned: list = field(default_factory=list)  # paths removed

    def ids(self, service):
        return [r.id for r in self.releases.get(service, [])]

    def find(self, service, release_id):
        return next((r for r in self.releases.get(service, []) if r.id == release_id), None)


def order(release_id):
    """Sort key of a release id: by time, then pid."""
    seconds, _, pid = release_id.partition("-")
    return int(seconds), int(pid)


def service_of(task, service_names):
    """The service a task label (SERVICE.ROLE.TASK) belongs to; service names may hold dots, so
    the longest name that prefixes it wins."""
    names = [n for n in service_names if task.startswith(n + ".")]
    return max(names, key=len) if names else None


def parts(state, service, service_names):
    """(files, processes, task labels) of one service in a desired.HostState. A file shared with
    another service (one Envoy binary for several Envoys) is part of every service that needs it
    and keeps the task label it has."""
    tasks = [t for t in state.tasks if service_of(t, service_names) == service]
    processes = [p for p in state.processes if p.task in tasks]
    needed = {path for p in processes for path in p.files}
    files = [f for f in state.files if f.task in tasks or f.path in needed]
    shared = [f.task for f in files if f.task not in tasks]
    return files, processes, list(dict.fromkeys(shared + tasks))


def manifest(state, service, service_names, release_id, when, who, inventory_path):
    """(manifest dict, [(path on the host, copy name)]) of the service's part of `state`."""
    files, processes, tasks = parts(state, service, service_names)
    rendered = [f for f in files if f.content is not None]
    doc = {
        "format": FORMAT, "id": release_id, "service": service, "host": state.host.name, "time": when, "who": who,
        "inventory": inventory_path, "tasks": tasks,
        "artifacts": [{"task": f.task, "path": f.path, "sha256": f.sha256, "mode": f.mode}
                      for f in files if f.content is None],
        "files": [{"task": f.task, "path": f.path, "sha256": f.sha256, "mode": f.mode, "secret": f.secret,
                   "copy": f"files/{i}"} for i, f in enumerate(rendered)],
        "processes": [{"name": p.name, "task": p.task, "command": p.command, "fingerprint": p.fingerprint,
                       "ports": list(p.ports), "start_timeout": p.start_timeout, "files": list(p.files),
                       "hot_restart": p.hot_restart}
                      for p in processes],
    }
    return doc, [(f.path, f"files/{i}") for i, f in enumerate(rendered)]


def encode(doc):
    """One line of JSON (a host script writes it with printf; no newline can be in it)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


_MANIFEST_KEYS = {"format": int, "id": str, "service": str, "time": str, "who": str, "inventory": str, "tasks": list,
                  "artifacts": list, "files": list, "processes": list}
_FILE_KEYS = {"task": str, "path": str, "sha256": str, "mode": int}
_PROCESS_KEYS = {"name": str, "task": str, "command": str, "fingerprint": str, "ports": list, "start_timeout": int,
                 "files": list}


def parse_manifest(text):
    """A manifest dict from its JSON, checked; ReleaseError if it is not one fleet wrote."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ReleaseError(f"manifest is not JSON: {e}") from None
    _typed(doc, _MANIFEST_KEYS, "manifest")
    if doc["format"] != FORMAT:
        raise ReleaseError(f"manifest format {doc['format']} (this fleet reads {FORMAT})")
    if not ID.fullmatch(doc["id"]):
        raise ReleaseError(f"manifest id {doc['id']!r} is not a release id")
    for item in doc["artifacts"] + doc["files"]:
        _typed(item, _FILE_KEYS, "manifest file")
    for item in doc["files"]:
        _typed(item, {"copy": str, "secret": bool}, "manifest file")
    for item in doc["processes"]:
        _typed(item, _PROCESS_KEYS, "manifest process")
    return doc


def _typed(doc, keys, what):
    if not isinstance(doc, dict):
        raise ReleaseError(f"{what} is not a mapping")
    for key, kind in keys.items():
        if not isinstance(doc.get(key), kind) or (kind is int and isinstance(doc.get(key), bool)):
            raise ReleaseError(f"{what}: {key} missing or not a {kind.__name__}")


def identity(doc):
    """What a release runs (files, artifacts, processes), without when and by whom: two releases
    with one identity run the same thing (a rollback records a release like the one it returned to)."""
    what = [sorted((f["path"], f["sha256"], f["mode"]) for f in doc["artifacts"] + doc["files"]),
            sorted((p["name"], p["command"], p["fingerprint"], p["ports"]) for p in doc["processes"])]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def host_state(host, doc, copies):
    """The desired.HostState that returns `host` to the release `doc`: its rendered files from the
    stored copies ({copy name: bytes}, each checked against its sha256), its artifacts by their
    content-addressed paths (present on the host: checked by the caller), its processes as recorded."""
    state = desired.HostState(host=host, tasks=list(doc["tasks"]))
    for item in doc["artifacts"]:
        state.files.append(desired.FileSpec(task=item["task"], path=item["path"], sha256=item["sha256"],
                                            mode=item["mode"]))
    for item in doc["files"]:
        content = copies.get(item["copy"])
        if content is None:
            raise ReleaseError(f"release {doc['id']} on {host.name}: the stored copy of {item['path']} is missing")
        if hashlib.sha256(content).hexdigest() != item["sha256"]:
            raise ReleaseError(f"release {doc['id']} on {host.name}: the stored copy of {item['path']} does not match "
                               "its sha256 (changed on the host)")
        state.files.append(desired.FileSpec(task=item["task"], path=item["path"], sha256=item["sha256"],
                                            mode=item["mode"], content=content, secret=item["secret"]))
    for item in doc["processes"]:
        state.processes.append(desired.ProcessSpec(
            name=item["name"], task=item["task"], command=item["command"], fingerprint=item["fingerprint"],
            ports=tuple(int(p) for p in item["ports"]), start_timeout=item["start_timeout"],
            files=tuple(item["files"]), hot_restart=item.get("hot_restart") is True))
    if state.processes:
        desired.add_supervisor(state)  # what the release's processes start under (not part of a release)
    return state


def parse_listing(text):
    """A Listing from the output of commands.record_release / commands.list_releases."""
    listing = Listing()
    lines = iter(text.splitlines())
    for line in lines:
        marker, _, rest = line.partition(" ")
        if marker == P.RELEASE:
            service, _, release_id = rest.partition(" ")
            body = "".join(facts.block(lines))
            listing.releases.setdefault(service, []).append(_release(service, release_id, body))
        elif marker == P.CURRENT:
            service, _, release_id = rest.partition(" ")
            listing.current[service] = release_id
        elif marker == P.ARTIFACT:
            name, _, use = rest.partition(" ")
            if ARTIFACT_DIR.fullmatch(name):  # anything else is not fleet's, and never pruned
                listing.artifacts[name] = use == "inuse"
        elif marker == P.RECORDED:
            listing.recorded.append(tuple(rest.split(" ", 1)))
        elif marker == P.PRUNED:
            listing.pruned.append(rest)
    for found in listing.releases.values():
        found.sort(key=lambda r: order(r.id) if ID.fullmatch(r.id) else (0, 0))
    return listing


def _release(service, release_id, encoded):
    try:
        doc = parse_manifest(base64.b64decode(encoded, validate=True).decode())
    except (ReleaseError, binascii.Error, UnicodeDecodeError) as e:
        return Release(service, release_id, None, f"unreadable manifest: {e}")
    if doc["id"] != release_id or doc["service"] != service:
        return Release(service, release_id, None, f"manifest says {doc['service']} {doc['id']}")
    return Release(service, release_id, doc)


def previous(listing, service):
    """The release before the current one, or None."""
    ids = listing.ids(service)
    current = listing.current.get(service)
    if current not in ids:
        return None
    at = ids.index(current)
    return ids[at - 1] if at > 0 else None


def artifact_dir(root, path):
    """The ROOT/artifacts/ directory name a file lives in, or None if it is not an artifact."""
    base = posixpath.join(root, "artifacts") + "/"
    return path[len(base):].split("/", 1)[0] if path.startswith(base) else None


def prune_selection(listing, keep, root, desired_paths):
    """(release (service, id) pairs, artifact directory names) to remove on a host.

    keep: service -> how many of its newest releases stay (only these services are pruned; the
    current release always stays). An artifact directory goes when no kept release of any service
    names it, no desired file of this run lies in it, and the host did not report it in use
    (commands.list_releases: named by a running command or a rendered config)."""
    removed = []
    for service, count in keep.items():
        ids = sorted(listing.ids(service), key=order, reverse=True)
        kept = set(ids[:count]) | {listing.current.get(service)}
        removed += [(service, i) for i in ids if i not in kept]
    gone = set(removed)
    named = {artifact_dir(root, a["path"]) for service, found in listing.releases.items() for r in found
             if (service, r.id) not in gone and r.manifest for a in r.manifest["artifacts"]}
    named |= {artifact_dir(root, p) for p in desired_paths}
    unused = [name for name, in_use in sorted(listing.artifacts.items()) if not in_use and name not in named]
    # A kept release that cannot be read might name anything: then no artifact goes.
    if any(r.manifest is None for found in listing.releases.values() for r in found):
        unused = []
    return removed, unused


def drift(host_plan):
    """process name -> why what runs differs from what the inventory renders now (empty: none).
    A process that is not running is not drift: status reports it as dead or not started."""
    found = {}
    for proc in host_plan.state.processes:
        play = proc.task.rsplit(".", 1)[0] + "."
        reasons = [f"{spec.path} differs" if spec.content is not None else f"{spec.path} missing"
                   for spec in host_plan.send if spec.task.startswith(play) or spec.path in proc.files]
        if host_plan.reasons.get(proc.name) == "command or files changed":
            reasons.insert(0, "command or files changed (fingerprint)")
        if reasons:
            found[proc.name] = reasons
    return found
