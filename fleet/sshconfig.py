"""How fleet reaches a host over SSH: the inventory's host keys combined with an OpenSSH client
config (~/.ssh/config unless the inventory names another), resolved once on load into Hops.

Precedence, as in Ansible: a value set in the inventory (on the host or under `defaults`) wins;
else the ssh config's; else fleet's default. A host's `ssh_host` (default: its `address`) is
what is looked up, so an ssh config alias works there. ProxyJump chains, and `jump:` in the
inventory, become the hops in front of the host, outermost first (docs/hosts.md)."""

import os
import re
from dataclasses import dataclass

import paramiko

DEFAULT_CONFIG = "~/.ssh/config"
# A jump written as [user@]host[:port] or [user@][v6 address]:port, as ProxyJump takes it.
_JUMP = re.compile(r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:@\[\]\s]+))(?::(?P<port>\d+))?")
_MAX_HOPS = 8  # a chain longer than this is a loop in the ssh config
_DEFAULTS = {"user": "root", "port": 22, "key": None, "known_hosts": "~/.ssh/known_hosts"}


class ConfigError(ValueError):
    """A value fleet cannot use; the message names where it came from, the caller adds the key."""


@dataclass(frozen=True)
class Hop:
    """One SSH connection: where TCP goes, as whom, with which keys, checked against which known_hosts."""

    name: str  # as written (an alias, an address or an inventory host), for messages
    hostname: str
    port: int
    user: str
    identity_files: tuple  # private keys offered first, in order
    look_for_keys: bool  # also the SSH agent and ~/.ssh/id_* (not with IdentitiesOnly or an inventory key)
    known_hosts: str
    accept_new_host_keys: bool  # StrictHostKeyChecking accept-new (or no): trust a key seen first time

    def __str__(self):
        return f"{self.user}@{self.hostname}:{self.port}"


class Resolver:
    """Looks names up in one ssh config file (none if it does not exist and was not asked for)."""

    def __init__(self, path=None, required=False):
        self.path = os.path.expanduser(path or DEFAULT_CONFIG)
        self.config = paramiko.SSHConfig()
        if required or os.path.exists(self.path):
            try:
                self.config = paramiko.SSHConfig.from_path(self.path)
            except OSError as e:
                raise ConfigError(f"cannot read ssh config {self.path}: {e.strerror or e}") from None
            except Exception as e:  # paramiko raises ConfigParseError, ValueError, ... for bad lines
                raise ConfigError(f"ssh config {self.path}: {e}") from None

    def hop(self, name, user=None, port=None, key=None, known_hosts=None, defaults=None):
        """(Hop for `name`, its ProxyJump value or None). The given values are the inventory's
        explicit ones (they win); `defaults` (user, port, key, known_hosts) fill what neither sets."""
        defaults = dict(_DEFAULTS, **(defaults or {}))
        found = self.config.lookup(name)
        where = f"ssh config {self.path} (Host {name})"
        if port is None and "port" in found:
            try:
                port = int(found["port"])
            except ValueError:
                raise ConfigError(f"{where}: Port {found['port']!r} is not a number") from None
            if not 1 <= port <= 65535:
                raise ConfigError(f"{where}: Port {port} is not a port number (1-65535)")
        if known_hosts is None and "userknownhostsfile" in found:
            known_hosts = found["userknownhostsfile"].split()[0]
        identities_only = found.get("identitiesonly", "no").lower() == "yes"
        keys = [key] if key else [os.path.expanduser(k) for k in found.get("identityfile", [])]
        if not keys and defaults["key"]:
            keys = [defaults["key"]]
        strict = found.get("stricthostkeychecking", "yes").lower()
        hop = Hop(name=name, hostname=found.get("hostname", name), port=port or defaults["port"],
                  user=user or found.get("user") or defaults["user"], identity_files=tuple(keys),
                  look_for_keys=not key and not identities_only,
                  known_hosts=os.path.expanduser(known_hosts or defaults["known_hosts"]),
                  accept_new_host_keys=strict in ("accept-new", "no", "off"))
        proxy = found.get("proxyjump")
        return hop, (None if proxy is None or proxy.lower() == "none" else proxy)

    def chain(self, proxy_jump, defaults=None, seen=()):
        """The hops of a ProxyJump value ("a,user@b:2222"), outermost first."""
        hops = ()
        for i, spec in enumerate(proxy_jump.split(",")):
            hops += self.jump(spec.strip(), defaults, follow=i == 0, seen=seen + tuple(h.name for h in hops))
        return hops

    def jump(self, spec, defaults=None, follow=True, seen=()):
        """The hops to reach jump host `spec` ([user@]host[:port]) and that host, outermost first;
        with `follow`, its own ProxyJump in the ssh config is followed (as ssh -J does for the first)."""
        user, hostname, port = parse_jump(spec)
        hop, inner = self.hop(hostname, user=user, port=port, defaults=defaults)
        if hop.name in seen or len(seen) >= _MAX_HOPS:
            raise ConfigError(f"ProxyJump loops back to {hop.name}")
        return (self.chain(inner, defaults, seen + (hop.name,)) if follow and inner else ()) + (hop,)


def parse_jump(spec):
    """(user or None, host, port or None) of [user@]host[:port]."""
    match = _JUMP.fullmatch(spec)
    if not match:
        raise ConfigError(f"{spec!r} is not [user@]host[:port]")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{spec!r}: {port} is not a port number (1-65535)")
    return match["user"], match["v6"] or match["host"], port
