"""The inventory: hosts and services, loaded from YAML and validated before anything runs.

Every key is documented in docs/inventory.md; errors name the file, line and key.
"""

import dataclasses
import fnmatch
import ipaddress
import os
import posixpath
import re
import sys
from dataclasses import dataclass, field

from fleet import ansible_inventory, render, rollout, sshconfig, yamlsource

# Host, service, role and process names become file names and log names on hosts.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # whole names: use fullmatch
NAME_RULE = "letters, digits, '_', '.', '-', not starting with '.'"
_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

HOST_KEYS = {"address", "connection", "user", "port", "key", "known_hosts", "root", "python", "vars",
             "ssh_host", "ssh_config", "jump", "become", "become_user", "venv"}
HOST_DEFAULTS = {
    "connection": "ssh",
    "user": "root",
    "port": 22,
    "key": None,
    "known_hosts": "~/.ssh/known_hosts",
    "root": "/opt/fleet",
    "python": None,  # python3 on ssh hosts; this interpreter for the local connection
    "vars": {},
    "become": False,
    "become_user": "root",
    "venv": False,
}
# Taken from the ssh config when the inventory does not set them (ssh connections only).
SSH_CONFIG_KEYS = ("user", "port", "key", "known_hosts")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
CONNECTIONS = {"ssh", "local"}
SERVICE_KEYS = {"role", "port", "backends", "ingress", "vars", "rollout", "keep_releases"}
ROLLOUT_KEYS = {"batch", "healthy_timeout", "surge_port"}
BACKEND_KEYS = {"host", "port"}
INGRESS_KEYS = {"host", "port", "listen_address", "vars"}
INGRESS_DEFAULTS = {"listen_address": "0.0.0.0"}
TOP_KEYS = {"defaults", "hosts", "hosts_from", "services", "ssh_config", "keep_releases"}
KEEP_RELEASES = 5  # releases of a service kept on each of its hosts (fleet/releases.py)


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    connection: str
    user: str
    port: int
    key: str | None
    known_hosts: str
    root: str
    python: str
    vars: dict = field(default_factory=dict, compare=False)  # for every role on this host
    # How SSH reaches it (user, port, key and known_hosts above are the resolved values too):
    ssh_host: str | None = None  # what was looked up in the ssh config; None: address
    target: sshconfig.Hop | None = None  # None: address, port, user, key and known_hosts as they are
    jumps: tuple = ()  # sshconfig.Hop bastions in front of it, outermost first
    become: bool = False  # run everything through sudo -n -u become_user
    become_user: str = "root"
    venv_from: str | None = None  # venv: true: the host's interpreter fleet builds ROOT/venv (python) from


@dataclass(frozen=True)
class Backend:
    host: str
    port: int


@dataclass(frozen=True)
class Ingress:
    host: str
    port: int
    listen_address: str
    vars: dict = field(default_factory=dict, compare=False)  # for the envoy role


@dataclass(frozen=True)
class Rollout:
    """A service's `rollout:` key: how a change restarts its running backends (fleet/rollout.py)."""

    batch: object = rollout.DEFAULT_BATCH  # a number of backends, or "N%" of them
    healthy_timeout: int = 30  # seconds a restarted batch has to turn healthy in Envoy
    surge_port: int | None = None  # a single backend's surge instance (default: port + 10000)


@dataclass(frozen=True)
class Service:
    name: str
    role: str
    port: int
    backends: tuple
    ingress: Ingress
    vars: dict = field(default_factory=dict, compare=False)  # for the service's own role
    rollout: Rollout = Rollout()  # how a change restarts running backends
    keep_releases: int = KEEP_RELEASES  # releases kept on each of its hosts; older ones are pruned

    def hosts(self):
        """Every host the service runs on, backends first, each once."""
        names = [b.host for b in self.backends] + [self.ingress.host]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Inventory:
    path: str
    hosts: dict
    services: dict
    secrets: frozenset = frozenset()  # values that must never be shown
    groups: dict = field(default_factory=dict)  # group name -> host names (Ansible groups, and `all`)
    source: object = field(default=None, compare=False)  # yamlsource.Located, for error lines

    def mask(self, text):
        """text with every secret value (and its quoted form in a YAML file) replaced by ********."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "********")
        return text

    def service(self, name):
        if name not in self.services:
            known = ", ".join(sorted(self.services)) or "none"
            raise self.source.error(("services",), f"unknown service {name!r} (the inventory defines: {known})")
        return self.services[name]

    def ingress_address(self, service):
        """Where clients reach the service's Envoy listener."""
        listen = service.ingress.listen_address
        return self.hosts[service.ingress.host].address if listen in ("0.0.0.0", "::") else listen

    def urls(self):
        """service name -> "address:port" of its Envoy listener, for service configs."""
        return {name: f"{self.ingress_address(s)}:{s.ingress.port}" for name, s in self.services.items()}

    def limit(self, spec):
        """Host names selected by --limit (comma-separated host names, group names or glob
        patterns such as 'web*'), or all hosts."""
        if not spec:
            return set(self.hosts)
        names, unknown = set(), []
        for pattern in (n.strip() for n in spec.split(",") if n.strip()):
            selected = select(pattern, self.hosts, self.groups)
            names.update(selected)
            if not selected:
                unknown.append(pattern)
        if unknown:
            raise self.source.error(("hosts",), f"--limit names unknown host(s): {', '.join(sorted(unknown))}")
        return names


