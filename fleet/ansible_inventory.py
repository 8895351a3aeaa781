"""Hosts and groups from an Ansible inventory file (INI, or YAML for .yml/.yaml/.json), for an
inventory's `hosts_from:`. The connection variables fleet understands become fleet host keys;
other Ansible variables are Ansible's business and are left out. Errors name the Ansible file
and line (docs/inventory.md, "Ansible inventories")."""

import re
import shlex
from dataclasses import dataclass

from fleet import yamlsource
from fleet.errors import UsageError

# Ansible variable -> fleet host key (the ansible_ssh_* spellings are Ansible's older names).
VARIABLES = {
    "ansible_host": "address", "ansible_ssh_host": "address",
    "ansible_user": "user", "ansible_ssh_user": "user",
    "ansible_port": "port", "ansible_ssh_port": "port",
    "ansible_ssh_private_key_file": "key", "ansible_private_key_file": "key",
    "ansible_become": "become", "ansible_become_user": "become_user",
    "ansible_python_interpreter": "python",
}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_RANGE = re.compile(r"\[(\d+):(\d+)\]")  # web[01:20] -> web01 ... web20
_SECTION = re.compile(r"\[([^\]:\s]+)(?::(vars|children))?\]")


@dataclass
class AnsibleHosts:
    source: yamlsource.Located  # fleet host keys per host, with the Ansible file's lines
    groups: dict  # group name -> tuple of host names (its children's hosts included)


def load(path):
    if path.endswith((".yml", ".yaml", ".json")):
        return _from_yaml(path)
    return _from_ini(path)


class _Builder:
    """Hosts and groups as they are read; group variables apply below host variables, and a
    child group's over its parent's (as Ansible orders them)."""

    def __init__(self, path):
        self.path = path
        self.host_vars, self.lines = {}, {}  # host -> {fleet key: value}; key path -> line
        self.members, self.children, self.group_vars = {}, {}, {}  # group -> hosts / groups / vars

    def group(self, name):
        self.members.setdefault(name, [])
        self.children.setdefault(name, [])
        self.group_vars.setdefault(name, {})

    def host(self, name, group, variables, line):
        for host in _expand(name, self.path, line):
            self.lines.setdefault(("hosts", host), line)
            own = self.host_vars.setdefault(host, {})
            own.update(self.fleet_keys(variables, ("hosts", host), line))
            self.group(group)
            if host not in self.members[group]:
                self.members[group].append(host)

    def fleet_keys(self, variables, keys=None, line=None):
        """The fleet host keys among Ansible `variables`; with `keys` (a host's), their line is kept."""
        found = {}
        for name, value in variables.items():
            key = VARIABLES.get(name)
            if key is None:
                continue
            found[key] = _typed(key, value)
            if keys:
                self.lines[keys + (key,)] = line
        return found

    def result(self):
        def hosts_of(group, seen=()):
            if group in seen:
                raise UsageError(f"group {group} is its own child", path=self.path)
            names = list(self.members.get(group, []))
            for child in self.children.get(group, []):
                names += hosts_of(child, seen + (group,))
            return list(dict.fromkeys(names))

        def depth(group):
            parents = [g for g, kids in self.children.items() if group in kids]
            return 1 + max((depth(p) for p in parents), default=0) if group != "all" else 0

        groups = {g: tuple(hosts_of(g)) for g in self.members}
        groups["all"] = tuple(self.host_vars)
        data = {}
        for host, own in self.host_vars.items():
            values = {}
            for group in sorted((g for g in groups if host in groups[g]), key=lambda g: (depth(g), g)):
                values.update(self.group_vars.get(group, {}))
            data[host] = dict(values, **own)
        return AnsibleHosts(source=yamlsource.Located(self.path, {"hosts": data}, self.lines), groups=groups)


def _from_ini(path):
    builder = _Builder(path)
    section, kind = "ungrouped", None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(yamlsource.MAX_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read Ansible inventory: {getattr(e, 'strerror', None) or e}", path=path) from None
    if len(text) > yamlsource.MAX_BYTES:
        raise UsageError(f"file is larger than {yamlsource.MAX_BYTES // 1024} KiB", path=path)
    for number, raw in enumerate(text.splitlines(), 1):
        text_line = raw.strip()
        if not text_line or text_line.startswith(("#", ";")):
            continue
        header = _SECTION.fullmatch(text_line)
        if header:
            section, kind = header[1], header[2]
            builder.group(section)
            continue
        try:
            words = shlex.split(text_line, comments=True)
        except ValueError as e:
            raise UsageError(f"cannot parse line: {e}", path=path, line=number) from None
        if kind == "vars":
            name, sep, value = text_line.partition("=")
            if not sep:
                raise UsageError(f"[{section}:vars] lines are NAME=VALUE", path=path, line=number)
            builder.group_vars[section].update(
                builder.fleet_keys({name.strip(): shlex.split(value)[0] if value.strip() else ""}))
        elif kind == "children":
            builder.group(words[0])
            builder.children[section].append(words[0])
        else:
            variables = {}
            for word in words[1:]:
                name, sep, value = word.partition("=")
                if not sep:
                    raise UsageError(f"{word!r} is not NAME=VALUE", path=path, line=number)
                variables[name] = value
            builder.host(words[0], section, variables, number)
    return builder.result()


def _from_yaml(path):
    source = yamlsource.load(path)
    builder = _Builder(path)
    if not isinstance(source.data, dict):
        raise source.error((), "an Ansible YAML inventory is a mapping of groups")

    def group(name, spec, keys):
        builder.group(name)
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise source.error(keys, "must be a mapping (hosts, vars, children)")
        for host, variables in (spec.get("hosts") or {}).items():
            if variables is not None and not isinstance(variables, dict):
                raise source.error(keys + ("hosts", host), "must be a mapping of variables")
            builder.host(str(host), name, variables or {}, source.line(keys + ("hosts", host)))
        builder.group_vars[name].update(builder.fleet_keys(spec.get("vars") or {}))
        for child, child_spec in (spec.get("children") or {}).items():
            builder.children[name].append(child)
            group(child, child_spec, keys + ("children", child))

    for name, spec in source.data.items():
        group(name, spec, (name,))
    return builder.result()


def _typed(key, value):
    """INI values are text: ports are numbers, become is a boolean (left as written if neither,
    for the inventory's own checks to name)."""
    if key == "port" and isinstance(value, str) and value.isdigit():
        return int(value)
    if key == "become" and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    return value


def _expand(name, path, line):
    match = _RANGE.search(name)
    if not match:
        return [name]
    first, last = match[1], match[2]
    if int(first) > int(last):
        raise UsageError(f"host range {name!r} runs backwards", path=path, line=line)
    width = len(first) if first.startswith("0") else 0
    return [n for i in range(int(first), int(last) + 1)
            for n in _expand(name[:match.start()] + str(i).zfill(width) + name[match.end():], path, line)]
