"""Roles (tasks + defaults) and playbooks, read from the project's YAML files."""

import os
from dataclasses import dataclass

from fleet import inventory, yamlsource
from fleet.errors import UsageError

MODULES = {
    "upload": {"required": {"src"}, "optional": {"mode"}},
    "template": {"required": {"src", "dest"}, "optional": set()},
    "envoy_config": {"required": {"bootstrap", "resources", "dir"}, "optional": set()},
    "process": {"required": {"name", "command"}, "optional": {"restart_on", "ports", "start_timeout", "hot_restart"}},
}


@dataclass(frozen=True)
class Task:
    name: str
    module: str
    args: dict


@dataclass(frozen=True)
class Role:
    name: str
    defaults: dict
    tasks: tuple


@dataclass(frozen=True)
class Play:
    hosts: str  # "backends" or "ingress" of the service
    role: str  # a Jinja2 expression, e.g. "{{ service_role }}"


def load_roles(search_path):
    """Roles by name from a search path, the project's roles/ first, then the built-in ones: a role
    of an earlier directory replaces the built-in role of the same name (as Ansible's roles path)."""
    found = {}
    for roles_dir in reversed(search_path):
        if os.path.isdir(roles_dir):
            found.update({n: os.path.join(roles_dir, n) for n in os.listdir(roles_dir)
                          if os.path.isdir(os.path.join(roles_dir, n))})
    return {name: _load_role(found, name, ()) for name in sorted(found)}


def _load_role(found, name, including):
    """A role's tasks.yaml is a task list, or `include: OTHER` to take OTHER's tasks and defaults
    (its own defaults.yaml then adds to and overrides OTHER's). `found`: role name -> directory."""
    if not isinstance(name, str) or not inventory.NAME.fullmatch(name):
        where = os.path.join(found[including[-1]], "tasks.yaml") if including else found.get(name, name)
        raise UsageError(f"role name {name!r} is not a valid name ({inventory.NAME_RULE})", path=where)
    if name in including:
        raise UsageError(f"roles include each other: {' -> '.join(including + (name,))}",
                         path=found[including[-1]])
    if name not in found:
        raise UsageError(f"no role {name!r}", path=os.path.join(found[including[-1]], "tasks.yaml"))
    defaults_path = os.path.join(found[name], "defaults.yaml")
    defaults = yamlsource.load(defaults_path).data if os.path.exists(defaults_path) else {}
    if not isinstance(defaults, dict):
        raise UsageError("must be a mapping of variables", path=defaults_path)
    source = yamlsource.load(os.path.join(found[name], "tasks.yaml"))
    if isinstance(source.data, dict):
        if set(source.data) != {"include"}:
            raise source.error((), "a role's tasks are a list of tasks, or `include: ROLE`")
        base = _load_role(found, source.data["include"], including + (name,))
        return Role(name=name, defaults={**base.defaults, **defaults}, tasks=base.tasks)
    if not isinstance(source.data, list):
        raise source.error((), "must be a list of tasks")
    tasks, seen = [], set()
    for i, spec in enumerate(source.data):
        if not isinstance(spec, dict) or "name" not in spec:
            raise source.error((i,), "a task needs a name and one module")
        modules = [k for k in spec if k != "name"]
        if len(modules) != 1 or modules[0] not in MODULES:
            raise source.error((i,), f"a task needs exactly one module of: {', '.join(sorted(MODULES))}")
        module, args = modules[0], spec[modules[0]]
        allowed = MODULES[module]["required"] | MODULES[module]["optional"]
        if not isinstance(args, dict):
            raise source.error((i, module), "module arguments must be a mapping")
        for key in args:
            if key not in allowed:
                raise source.error((i, module, key), f"unknown argument (allowed: {', '.join(sorted(allowed))})")
        for key in MODULES[module]["required"] - set(args):
            raise source.error((i, module), f"missing required argument {key!r}")
        if spec["name"] in seen:
            raise source.error((i, "name"), "duplicate task name")
        seen.add(spec["name"])
        tasks.append(Task(name=spec["name"], module=module, args=args))
    return Role(name=name, defaults=defaults, tasks=tuple(tasks))


def load_playbook(path):
    source = yamlsource.load(path)
    if not isinstance(source.data, list):
        raise source.error((), "must be a list of plays")
    plays = []
    for i, spec in enumerate(source.data):
        if not isinstance(spec, dict) or set(spec) != {"hosts", "role"}:
            raise source.error((i,), "a play has exactly the keys 'hosts' and 'role'")
        if spec["hosts"] not in ("backends", "ingress"):
            raise source.error((i, "hosts"), "must be 'backends' or 'ingress'")
        plays.append(Play(hosts=spec["hosts"], role=spec["role"]))
    return tuple(plays)
