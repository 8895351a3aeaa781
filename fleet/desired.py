"""Desired state: what each host should have after `fleet deploy`, compiled from the inventory,
the playbook and the roles. Pure: renders on the controller, touches no host."""

import dataclasses
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field

import yaml

from fleet import artifacts, commands, inventory as inventory_module, render, systemd
from fleet.errors import UsageError

_LDS_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
_CDS_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
# fleet's process supervisor (standard library only), pushed to every host that runs a process.
SUPERVISOR_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py")
SUPERVISOR_TASK = "fleet.supervisor"


@dataclass(frozen=True)
class FileSpec:
    """One file on a host. Either `content` (rendered, compared by content, diffable) or
    `source` (a controller file stored under a content-addressed path: present means current)."""

    task: str
    path: str
    sha256: str
    mode: int = 0o644
    content: bytes | None = None
    source: str | None = None
    secret: bool = False  # holds a secret value: mode 0600, its old contents never shown
    # protocol.file_identity of `source` when it was hashed (artifacts.Artifact.identity): what is
    # sent under this sha256 must still be that file.
    identity: tuple | None = None


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    task: str
    command: str
    fingerprint: str  # changes whenever the command or a file it restarts on changes
    ports: tuple
    start_timeout: int
    files: tuple = ()  # paths whose change restarts it (restored if the new version fails)
    hot_restart: bool = False  # Envoy: restarted as its next epoch beside the running one


@dataclass
class HostState:
    host: object  # inventory.Host
    files: list = field(default_factory=list)
    processes: list = field(default_factory=list)
    tasks: list = field(default_factory=list)  # task labels in apply order
    envoy_validations: list = field(default_factory=list)  # (label, static bootstrap text)
    supervisor: str | None = None  # where the supervisor lies on the host, if any process runs there
    # The machine ("Linux x86_64") its machine-specific artifacts (artifacts.MACHINE_SPECIFIC) were
    # resolved for: the host's, once its session reported it, else the controller's; None if it has none.
    machine: str | None = None
    machine_files: list = field(default_factory=list)  # paths of those artifacts on the host


@dataclass(frozen=True)
class Project:
    roles: dict
    playbook: tuple
    renderer: object  # render.Renderer
    # (src, base_dir, machine=None) -> artifacts.Artifact: called at the edge (it builds, hashes or
    # fetches); planning takes only the identity it returns. machine: the host's, for
    # artifacts.MACHINE_SPECIFIC sources (None: not known yet, the controller's own build).
    resolve_artifact: object


def compile_services(inventory, services, project, machines=None, only=None):
    """HostState per host name for the named services, in playbook order on each host.
    machines: {host name: machine} its sessions reported (the others get the controller's own
    builds); only: compile this host alone."""
    states = {}
    machines = machines or {}
    base_dir = os.path.dirname(os.path.abspath(inventory.path))
    for service in services:
        for play in project.playbook:
            role_name = project.renderer.value(play.role, {"service": service.name, "service_role": service.role},
                                               "playbooks/deploy.yaml")
            role = project.roles.get(role_name)
            if role is None:
                raise UsageError(f"no role {role_name!r}", path="playbooks/deploy.yaml", key="role")
            targets = [b.host for b in service.backends] if play.hosts == "backends" else [service.ingress.host]
            for host_name in targets:
                if only is not None and host_name != only:
                    continue
                host = inventory.hosts[host_name]
                state = states.setdefault(host_name, HostState(host=host))
                play_vars = service.vars if play.hosts == "backends" else service.ingress.vars
                context = role_context(inventory, service, role, host, play_vars)
                _apply_role(state, role, service, context, project, base_dir, inventory.secrets,
                            machines.get(host_name))
    for state in states.values():
        if state.processes:
            add_supervisor(state)
    return states


def add_supervisor(state):
    """Every process runs under fleet's supervisor, content-addressed like an artifact: a new
    version never replaces the file a running supervisor was started from. (A switch places all
    its files before it starts any process, so its place in the list does not matter.)"""
    sha, identity = artifacts.stamped_sha256(SUPERVISOR_SOURCE)
    path = posixpath.join(state.host.root, "artifacts", sha[:16], "supervisor.py")
    state.files.append(FileSpec(task=SUPERVISOR_TASK, path=path, sha256=sha, source=SUPERVISOR_SOURCE,
                                identity=identity))
    state.tasks.append(SUPERVISOR_TASK)
    state.supervisor = path


SURGE_SUFFIX = "-surge"