def select(pattern, hosts, groups):
    """Host names that a name, a group name or a glob pattern stands for, in inventory order."""
    if pattern in hosts:
        return [pattern]
    if pattern in groups:
        return list(groups[pattern])
    return [name for name in hosts if fnmatch.fnmatchcase(name, pattern)]


def load(path, known_roles):
    source = yamlsource.load(path)
    return parse(source, known_roles)


def parse(source, known_roles):
    data = source.data
    _mapping(source, (), data, required=True)
    _known_keys(source, (), data, TOP_KEYS)
    for key in ("hosts", "services"):
        if key not in data and not (key == "hosts" and "hosts_from" in data):
            raise source.error((), f"missing required key {key!r}")
    base = os.path.dirname(os.path.abspath(source.path))
    secrets = set()
    _resolve_secrets(source, (), data, secrets)
    defaults = {}  # what the inventory sets for every host: it wins over the ssh config
    if "defaults" in data:
        _mapping(source, ("defaults",), data["defaults"])
        _known_keys(source, ("defaults",), data["defaults"], HOST_KEYS - {"address", "ssh_host"})
        defaults.update(data["defaults"])
    specs, groups = _host_specs(source, data, base)
    ssh = _SSHResolution(source, base, data)
    hosts = {_name(where, ("hosts", name), name): _host(where, name, spec, defaults, base, ssh)
             for name, (where, spec) in specs.items()}
    hosts = ssh.with_jumps(hosts)
    groups = dict(groups, all=tuple(hosts))
    _check_same_targets(source, hosts)
    _mapping(source, ("services",), data["services"], required=True)
    keep = _keep_releases(source, ("keep_releases",), data.get("keep_releases", KEEP_RELEASES))
    services = {_name(source, ("services", name), name): _service(source, name, spec, hosts, groups, known_roles, keep)
                for name, spec in data["services"].items()}
    _check_port_conflicts(source, services, hosts)
    return Inventory(path=source.path, hosts=hosts, services=services, secrets=frozenset(secrets), source=source,
                     groups=groups)


def _host_specs(source, data, base):
    """({host name: (where it was written, its keys)}, {group: host names}): the hosts of
    `hosts_from` (an Ansible inventory) with `hosts:` entries added or laid over them."""
    specs, groups = {}, {}
    if "hosts_from" in data:
        _string(source, ("hosts_from",), data["hosts_from"])
        ansible = ansible_inventory.load(os.path.join(base, os.path.expanduser(data["hosts_from"])))
        for name, spec in ansible.source.data["hosts"].items():
            specs[name] = (ansible.source, dict({"address": name}, **spec))
        groups = {name: members for name, members in ansible.groups.items() if name != "all"}
    if "hosts" in data:
        _mapping(source, ("hosts",), data["hosts"], required="hosts_from" not in data)
        for name, spec in data["hosts"].items():
            if name in specs and isinstance(spec, dict):
                spec = dict(specs[name][1], **spec)
            specs[name] = (source, spec)
    if not specs:
        raise source.error(("hosts_from",), "defines no host")
    return specs, groups


