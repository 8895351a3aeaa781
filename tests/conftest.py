import os
import subprocess
import sys

import pytest
import yaml

from fleet import desired, inventory, render, roles
from tests.hostlab import HostLab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project():
    return desired.Project(roles=roles.load_roles(os.path.join(REPO, "roles")),
                           playbook=roles.load_playbook(os.path.join(REPO, "playbooks", "deploy.yaml")),
                           renderer=render.Renderer(os.path.join(REPO, "templates")))


def write_inventory(directory, data, name="inventory.yaml"):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def load_inventory(path):
    return inventory.load(path, set(project().roles))


def run_fleet(*args, timeout=300):
    """The real command line, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture
def fleet_project():
    return project()


@pytest.fixture(scope="module")
def lab(request):
    """Namespace hosts h0, h1, ... for a test module; its LAB_HOSTS says how many (default 2).
    Creation failures raise: the tests stop, nothing else is contacted."""
    with HostLab(getattr(request.module, "LAB_HOSTS", 2)) as lab:
        yield lab


def inference_inventory(lab, **overrides):
    """inference on backends h0 and h1, Envoy on h0 (8083), as inventory data."""
    service = {"port": 7073, "backends": ["h0", "h1"], "ingress": {"host": "h0", "port": 8083}}
    service.update(overrides)
    return {"hosts": lab.inventory_hosts(), "services": {"inference": service}}