def surge_state(inventory, service, project, port):
    """A service's single backend once more, beside the running one: its files and process under
    the name SERVICE-surge, listening on `port`. While the backend restarts, this instance of the
    new release takes its calls (runner._surge), so one backend also changes without a gap."""
    backend = service.backends[0]
    host = inventory.hosts[backend.host]
    play = next(p for p in project.playbook if p.hosts == "backends")
    role = project.roles[project.renderer.value(play.role, {"service": service.name, "service_role": service.role},
                                                "playbooks/deploy.yaml")]
    original = role_context(inventory, service, role, host, service.vars)
    twin = dataclasses.replace(service, name=service.name + SURGE_SUFFIX,
                               backends=(inventory_module.Backend(host=backend.host, port=port),))
    context = role_context(inventory, twin, role, host, service.vars)
    # The twin runs the same program: what it runs must not follow its name.
    context["entry"] = project.renderer.value(original.get("entry", service.name), original,
                                              f"roles/{role.name}/defaults.yaml")
    state = HostState(host=host)
    _apply_role(state, role, twin, context, project, os.path.dirname(os.path.abspath(inventory.path)),
                inventory.secrets)
    add_supervisor(state)
    return state


def role_context(inventory, service, role, host, play_vars):
    backend_port = next((b.port for b in service.backends if b.host == host.name), service.port)
    context = dict(role.defaults)
    context.update(host.vars)
    context.update(play_vars)
    context.update(
        service=service.name,
        host=host,
        port=backend_port,
        ingress=service.ingress,
        services=inventory.urls(),
        backends=[{"host": b.host, "address": inventory.hosts[b.host].address, "port": b.port,
                   "ip_literal": inventory_module.is_ip_literal(inventory.hosts[b.host].address)}
                  for b in service.backends],
    )
    return context


def _apply_role(state, role, service, context, project, base_dir, secrets, machine=None):
    renderer = project.renderer
    where = f"roles/{role.name}/tasks.yaml"
    task_files = {}  # task name -> files a process restart depends on
    for task in role.tasks:
        label = f"{service.name}.{role.name}.{task.name}"
        args = renderer.value(task.args, context, where)
        if task.module == "upload":
            artifact = project.resolve_artifact(args["src"], base_dir, machine=machine)
            path = _under_root(state.host.root, posixpath.join("artifacts", artifact.sha256[:16], artifact.name),
                               where, task.name)
            if args["src"] in artifacts.MACHINE_SPECIFIC:
                state.machine = machine or artifacts.controller_machine()
                state.machine_files.append(path)
            spec = FileSpec(task=label, path=path, sha256=artifact.sha256, mode=int(args.get("mode", "0644"), 8),
                            source=artifact.path, identity=artifact.identity)
            files, restart_files = [spec], [spec]
        elif task.module == "template":
            text = renderer.file(args["src"], context).encode()
            spec = _content_file(label, _under_root(state.host.root, args["dest"], where, task.name), text, secrets)
            files, restart_files = [spec], [spec]
        elif task.module == "envoy_config":
            directory = _under_root(state.host.root, args["dir"], where, task.name)
            files, restart_files, validation = _envoy_config(label, directory, args, context, renderer, secrets)
            state.envoy_validations.append((label, validation))
        else:
            _process(state, label, task, args, task_files, where)
            state.tasks.append(label)
            continue
        _add_files(state, files)
        state.tasks.append(label)
        task_files[task.name] = restart_files
        context[f"{task.name}_path"] = files[-1].path


def _add_files(state, files):
    """Several services on one host share files (the Envoy binary, the services artifact):
    each path is sent once; two different contents for one path is an error."""
    known = {f.path: f for f in state.files}
    for spec in files:
        if spec.path not in known:
            state.files.append(spec)
        elif known[spec.path].sha256 != spec.sha256:
            raise UsageError(f"two tasks write different contents to {spec.path} on {state.host.name}: "
                             f"{known[spec.path].task} and {spec.task}")


def _under_root(root, relative, where, task_name):
    """root/relative, refused unless it stays strictly under root (no '..', no absolute path)."""
    path = posixpath.normpath(posixpath.join(root, str(relative)))
    if not path.startswith(root.rstrip("/") + "/") or inventory_module.has_control_characters(path):
        raise UsageError(f"path {relative!r} leaves the host's root {root}", path=where, key=task_name)
    return path


def _process(state, label, task, args, task_files, where):
    if not inventory_module.NAME.fullmatch(str(args["name"])):
        raise UsageError(f"process name {args['name']!r} is not a valid name ({inventory_module.NAME_RULE})",
                         path=where, key=task.name)
    restart_on = args.get("restart_on", [])
    unknown = [name for name in restart_on if name not in task_files]
    if unknown:
        raise UsageError(f"restart_on names no earlier task: {', '.join(unknown)}", path=where, key=task.name)
    dependencies = [f for name in restart_on for f in task_files[name]]
    depends = sorted(f.sha256 for f in dependencies)
    fingerprint = hashlib.sha256(json.dumps([args["command"], depends]).encode()).hexdigest()[:16]
    try:
        ports = tuple(int(p) for p in args.get("ports", []))
        timeout = int(args.get("start_timeout", 20))
    except ValueError as e:
        raise UsageError(f"ports and start_timeout must be numbers: {e}", path=where, key=task.name) from None
    if timeout < 1 or not all(0 < p < 65536 for p in ports):
        raise UsageError(f"start_timeout must be at least 1 (second) and ports between 1 and 65535, not "
                         f"{timeout} and {list(ports)}", path=where, key=task.name)
    hot_restart = args.get("hot_restart", False)
    if not isinstance(hot_restart, bool):
        raise UsageError(f"hot_restart must be true or false, not {hot_restart!r}", path=where, key=task.name)
    files = tuple(f.path for f in dependencies)
    # Where the host runs systemd, a unit keeps it; not a process with hot restarts, whose next
    # epoch is its supervisor's job (a unit would take the old epoch's exit for a crash).
    unit = None if hot_restart else _unit_file(state.host.root, label, args["name"], args["command"])
    if unit is not None:
        _add_files(state, [unit])
        files += (unit.path,)
    state.processes.append(ProcessSpec(name=args["name"], task=label, command=args["command"],
                                       fingerprint=fingerprint, ports=ports, start_timeout=timeout, files=files,
                                       hot_restart=hot_restart))