def _resolve_secrets(source, keys, value, secrets):
    """Replaces every `{secret: VALUE}` and `{env: NAME}` (taken from the controller's
    environment) by its value, a render.Secret: data, never rendered as a template. Each is
    remembered, with the form it takes quoted in a config, so that output can hide it."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict) and len(item) == 1 and set(item) <= {"secret", "env"}:
                (kind, arg), = item.items()
                where = keys + (key, kind)
                if not isinstance(arg, (str, int, float)) or isinstance(arg, bool) or arg == "":
                    raise source.error(where, "must be a plain value")
                if kind == "env":
                    if str(arg) not in os.environ:
                        raise source.error(where, f"environment variable {arg} is not set")
                    arg = os.environ[str(arg)]
                value[key] = render.Secret(arg)
                if value[key]:
                    secrets.update(render.secret_forms(value[key]))
            else:
                _resolve_secrets(source, keys + (key,), item, secrets)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _resolve_secrets(source, keys + (i,), item, secrets)


def _host(source, name, spec, defaults, base, ssh):
    keys = ("hosts", name)
    _mapping(source, keys, spec, required=True)
    _known_keys(source, keys, spec, HOST_KEYS)
    explicit = dict(defaults, **spec)
    values = dict(HOST_DEFAULTS, **explicit)
    if "address" not in spec:
        raise source.error(keys, "missing required key 'address'")
    if values["python"] is None:
        values["python"] = sys.executable if values["connection"] == "local" else "python3"
    for key in ("address", "user", "root", "python", "known_hosts", "become_user"):
        _string(source, keys + (key,), values[key])
    _address(source, keys + ("address",), values["address"])
    if values["connection"] not in CONNECTIONS:
        raise source.error(keys + ("connection",), f"must be one of {', '.join(sorted(CONNECTIONS))}")
    _port(source, keys + ("port",), values["port"])
    if values["key"] is not None:
        _string(source, keys + ("key",), values["key"])
    _mapping(source, keys + ("vars",), values["vars"])
    for key in ("become", "venv"):
        if not isinstance(values[key], bool):
            raise source.error(keys + (key,), "must be true or false")
    if not _USER_NAME.fullmatch(values["become_user"]):
        raise source.error(keys + ("become_user",), f"{values['become_user']!r} is not a user name")
    for key in ("become", "venv"):
        if values[key] and values["connection"] == "local":
            raise source.error(keys + (key,), "is for ssh hosts (a local host runs with fleet's own environment)")

    def local_path(p):
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    root = values["root"]
    if values["connection"] == "local":
        root = local_path(root)
    _root(source, keys + ("root",), root)
    # venv: true: the services run with the venv fleet builds under root from the host's python.
    python = posixpath.join(root, "venv", "bin", "python") if values["venv"] else values["python"]
    host = Host(name=name, address=values["address"], connection=values["connection"], user=values["user"],
                port=values["port"], key=local_path(values["key"]) if values["key"] else None,
                known_hosts=local_path(values["known_hosts"]), root=root, python=python,
                vars=values["vars"], become=values["become"],
                become_user=values["become_user"], venv_from=values["python"] if values["venv"] else None)
    if host.connection == "local":
        return host
    given = {k: explicit[k] for k in SSH_CONFIG_KEYS if explicit.get(k) is not None}
    return ssh.resolve(host, explicit, {k: getattr(host, k) for k in given}, spec, defaults)


class _SSHResolution:
    """Resolves every ssh host's target through its ssh config, then its jumps (which may name
    other inventory hosts, so they come second)."""

    def __init__(self, source, base, data):
        self.source, self.base, self.data = source, base, data
        self.resolvers = {}
        self.jump_specs = {}  # host name -> (keys, jump value) still to resolve

    def _resolver(self, keys, path):
        if path is not None:
            _string(self.source, keys, path)
        if path not in self.resolvers:
            full = None if path is None else os.path.normpath(os.path.join(self.base, os.path.expanduser(path)))
            try:
                self.resolvers[path] = sshconfig.Resolver(full, required=path is not None)
            except sshconfig.ConfigError as e:
                raise self.source.error(keys, str(e)) from None
        return self.resolvers[path]

    def resolve(self, host, explicit, given, spec, defaults):
        keys = ("hosts", host.name)
        # The ssh config file: the host's, else under defaults, else the top level's, else ~/.ssh/config.
        config_keys = next((k for k, d in ((keys, spec), (("defaults",), defaults), ((), self.data))
                            if "ssh_config" in d), ())
        path = self.data.get("ssh_config") if config_keys == () else explicit["ssh_config"]
        resolver = self._resolver(config_keys + ("ssh_config",), path)
        ssh_host = explicit.get("ssh_host", host.address)
        _string(self.source, keys + ("ssh_host",), ssh_host)
        if has_control_characters(ssh_host) or " " in ssh_host:
            raise self.source.error(keys + ("ssh_host",), f"{ssh_host!r} is not a host name or ssh config alias")
        try:
            target, proxy = resolver.hop(ssh_host, defaults={k: getattr(host, k) for k in ("user", "port", "known_hosts")},
                                         **given)
        except sshconfig.ConfigError as e:
            raise self.source.error(keys + ("ssh_host",), str(e)) from None
        if "jump" in explicit:
            jump = explicit["jump"]
            if jump is not None and jump != "none":
                _string(self.source, keys + ("jump",), jump)
                self.jump_specs[host.name] = (keys + ("jump",), jump, resolver)
        elif proxy:
            self.jump_specs[host.name] = (keys + ("ssh_host",), proxy, resolver)
        key = target.identity_files[0] if target.identity_files else None
        return dataclasses.replace(host, ssh_host=ssh_host, target=target, user=target.user, port=target.port, key=key,
                        known_hosts=target.known_hosts)

    def with_jumps(self, hosts):
        resolved = {}

        def chain(name, seen):
            if name in resolved or name not in self.jump_specs:
                return resolved.get(name, ())
            keys, spec, resolver = self.jump_specs[name]
            host = hosts[name]
            defaults = {"user": host.user, "key": host.key, "known_hosts": host.known_hosts}
            hops = ()
            for i, part in enumerate(p.strip() for p in spec.split(",")):
                if part in seen:
                    raise self.source.error(keys, f"jump {spec!r} loops back to {part}")
                if part in hosts and hosts[part].target is not None:
                    hops += (chain(part, seen + (part,)) if i == 0 else ()) + (hosts[part].target,)
                    continue
                try:
                    hops += resolver.jump(part, defaults, follow=i == 0, seen=tuple(h.name for h in hops))
                except sshconfig.ConfigError as e:
                    raise self.source.error(keys, str(e)) from None
            resolved[name] = hops
            return hops

        return {name: dataclasses.replace(host, jumps=chain(name, (name,))) for name, host in hosts.items()}


def _service(source, name, spec, hosts, groups, known_roles, keep_releases=KEEP_RELEASES):
    keys = ("services", name)
    _mapping(source, keys, spec, required=True)
    _known_keys(source, keys, spec, SERVICE_KEYS)
    for key in ("port", "backends", "ingress"):
        if key not in spec:
            raise source.error(keys, f"missing required key {key!r}")
    role = spec.get("role", name)
    if role not in known_roles:
        where = keys + ("role",) if "role" in spec else keys
        raise source.error(where, f"no role {role!r} (roles: {', '.join(sorted(known_roles))})")
    port = _port(source, keys + ("port",), spec["port"])
    backends_spec = spec["backends"]
    if not isinstance(backends_spec, list) or not backends_spec:
        raise source.error(keys + ("backends",), "must be a non-empty list of host names, groups or patterns")
    backends = []
    for i, item in enumerate(backends_spec):
        bkeys = keys + ("backends", i)
        if isinstance(item, dict):
            _known_keys(source, bkeys, item, BACKEND_KEYS)
            if "host" not in item:
                raise source.error(bkeys, "missing required key 'host'")
            _defined_host(source, bkeys + ("host",), item["host"], hosts)
            selected, bport = [item["host"]], _port(source, bkeys + ("port",), item.get("port", port))
        else:
            selected, bport = select(item, hosts, groups) if isinstance(item, str) else [], port
            if not selected:
                raise source.error(bkeys, f"host {item!r} is not defined under 'hosts' (nor a group, nor a "
                                          "pattern matching a host)")
        for host in selected:
            if any(b.host == host for b in backends):
                raise source.error(bkeys, f"host {host!r} is listed twice (one backend per host per service)")
            backends.append(Backend(host=host, port=bport))
    ikeys = keys + ("ingress",)
    ingress_spec = spec["ingress"]
    _mapping(source, ikeys, ingress_spec, required=True)
    _known_keys(source, ikeys, ingress_spec, INGRESS_KEYS)
    for key in ("host", "port"):
        if key not in ingress_spec:
            raise source.error(ikeys, f"missing required key {key!r}")
    values = dict(INGRESS_DEFAULTS, **ingress_spec)
    _defined_host(source, ikeys + ("host",), values["host"], hosts)
    if not is_ip_literal(values["listen_address"]):
        raise source.error(ikeys + ("listen_address",), "must be an IP address (0.0.0.0 or :: for all)")
    ingress_vars = values.get("vars", {})
    _mapping(source, ikeys + ("vars",), ingress_vars)
    ingress = Ingress(host=values["host"], port=_port(source, ikeys + ("port",), values["port"]),
                      listen_address=values["listen_address"], vars=ingress_vars)
    service_vars = spec.get("vars", {})
    _mapping(source, keys + ("vars",), service_vars)
    return Service(name=name, role=role, port=port, backends=tuple(backends), ingress=ingress, vars=service_vars,
                   rollout=_rollout(source, keys + ("rollout",), spec.get("rollout", {})),
                   keep_releases=_keep_releases(source, keys + ("keep_releases",),
                                                spec.get("keep_releases", keep_releases)))


def _keep_releases(source, keys, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
        raise source.error(keys, f"{value!r} is not a number of releases to keep (1-100)")
    return value


def _rollout(source, keys, spec):
    _mapping(source, keys, spec)
    _known_keys(source, keys, spec, ROLLOUT_KEYS)
    try:
        batch = rollout.parse_spec({"batch": spec["batch"]} if "batch" in spec else None)
    except rollout.RolloutError as e:
        raise source.error(keys + ("batch",), str(e).split(": ", 1)[1]) from None
    timeout = spec.get("healthy_timeout", Rollout.healthy_timeout)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 3600:
        raise source.error(keys + ("healthy_timeout",), f"{timeout!r} is not a number of seconds (1-3600)")
    surge = _port(source, keys + ("surge_port",), spec["surge_port"]) if "surge_port" in spec else None
    return Rollout(batch=batch, healthy_timeout=timeout, surge_port=surge)


def _check_same_targets(source, hosts):
    """Two names for one machine (same address, SSH port and root) would each take the other's
    lock and slip past the port checks: refuse the second name."""
    first = {}
    for name, host in hosts.items():
        target = (_canonical_address(host.address), host.port, host.root)
        if target in first:
            raise source.error(("hosts", name), f"same host as {first[target]} (address {host.address}, "
                                                f"port {host.port}, root {host.root})")
        first[target] = name


def _check_port_conflicts(source, services, hosts):
    """Two things listening on one port of one address would fail at start: refuse them up front.
    A single backend's surge port counts too, though its twin listens only during a restart.
    Claims are per address, so two host names for one machine cannot share a port either."""
    taken = {}
    for name, service in services.items():
        keys = ("services", name)
        claims = [(b.host, b.port, keys + ("backends", i), f"{name} backend", "")
                  for i, b in enumerate(service.backends)]
        ingress = service.ingress
        claims.append((ingress.host, ingress.port, keys + ("ingress", "port"), f"{name} Envoy listener", ""))
        if len(service.backends) == 1:  # its twin listens here while it restarts (runner._surge)
            backend, port = service.backends[0], service.rollout.surge_port
            where = keys + ("rollout", "surge_port") if port else keys + ("backends", 0)
            claims.append((backend.host, port or rollout.surge_port(backend.port), where, f"{name} surge instance",
                           ", the surge port of this single backend (rollout.surge_port),"))
        for host, port, where, what, note in claims:
            slot = (_canonical_address(hosts[host].address), port)
            if slot in taken:
                raise source.error(where, f"port {port} on host {host}{note} is already taken by {taken[slot]}")
            taken[slot] = f"{what} on {host}"


def _name(source, keys, name):
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise source.error(keys, f"{name!r} is not a valid name ({NAME_RULE})")
    return name


def is_ip_literal(value):
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _canonical_address(address):
    return str(ipaddress.ip_address(address)) if is_ip_literal(address) else address.lower().rstrip(".")


def _address(source, keys, value):
    """An IP address or an RFC 1123 host name (Envoy then resolves it: a STRICT_DNS cluster)."""
    if is_ip_literal(value):
        return
    labels = value.rstrip(".").split(".")
    if (len(value) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise source.error(keys, f"{value!r} is neither an IP address nor a host name")


def has_control_characters(text):
    return bool(_CONTROL.search(text))


def _root(source, keys, root):
    if not root.startswith("/"):
        raise source.error(keys, "must be an absolute path on the host")
    if has_control_characters(root):
        raise source.error(keys, "must not contain control characters (newline, tab, NUL)")
    if posixpath.normpath(root) != root or root.startswith("//"):
        raise source.error(keys, f"must be a normalised path (no '..', '.', '//' or trailing '/'): "
                                 f"{posixpath.normpath(root)!r}?")


def _mapping(source, keys, value, required=False):
    if not isinstance(value, dict) or (required and not value):
        raise source.error(keys, "must be a non-empty mapping" if required else "must be a mapping")


def _known_keys(source, keys, value, allowed):
    for key in value:
        if key not in allowed:
            raise source.error(keys + (key,), f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _string(source, keys, value):
    if not isinstance(value, str) or not value:
        raise source.error(keys, "must be a non-empty string")


def _port(source, keys, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise source.error(keys, f"{value!r} is not a port number (1-65535)")
    return value


def _defined_host(source, keys, name, hosts):
    if name not in hosts:
        raise source.error(keys, f"host {name!r} is not defined under 'hosts'")
