"""Where roles, templates, playbooks and the default inventory come from: the operator's project
directory first, then the built-in ones that ship inside the fleet package.

The built-in ones are the repository's top-level roles/, templates/, playbooks/ and inventory/.
A wheel carries them as package data under fleet/_builtin/ (pyproject.toml maps them there); an
editable install or a source checkout reads them where they are."""

import os
from importlib import resources

from fleet import artifacts, desired, render, roles
from fleet.errors import UsageError

KINDS = ("roles", "templates", "playbooks", "inventory")
PROJECT_INVENTORY = "inventory.yaml"
# How the embedded default's header says where its state is (replaced in a project's copy).
DEFAULT_STATE_NOTE = ("lives under ~/.local/state/fleet/local/,\n"
                      "# so `fleet status` and `fleet stop` find it from any directory.")


def builtin_dir(kind):
    """The built-in roles/, templates/, playbooks/ or inventory/ directory."""
    installed = resources.files("fleet").joinpath("_builtin", kind)
    if installed.is_dir():
        return str(installed)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), kind)


def search_path(project_dir, kind):
    """The project's directory of this kind (if it has one), then the built-in one."""
    own = os.path.join(project_dir, kind)
    return ([own] if os.path.isdir(own) else []) + [builtin_dir(kind)]


def load(project_dir, resolve_artifact=artifacts.resolve):
    """The project's roles, playbook and templates over the built-in ones. resolve_artifact maps an
    upload's src to an artifacts.Artifact (building or hashing it): planning gets identities from
    it and never reads an artifact itself."""
    playbook = next(os.path.join(d, "deploy.yaml") for d in search_path(project_dir, "playbooks")
                    if os.path.isfile(os.path.join(d, "deploy.yaml")))
    return desired.Project(roles=roles.load_roles(search_path(project_dir, "roles")),
                           playbook=roles.load_playbook(playbook),
                           renderer=render.Renderer(search_path(project_dir, "templates")),
                           resolve_artifact=resolve_artifact)


def default_inventory(project_dir):
    """The project's inventory.yaml, or the embedded local default (every service on loopback,
    state under ~/.local/state/fleet/local/)."""
    own = os.path.join(project_dir, PROJECT_INVENTORY)
    return own if os.path.isfile(own) else os.path.join(builtin_dir("inventory"), "local.yaml")


_ROLES_README = """\
# Roles of this project

A directory here named like a built-in role (envoy, grpc_service, inference, feature,
feature_2tower, vector_search, recommender) replaces that role for this project; any other name
adds a role that the inventory's `role:` can name. Each role has a tasks.yaml and may have a
defaults.yaml (docs/roles.md). templates/ beside this directory works the same way for Jinja2
templates, file by file: templates/envoy/resources.yaml.j2 here replaces the built-in one.

The built-in roles, to copy from: {roles}
"""


def init(directory):
    """A starting project: the embedded default inventory with its state kept in the project
    (.fleet/), and roles/ and templates/ for overrides. Refuses to overwrite an inventory."""
    inventory_path = os.path.join(directory, PROJECT_INVENTORY)
    if os.path.exists(inventory_path):
        raise UsageError("already exists; fleet init writes a new project only", path=inventory_path)
    with open(os.path.join(builtin_dir("inventory"), "local.yaml")) as f:
        text = f.read()
    text = text.replace(DEFAULT_STATE_NOTE, "lives under .fleet/ beside this file.")
    text = text.replace("~/.local/state/fleet/local/", ".fleet/")
    for kind in ("roles", "templates"):
        os.makedirs(os.path.join(directory, kind), exist_ok=True)
    with open(os.path.join(directory, "roles", "README.md"), "w") as f:
        f.write(_ROLES_README.format(roles=builtin_dir("roles")))
    with open(inventory_path, "w") as f:
        f.write(_INVENTORY_HEADER + text)
    return inventory_path


_INVENTORY_HEADER = """\
# The inventory of this fleet project (docs/inventory.md lists every key). fleet finds it when run
# from this directory, or with -i PATH / --project DIR. It starts as fleet's embedded local
# default; for real hosts, replace the hosts with SSH ones, for example:
#
#   hosts:
#     web1: {address: 10.0.0.11, user: deploy, key: ~/.ssh/id_ed25519, root: /opt/fleet}
#
"""