def _unit_file(root, label, name, command):
    """The process's systemd unit (fleet/systemd.py), kept at ROOT/units/NAME.service on every
    host. Where the host runs systemd and the session is root, starting the process installs it
    (commands.py, start_proc); elsewhere it lies unused. A file the process restarts on: a changed
    unit takes effect, and a failed start gets the previous one back with the previous command.
    None where no unit can say it (a root with a space or a quote: systemd's path settings take
    none): that process stays under fleet's supervisor."""
    try:
        text = systemd.process_unit(root, name, command, commands.STOP_GRACE_SECONDS).encode()
    except systemd.UnitError:
        return None
    return FileSpec(task=label, path=posixpath.join(root, "units", f"{name}.service"),
                    sha256=hashlib.sha256(text).hexdigest(), content=text, mode=0o600)


def _content_file(label, path, content, secrets):
    """A rendered file; readable by its owner only if it holds a secret (in any of its forms,
    which inventory.secrets all holds)."""
    private = any(secret.encode() in content for secret in secrets)
    return FileSpec(task=label, path=path, sha256=hashlib.sha256(content).hexdigest(), content=content,
                    mode=0o600 if private else 0o644, secret=private)


def _envoy_config(label, directory, args, context, renderer, secrets):
    """Bootstrap + file-based LDS/CDS for the running Envoy in directory, and the equivalent
    static config that `envoy --mode validate` checks before any of it is sent."""
    bootstrap = _yaml(renderer.file(args["bootstrap"], context), args["bootstrap"])
    resources = _yaml(renderer.file(args["resources"], context), args["resources"])
    listeners, clusters = resources.get("listeners", []), resources.get("clusters", [])
    lds_path, cds_path = posixpath.join(directory, "lds.yaml"), posixpath.join(directory, "cds.yaml")
    dynamic = dict(bootstrap, dynamic_resources={
        "lds_config": {"resource_api_version": "V3", "path_config_source": {"path": lds_path}},
        "cds_config": {"resource_api_version": "V3", "path_config_source": {"path": cds_path}},
    })
    static = dict(bootstrap, static_resources={"listeners": listeners, "clusters": clusters})
    cds = _content_file(label, cds_path, render.dump_yaml({"resources": [dict({"@type": _CDS_TYPE}, **c) for c in clusters]}),
                        secrets)
    lds = _content_file(label, lds_path, render.dump_yaml({"resources": [dict({"@type": _LDS_TYPE}, **l) for l in listeners]}),
                        secrets)
    boot = _content_file(label, posixpath.join(directory, "bootstrap.yaml"), render.dump_yaml(dynamic), secrets)
    # Clusters before listeners so a route never points at a cluster Envoy has not seen; only a
    # bootstrap change needs a restart, LDS/CDS files are picked up by the running Envoy.
    return [cds, lds, boot], [boot], render.dump_yaml(static).decode()


def _yaml(text, name):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"rendered template is not valid YAML: {e}", path=f"templates/{name}") from None
    if not isinstance(data, dict):
        raise UsageError("rendered template must be a YAML mapping", path=f"templates/{name}")
    return data


def deploy_order(inventory, services, project):
    """Waves of services: each wave depends only on earlier ones (role variable `depends_on`).
    Dependencies outside `services` are taken as already deployed."""
    names = [s.name for s in services]
    needs = {}
    for service in services:
        role = project.roles[service.role]
        context = role_context(inventory, service, role, inventory.hosts[service.backends[0].host], service.vars)
        depends = project.renderer.value(context.get("depends_on", []), context, f"roles/{role.name}/defaults.yaml")
        for dep in depends:
            if dep not in inventory.services:
                raise UsageError(f"{service.name} depends on {dep!r}, which the inventory does not define",
                                 path=inventory.path, key=f"services.{service.name}")
        needs[service.name] = {d for d in depends if d in names}
    waves, placed = [], set()
    while len(placed) < len(names):
        wave = [n for n in names if n not in placed and needs[n] <= placed]
        if not wave:
            cycle = sorted(set(names) - placed)
            raise UsageError(f"services depend on each other in a cycle: {', '.join(cycle)}", path=inventory.path)
        waves.append([inventory.services[n] for n in wave])
        placed.update(wave)
    return waves
